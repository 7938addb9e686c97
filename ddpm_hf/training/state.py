"""What a training run holds: the objects `setup` builds (`Run`), what a checkpoint saves and a resume restores
(`TrainState`), the device-side meters of a step, and the training clock."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import torch

from ddpm_hf.data.decoding import ImageBank
from ddpm_hf.training.batches import BatchSource
from ddpm_hf.diffusion.ema import EMA, PowerEMA
from ddpm_hf.diffusion.losses import DiffusionLoss
from ddpm_hf.diffusion.scheduler import DDPMScheduler
from ddpm_hf.diffusion.timestep_samplers import UniformSampler
from ddpm_hf.recipes.config import TrainingConfig

if TYPE_CHECKING:  # heavy, or importing the training modules back
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch.optim.lr_scheduler import LRScheduler

    from ddpm_hf.measuring.folder_metrics import FeatureNetwork
    from ddpm_hf.training.run_guard import RunFolderLock


@dataclass
class TrainState:
    """What a checkpoint saves besides weights and optimizer moments (its trainer_state.json) and a resume
    restores: the step, the logged history, evaluations (FID; bits/dim), the best FID, the non-finite step
    counters, and the states of the LR schedule, the EMA and the timestep sampler."""

    step: int = 0
    history: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    nll: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    lr_scheduler: Dict[str, Any] = field(default_factory=dict)
    ema: Dict[str, Any] = field(default_factory=dict)
    ema_power: Optional[Dict[str, Any]] = None  # with --ema_posthoc: the power EMAs' time and widths
    timestep_sampler: Optional[Dict[str, Any]] = None
    config_history: List[dict] = field(default_factory=list)  # settings changed on resume: {"step", "changes"}
    precision_choice: Optional[dict] = None  # how --mixed_precision auto chose the run's precision, if it did

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class StepMeters:
    """Device-side sums between two reads: the loss overall and by timestep quartile, and the non-finite step
    counters (total, in a row now, longest run since the last read). Adding never waits for the device;
    reading is a host synchronisation, done on logging and checkpoint steps."""

    def __init__(self, device, num_train_timesteps: int, nonfinite_total: int = 0, nonfinite_in_a_row: int = 0):
        self.T = num_train_timesteps
        self.loss_sum = torch.zeros(5, device=device)
        self.loss_count = torch.zeros(5, device=device)
        self.counters = torch.tensor([nonfinite_total, nonfinite_in_a_row, nonfinite_in_a_row], device=device)

    def restore(self, nonfinite_total: int, nonfinite_in_a_row: int) -> None:
        """The counters a checkpoint saved (a resume), in place: a captured step keeps adding to these tensors."""
        self.counters.copy_(torch.tensor([nonfinite_total, nonfinite_in_a_row, nonfinite_in_a_row]))

    def add_losses(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        quartile = 1 + (t * 4 // self.T)
        self.loss_sum[0] += per_sample.sum()
        self.loss_count[0] += per_sample.numel()
        self.loss_sum.scatter_add_(0, quartile, per_sample)
        self.loss_count.scatter_add_(0, quartile, torch.ones_like(per_sample))

    def add_step(self, skipped: torch.Tensor) -> None:
        c, s = self.counters, skipped.long()
        c[0] += s
        c[1] = (c[1] + 1) * s
        c[2] = torch.maximum(c[2], c[1])

    def read_counters(self) -> tuple:
        total, in_a_row, longest = self.counters.tolist()
        self.counters[2] = self.counters[1]
        return total, in_a_row, longest

    def read_losses(self, accelerator) -> tuple:
        """(mean loss, count) overall and per quartile, summed over all processes; then start again."""
        sums = accelerator.reduce(self.loss_sum, reduction="sum")
        counts = accelerator.reduce(self.loss_count, reduction="sum")
        means = (sums / counts.clamp(min=1)).tolist()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return means, counts.tolist()


class Clock:
    """Training time between logging steps, without the pauses for periodic work (grids, checkpoints)."""

    def __init__(self, step: int = 0):
        self.start, self.paused, self.step = time.perf_counter(), 0.0, step

    @contextlib.contextmanager
    def pause(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def lap(self, step: int) -> tuple:
        """(seconds of training, steps) since the last lap."""
        now = time.perf_counter()
        seconds, steps = now - self.start - self.paused, step - self.step
        self.start, self.paused, self.step = now, 0.0, step
        return seconds, steps


@dataclass(frozen=True)
class Run:
    """What `setup` builds, whole, and every later stage uses; nothing is set on it later (what the loop makes as it
    goes, the clock, the step graph and the stop signals, are locals of `run_loop`)."""

    config: TrainingConfig
    accelerator: Accelerator  # (the precision probe's stand-in: precision.OneCPUProcess)
    source: Optional[BatchSource]  # (None in the precision probe, which makes its own batches)
    total_steps: int
    unet: torch.nn.Module  # as Accelerate prepared it (DDP-wrapped with several processes)
    raw_unet: torch.nn.Module  # the UNet itself
    forward: Callable  # the training forward pass: the UNet, or its torch.compile
    scheduler: DDPMScheduler
    loss: DiffusionLoss
    t_sampler: UniformSampler  # draws the training t (and importance weights): a t-sampler, not an inference sampler
    optimizer: AcceleratedOptimizer
    lr_scheduler: LRScheduler
    ema: EMA
    posthoc: Optional[PowerEMA]  # --ema_posthoc's power EMAs (None without it)
    skips_on_device: bool  # the optimizer takes found_inf (fused Adam)
    meters: StepMeters
    generator: torch.Generator  # a step's flips, ε and t, reseeded for each step (steps.seed_step)
    pusher: Optional[Any] = None  # outputs.hub.HubPusher (which the card, and so the training modules, come after)
    feature_network: Optional[FeatureNetwork] = None
    reference: Optional[tuple] = None  # the evaluation reference statistics (mean, covariance)
    held_out: Optional[ImageBank] = None  # the held-out images (and labels) of --eval_nll_every
    checkpoint: Optional[Path] = None  # the verified checkpoint to resume from
    config_changes: Dict[str, list] = field(default_factory=dict)  # settings that differ from the checkpoint's
    lock: Optional[RunFolderLock] = None  # the output folder's RunFolderLock, held by the main process for the whole run
    precision_choice: Optional[dict] = None  # how --mixed_precision auto chose (None: given explicitly)
    started: float = 0.0  # time.perf_counter() when setup began

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def model(self, x_t: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training forward pass under Accelerate's autocast: the UNet's output tensor (given the class labels of a
        class-conditional run)."""
        with self.accelerator.autocast():
            return self.forward(x_t, t, class_labels=labels).sample

