"""The batch feed of a training run: its images opened as the config names them, decoded once into a bank (or
streamed), and served as uint8 micro-batches for (step, micro-batch j) on each rank, in an order fixed by the seed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import torch

from ddpm_hf.data.columns import class_names_of, declared_class_names, find_image_column, find_label_column
from ddpm_hf.data.decoding import build_image_bank, stream_batches
from ddpm_hf.data.sources import load_image_dataset
from ddpm_hf.errors import UsageError
from ddpm_hf.seeding import DATA_ORDER_SEED_TAG, mix_seed

if TYPE_CHECKING:
    from ddpm_hf.recipes.config import TrainingConfig

logger = logging.getLogger(__name__)


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits the n training images: the same for every process and every resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch, DATA_ORDER_SEED_TAG)))


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether an image bank of `nbytes` should live on `device`: a GPU whose memory is at least 8 times larger."""
    if device.type == "cuda":
        return nbytes * 8 <= torch.cuda.get_device_properties(device).total_memory
    return False


def training_classes(config: "TrainingConfig") -> List[str]:
    """The class names of --class_conditional's label column (`find_label_column`), every label checked
    (`class_names_of`): opened, not decoded, so that bad labels are one line before any work."""
    ds = training_set(config)
    if ds.features is None:
        raise UsageError(f"The dataset {config.dataset!r} does not declare its columns; name the label column with "
                         "--label_column.")
    column = find_label_column(ds.features, config.label_column)
    if config.streaming:
        return declared_class_names(ds.features, column)
    return class_names_of(ds, column)


def training_set(config: "TrainingConfig", per_step: Optional[int] = None):
    """The training images as `config` names them (opened, not decoded), cut to --max_train_samples; with `per_step`
    (images per optimizer step) a set smaller than one step is refused here, before any decoding or timing."""
    ds = load_image_dataset(config.dataset, config.dataset_config, config.split, config.streaming, config.cache_dir)
    if config.streaming:
        return ds.take(config.max_train_samples) if config.max_train_samples else ds
    if config.max_train_samples:
        ds = ds.select(range(min(config.max_train_samples, len(ds))))
    if per_step is not None and len(ds) < per_step:
        raise UsageError(f"The dataset has {len(ds)} images, fewer than one batch of {per_step}; lower --batch_size.")
    return ds


class BatchSource:
    """uint8 micro-batches for (step, micro-batch j) on this rank, on `device`: from an in-memory ImageBank (exact
    resume; kept on the GPU when it is small, so that a batch is gathered there), or from a stream. A batch that comes
    from host memory to a GPU is gathered into pinned memory and copied without waiting: the host prepares the next
    batch while the GPU trains on this one."""

    def __init__(self, config: "TrainingConfig", micro: int, rank: int, world: int, progress: bool,
                 device: Optional[torch.device] = None):
        self.config, self.micro, self.rank, self.world = config, micro, rank, world
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.pinned = self.device.type == "cuda"
        per_step = micro * world * config.gradient_accumulation_steps
        ds = training_set(config, per_step)
        features = ds.features
        if features is None:
            raise UsageError(f"The dataset {config.dataset!r} does not declare its columns; name the image column with --image_column.")
        self.column = find_image_column(features, config.image_column)
        self.label_column = find_label_column(features, config.label_column) if config.class_conditional else None
        self.skipped = 0
        if config.streaming:
            self.bank = None
            self.ds = ds
            self.steps_per_epoch = None
            self._stream: Optional[Iterator] = None
            self._stream_epoch = -1
            self._streamed_labels: dict = {}  # (step, j) -> the labels of micro-batch get(step, j), until read
        else:
            self.bank = build_image_bank(ds, self.column, config.channels, config.resolution, config.center_crop,
                                         config.on_bad_image, progress, label_column=self.label_column)
            if device is not None and _fits_on(torch.device(device), self.bank.images.numel()):
                self.bank.images = self.bank.images.to(device)
                if self.bank.labels is not None:
                    self.bank.labels = self.bank.labels.to(device)
            self.skipped = self.bank.skipped
            self.steps_per_epoch = len(self.bank) // per_step
            if self.steps_per_epoch == 0:
                raise UsageError(f"The dataset has {len(self.bank)} usable images, fewer than one batch of {per_step}; lower --batch_size.")
            self._perm_epoch, self._perm = -1, None

    @property
    def num_images(self) -> Optional[int]:
        return None if self.bank is None else len(self.bank)

    def _rows(self, step: int, j: int) -> torch.Tensor:
        """The bank's rows of micro-batch j of step `step` on this rank (on the bank's device)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            perm = epoch_permutation(self.config.seed, epoch, len(self.bank))
            self._perm, self._perm_epoch = perm.to(self.bank.images.device), epoch
        start = ((pos * self.config.gradient_accumulation_steps + j) * self.world + self.rank) * self.micro
        return self._perm[start : start + self.micro]

    def labels(self, step: int, j: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The class labels (int64) of the micro-batch `get(step, j)`, on the device; into `out` where given."""
        if self.bank is not None:
            labels = self.bank.labels.index_select(0, self._rows(step, j))
        else:  # a stream yields each micro-batch's labels with its images: `get(step, j)` read them
            labels = self._streamed_labels.pop((step, j))
            labels = labels.pin_memory() if self.pinned else labels
        return labels.to(self.device, non_blocking=True) if out is None else out.copy_(labels, non_blocking=True)

    def get(self, step: int, j: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The micro-batch on the device, written into `out` where given (a CUDA graph's static buffer)."""
        if self.bank is not None:
            rows = self._rows(step, j)
            if self.bank.images.device.type != "cpu":  # the bank lives on the GPU: gathered there
                return torch.index_select(self.bank.images, 0, rows, out=out)
            # from host memory, pinned for a GPU (torch's pinned-memory cache keeps the block until the copy that reads
            # it is done, so the host goes on at once); on a CPU the same gather, and no copy
            batch = torch.empty((self.micro, *self.bank.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pinned)
            torch.index_select(self.bank.images, 0, rows, out=batch)
        else:
            batch, labels = self._next_streamed()
            if labels is not None:
                self._streamed_labels[(step, j)] = labels
            batch = batch.pin_memory() if self.pinned else batch
        return batch.to(self.device, non_blocking=True) if out is None else out.copy_(batch, non_blocking=True)

    def _next_streamed(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        while True:
            if self._stream is None:
                self._stream_epoch += 1
                c = self.config
                self._stream = stream_batches(self.ds, self.column, self.micro, c.channels, c.resolution, c.center_crop,
                                              c.on_bad_image, self.rank, self.world, c.seed, self._stream_epoch,
                                              self.label_column, len(c.class_names or ()))
            batch = next(self._stream, None)
            if batch is not None:
                return batch
            self._stream = None

    def fast_forward(self, step: int) -> None:
        """For streams: consume the micro-batches of steps before `step` (banks need nothing)."""
        if self.bank is None:
            for _ in range(step * self.config.gradient_accumulation_steps):
                self._next_streamed()
