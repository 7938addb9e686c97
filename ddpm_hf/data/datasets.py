"""Training images from a Hub dataset, a local image folder, local parquet/arrow files, or the built-in set.

Map-style datasets are decoded once, resized and center-cropped into one uint8 tensor [N, C, H, W]
(`ImageBank`); batches are then gathered by index and flipped/scaled on the device. `--streaming`
sets are decoded on the fly instead (`stream_batches`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddpm_hf.choices import BAD_IMAGE_POLICIES
from ddpm_hf.data.sizes import size_of
from ddpm_hf.errors import StateError, UsageError
from ddpm_hf.pipelines.pipeline_ddpm import names_a_local_path
from ddpm_hf.seeding import DATA_ORDER_SEED_TAG, mix_seed

if TYPE_CHECKING:
    from ddpm_hf.training.config import TrainingConfig

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("digits",)
# the built-in digits' splits: the last 297 of scikit-learn's 1,797 images (about 30 of each digit) are held out, so
# that bits/dim and FID have images the quick start's model was not trained on
DIGITS_SPLITS = {"train": slice(0, 1500), "test": slice(1500, 1797)}

# Short names for common unconditional image sets on the Hub.
DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "celeba-hq": "korexyz/celeba-hq-256x256",
    "butterflies": "huggan/smithsonian_butterflies_subset",
    "flowers": "huggan/flowers-102-categories",
    "pokemon": "huggan/pokemon",
}

LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetUnavailableError(StateError):
    """A dataset that cannot be loaded here (offline and not cached, or not found)."""


class BadImageError(UsageError):
    """An image that cannot be decoded, with where it came from."""


def _builtin_digits(split: str):
    """One split (DIGITS_SPLITS) of scikit-learn's bundled 1,797 8x8 handwritten digits (UCI), as 8-bit grayscale
    images in scikit-learn's order."""
    import datasets
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS:
        raise DatasetUnavailableError(f"--dataset digits has the splits {' and '.join(DIGITS_SPLITS)} (the last 297 images "
                                      f"held out), not {split!r}: give --split train or --split test.")
    digits, rows = load_digits(), DIGITS_SPLITS[split]
    images = [Image.fromarray((img * (255 / 16)).round().astype(np.uint8), mode="L") for img in digits.images[rows]]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict({"image": images, "label": digits.target[rows].tolist()}, features=features)


def _is_run_folder(folder: Path) -> bool:
    """A training run's output folder (our marker, or a run's config beside its pipeline): never read as data."""
    from ddpm_hf.outputs.run_folder import MODEL_INDEX, RUN_MARKER, TRAINING_CONFIG

    return (folder / RUN_MARKER).is_file() or ((folder / TRAINING_CONFIG).is_file() and (folder / MODEL_INDEX).is_file())


def data_files_under(path: Path, suffixes) -> List[str]:
    """Every file under `path` (recursively) with one of `suffixes`, sorted, leaving out hidden files and folders and
    the folders of our own training runs. Linked folders are followed (a dataset assembled from links is the data
    its links show), each real folder once: a link back up, or two links to one folder, add nothing twice."""
    found, seen = [], set()
    for root, dirs, files in os.walk(path, followlinks=True):
        seen.add(os.path.realpath(root))
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if not d.startswith(".") and real not in seen and not _is_run_folder(Path(root) / d):
                seen.add(real)  # taken by this walk: a second way to it is not
                kept.append(d)
        dirs[:] = kept
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found)


def local_data_files(path: Path) -> Optional[tuple]:
    """(builder, files) that a local --dataset reads: a parquet/arrow file, a folder of them, else the images under a
    folder ("imagefolder"); None for anything else (a folder without either)."""
    path = Path(path)
    if path.is_file():
        builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
        return (builder, [str(path)]) if builder else None
    for suffix, builder in LOCAL_FILE_BUILDERS.items():
        files = data_files_under(path, {suffix})
        if files:
            return builder, files
    images = data_files_under(path, IMAGE_SUFFIXES) if path.is_dir() else []
    return ("imagefolder", images) if images else None


# words that `datasets` reads as split names in file names (train_1.png, test-2.png, ...); we never split a folder
SPLIT_WORDS = re.compile(r"(^|[-_./ ])(train|training|test|testing|eval|valid|validation|dev)([-_./ 0-9]|$)", re.IGNORECASE)


def _one_split(dataset: str, split: Optional[str]) -> None:
    """Local data has one split, train (every image): refuse another split name, so that no report records a split
    that was not used."""
    if split not in (None, "train"):
        raise DatasetUnavailableError(
            f"--dataset {dataset} is local data with one split, train (every image), not {split!r}: give held-out images "
            "as their own folder or files, or --split train to use these (recorded as split train).")


def _load_local(builder: str, files: List[str], streaming: bool, cache_dir: Optional[str]):
    import datasets

    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs a damaged file's error itself; ours below names the file and the fix
    try:
        return datasets.load_dataset(builder, data_files={"train": files}, split="train", streaming=streaming,
                                     cache_dir=cache_dir)
    except OSError as e:
        cache = str(cache_dir or datasets.config.HF_DATASETS_CACHE)
        named = os.path.realpath(e.filename) if getattr(e, "filename", None) else None
        in_cache = named is not None and (named + os.sep).startswith(os.path.realpath(cache) + os.sep)
        if getattr(e, "errno", None) not in ACCESS_ERRORS and not in_cache:
            raise _damaged(builder, files, e) from None
        if named is not None and named in {os.path.realpath(f) for f in files}:
            raise DatasetUnavailableError(f"Cannot read {e.filename} ({e.strerror}); make it readable for this user.") from None
        # the data was readable: writing its cache failed (refused, full, or a file where a folder must be)
        fix = ("free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable for this user"
               if e.errno in ACCESS_ERRORS else "make it a folder you can write")
        other = "give --cache_dir" if cache_dir else "set HF_HOME (or HF_DATASETS_CACHE) to"
        raise DatasetUnavailableError(f"Cannot write the datasets cache {cache} ({e.strerror}: {e.filename}); {fix}, or "
                                      f"{other} a folder you can write.") from None
    except Exception as e:  # pyarrow and datasets raise many types for a damaged file
        raise _damaged(builder, files, e) from None
    finally:
        quiet.setLevel(level)


# what an unreadable file or an unwritable (or full) cache raises: not a damaged file
ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def _damaged(builder: str, files: List[str], e: BaseException) -> "DatasetUnavailableError":
    reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:160]
    named = next((f for f in files if f in str(e)), None) or (files[0] if len(files) == 1 else f"{len(files)} files")
    return DatasetUnavailableError(f"Cannot read the {builder} data {named} ({type(e).__name__}: {reason}); the file is "
                                   "damaged or incomplete (a partial copy?): copy it again.")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hub endpoint (HF_ENDPOINT) accepts a TCP connection, and offline mode is off."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode():
    """Make `datasets` use only its cache (as with HF_HUB_OFFLINE=1) instead of retrying an unreachable Hub."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_image_dataset(
    dataset: str,
    dataset_config: Optional[str] = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: Optional[str] = None,
):
    """Load `dataset`: `digits` (built in), a local folder of images (recursive), local parquet/arrow
    file(s), an alias from DATASET_ALIASES, or any Hub dataset id."""
    import datasets

    if dataset in BUILTIN_DATASETS:
        ds = _builtin_digits(split or "train")
        return ds.to_iterable_dataset() if streaming else ds
    path = Path(dataset).expanduser()
    if path.exists():
        _one_split(dataset, split)
        local = local_data_files(path)
        if local is not None:
            builder, files = local
            if builder == "imagefolder" and any(SPLIT_WORDS.search(Path(f).relative_to(path).as_posix()) for f in files):
                logger.info("%s: names like train_*/test_* are not split names here: every one of its %d images is used.",
                            path, len(files))
            return _load_local(builder, files, streaming, cache_dir)
        if path.is_dir():
            raise DatasetUnavailableError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no parquet/arrow files.")
        raise DatasetUnavailableError(f"{path} is neither a folder of images nor a .parquet/.arrow file.")
    if names_a_local_path(dataset) or path.suffix.lower() in set(LOCAL_FILE_BUILDERS) | IMAGE_SUFFIXES:
        raise DatasetUnavailableError(f"--dataset {dataset}: no such file or folder; give a folder of images, .parquet/.arrow "
                                      "files, an alias such as cifar10, or a Hub dataset id.")
    repo_id = DATASET_ALIASES.get(dataset, dataset)
    try:
        with contextlib.nullcontext() if hub_reachable() else _offline_mode():
            return datasets.load_dataset(repo_id, dataset_config, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        raise DatasetUnavailableError(
            f"Cannot load the Hub dataset {repo_id!r} (split {split!r}): it is not cached here and the Hub cannot "
            f"be reached, or it does not exist ({type(e).__name__}). Point --dataset at local files instead: a folder "
            "of images, or .parquet/.arrow files (e.g. --dataset path/to/train.parquet)."
        ) from e


def _holds_image_bytes(feature) -> bool:
    """An Image feature, a binary column, or a {'bytes': binary, ...} struct (an Image column saved without its
    feature type): a column whose values decode_image can read."""
    import datasets

    if isinstance(feature, datasets.Image):
        return True
    if isinstance(feature, datasets.Value):
        return feature.dtype in ("binary", "large_binary")
    return isinstance(feature, dict) and _holds_image_bytes(feature.get("bytes"))


def named_column(names: List[str], requested: str, flag: str) -> str:
    """The column `flag` names, refused in one line where the dataset has no such column."""
    if requested not in names:
        raise UsageError(f"{flag} {requested!r} is not a column of this dataset; its columns are {names}.")
    return requested


def find_image_column(features, requested: Optional[str] = None) -> str:
    """The image column: `requested`, else `img` or `image`, else the only column of images (an Image feature,
    or else raw encoded bytes)."""
    import datasets

    names = list(features)
    if requested is not None:
        return named_column(names, requested, "--image_column")
    image_columns = [k for k, v in features.items() if isinstance(v, datasets.Image)]
    image_columns = image_columns or [k for k, v in features.items() if _holds_image_bytes(v)]
    for preferred in ("img", "image"):
        if preferred in image_columns:
            return preferred
    if len(image_columns) == 1:
        return image_columns[0]
    raise UsageError(
        f"Cannot tell which column holds the images (Image columns: {image_columns or 'none'}; all columns: {names}); "
        "name it with --image_column."
    )


INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def find_label_column(features, requested: Optional[str] = None) -> str:
    """The class-label column of --class_conditional: `requested` (--label_column), else the only ClassLabel column
    (`label` or `labels` where there are several)."""
    import datasets

    names = list(features)
    if requested is not None:
        return named_column(names, requested, "--label_column")
    found = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
    if len(found) == 1:
        return found[0]
    for preferred in ("label", "labels"):
        if preferred in found:
            return preferred
    held = f"several ClassLabel columns ({', '.join(found)})" if found else "no ClassLabel column"
    raise UsageError(f"A class-conditional model needs a column of class labels, and this dataset has {held} (its columns: "
                     f"{names}); name the column with --label_column.")


def check_same_classes(names: List[str], known: List[str], column: str, whose: str = "pipeline") -> None:
    """Refuse, in one line, labels of `column` (classes `names`) that name other classes than the model's `known` (in
    label order; the data may hold only the first of them)."""
    if names != known[: len(names)]:
        raise UsageError(f"The classes of column {column!r} ({', '.join(names)}) are not the {whose}'s "
                         f"({', '.join(known)}), so its labels would name other classes; measure data labelled as the "
                         f"{whose} was trained.")


def class_names_of(ds, column: str) -> List[str]:
    """The class names of the label column `column` (a ClassLabel's names; an integer column's 0..max), after checking
    every label is one of them: a label outside the classes (HF's -1, "no label", included) is one line naming it."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif isinstance(feature, datasets.Value) and feature.dtype in INTEGER_DTYPES:
        names = None
    else:
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UsageError(f"--label_column {column!r} holds {kind} values, not class labels; name a ClassLabel or integer "
                         "column with --label_column.")
    labels = np.asarray(ds.with_format(None)[column])
    if labels.size == 0:
        raise UsageError("The dataset holds no images.")
    if names is None:
        names = [str(k) for k in range(max(int(labels.max()), 0) + 1)]
    outside = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if outside.size:
        i = int(outside[0])
        raise UsageError(f"The label of image {i} in column {column!r} is {int(labels[i])}, outside the classes "
                         f"0..{len(names) - 1} ({outside.size} images so); give those images a class or leave them out.")
    if len(names) < 2:
        raise UsageError(f"Column {column!r} holds one class ({names[0]}); --class_conditional needs two or more.")
    return names


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_8bit(image: Image.Image, where: str) -> Image.Image:
    """Images of more than 8 bits per channel, by their real range: 16-bit integers (PNG's I;16, and 32-bit I
    holding 0..65535) / 257; floats (F) in [0, 1] x 255, or in [0, 255] as they are. Others as they are."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        array = np.asarray(image, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise BadImageError(f"{where}: a 32-bit integer image with values in [{array.min()}, {array.max()}], outside "
                                "0..65535; convert it to 8 or 16 bits")
        return Image.fromarray(np.rint(array / 257).astype(np.uint8), mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        low, high = (array.min(), array.max()) if array.size else (0.0, 0.0)
        if not np.isfinite(array).all() or low < 0 or high > 255:
            raise BadImageError(f"{where}: a float image with values in [{low}, {high}]; only [0, 1] or [0, 255] are understood")
        scale = 255.0 if high <= 1.0 else 1.0
        return Image.fromarray(np.rint(array * scale).astype(np.uint8), mode="L")
    return image


def decode_image(value, where: str) -> Image.Image:
    """A PIL image with 8 bits per channel from a datasets Image value ({'bytes', 'path'} when not decoded, or a
    PIL image) or raw encoded bytes. Undecodable data, and images larger than PIL's decompression-bomb limit,
    are a BadImageError naming `where`."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise BadImageError(f"{where}: no image data")
        image.load()
        return to_8bit(image, where)
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{where}: too large to decode safely ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, BadImageError):
            raise
        raise BadImageError(f"{where}: cannot decode image ({e})") from e


def to_uint8_array(image: Image.Image, channels: int, resolution, center_crop: bool = True) -> np.ndarray:
    """Convert to `channels` (1: grayscale, 3: RGB; alpha is composited on white), resize to cover `resolution`'s
    H x W (an int: a square; `sizes.size_of`) keeping the aspect ratio (bicubic, antialiased) and center-crop it (or
    squash to it, without center_crop). HxWxC uint8."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if channels == 1:
        image = image.convert("L")
    elif channels == 3:
        image = image.convert("RGB")
    else:
        raise UsageError(f"--channels={channels} is not supported; use 1 (grayscale) or 3 (RGB).")
    w, h = image.size
    out_h, out_w = size_of(resolution)
    if center_crop:
        scale = max(out_w / w, out_h / h)  # a square: the short side to the size, as before
        nw, nh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
        left, top = (nw - out_w) // 2, (nh - out_h) // 2
        image = image.crop((left, top, left + out_w, top + out_h))
    elif (w, h) != (out_w, out_h):
        image = image.resize((out_w, out_h), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _where(row: dict, column: str, index: int) -> str:
    value = row.get(column)
    path = value.get("path") if isinstance(value, dict) else None
    return f"image {index}" + (f" ({path})" if path else "")


@dataclass
class ImageBank:
    """Every training image decoded once: uint8 [N, C, H, W] on the CPU; with a label column, their class labels
    (int64 [N])."""

    images: torch.Tensor
    skipped: int = 0
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _undecoded(ds, column):
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def stop_on_bad_image(error: Exception, skip_flag: Optional[str] = "--on_bad_image skip") -> BadImageError:
    """The error that stops at a bad image: what is wrong with it and how to go on (`skip_flag`: the calling command's
    flag that skips bad images; None where it has none)."""
    skip = f", or pass {skip_flag} to leave bad images out" if skip_flag else ""
    return BadImageError(f"{error}. Fix or remove it{skip}.")


def build_image_bank(ds, column: str, channels: int, resolution, center_crop: bool = True,
                     on_bad_image: str = "stop", progress: bool = True,
                     skip_flag: Optional[str] = "--on_bad_image skip", label_column: Optional[str] = None) -> ImageBank:
    """Decode a map-style dataset once into an `ImageBank` (with the labels of `label_column`, checked by
    `class_names_of`, where given). A bad image stops with its index and file, or (on_bad_image='skip') is left out and
    counted, with its label. skip_flag: the flag of the calling command that skips bad images, named in the stop's
    message (None: the command has none, so the message names none)."""
    from tqdm.auto import tqdm

    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise UsageError(f"on_bad_image={on_bad_image!r} is not one of {', '.join(map(repr, BAD_IMAGE_POLICIES))}.")
    labels = np.asarray(ds.with_format(None)[label_column], dtype=np.int64) if label_column is not None else None
    ds = _undecoded(ds, column).select_columns([column])
    out = np.empty((len(ds), *size_of(resolution), channels), dtype=np.uint8)
    kept = np.empty(len(ds), dtype=np.int64)
    n, skipped = 0, 0
    for index, row in enumerate(tqdm(ds, desc="Decoding images", disable=not progress, unit="img")):
        where = _where(row, column, index)
        try:
            out[n] = to_uint8_array(decode_image(row[column], where), channels, resolution, center_crop)
            kept[n] = index
            n += 1
        except BadImageError as e:
            if on_bad_image == "stop":
                raise stop_on_bad_image(e, skip_flag) from e
            skipped += 1
            logger.warning("Skipping %s", e)
    if n == 0:
        raise UsageError("The dataset holds no usable images.")
    return ImageBank(torch.from_numpy(out[:n]).permute(0, 3, 1, 2).contiguous(), skipped,
                     None if labels is None else torch.from_numpy(labels[kept[:n]]))


def first_rows(dataset: str, split: str, num_images: int, dataset_config: Optional[str] = None):
    """The first `num_images` rows of a dataset split (anything --dataset takes), opened but not decoded: a name
    that is not there, or too few images, fail here, before any model is loaded."""
    ds = load_image_dataset(dataset, dataset_config, split)
    if len(ds) < num_images:
        raise UsageError(f"--dataset {dataset} (split {split}) has {len(ds)} images; lower --num_images to at most {len(ds)}.")
    return ds.select(range(num_images))


def images_of(rows, channels: int, resolution, image_column: Optional[str] = None) -> torch.Tensor:
    """The images of dataset rows as uint8 [N, C, H, W] at `resolution` (N, HxW or [H, W]: `sizes.size_of`)."""
    return build_image_bank(rows, find_image_column(rows.features, image_column), channels, resolution, progress=False,
                            skip_flag=None).images


def image_fit_note(rows, channels: int, resolution, image_column: Optional[str] = None,
                   what: str = "the pipeline") -> Optional[str]:
    """Whether the first image of `rows` is what a model of `channels` and `resolution` sees: an error for other
    channels (converting them would measure other images), a note for another size (resized and cropped); None if it
    fits."""
    column = find_image_column(rows.features, image_column)
    image = decode_image(_undecoded(rows, column)[0][column], "image 0")
    has = 1 if image.mode in ("1", "L", "LA", "I", "F") or image.mode.startswith("I;16") else 3
    if has != channels:
        raise UsageError(f"The images have {has} channel{'s' if has > 1 else ''} and {what} models {channels}: converting "
                         f"them would measure other images than these; give {channels}-channel images.")
    h, w = size_of(resolution)
    if image.size != (w, h):  # sizes said as H x W, as --resolution takes them
        return (f"the images are {image.size[1]}x{image.size[0]}; they are resized and center-cropped to "
                f"{h}x{w}, the size {what} models, before measuring")
    return None


def stream_batches(ds, column: str, batch_size: int, channels: int, resolution, center_crop: bool,
                   on_bad_image: str, rank: int, world_size: int, seed: int, epoch: int,
                   label_column: Optional[str] = None, num_classes: int = 0
                   ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(uint8 images [B, C, H, W], int64 labels [B] of `label_column`, or None) from a streaming dataset: this rank's
    shard of epoch `epoch`, shuffled through a buffer. A bad image, or a label outside 0..num_classes-1 (a stream's
    labels are read as they come), is skipped (counted in the log) or stops the run as with ImageBank."""
    from datasets.distributed import split_dataset_by_node

    ds = _undecoded(ds, column)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
    ds = ds.shuffle(seed=seed, buffer_size=1000)
    ds.set_epoch(epoch)
    batch: List[np.ndarray] = []
    labels: List[int] = []
    for index, row in enumerate(ds):
        where = _where(row, column, index)
        try:
            if label_column is not None:
                label = row[label_column]
                if not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
                    raise BadImageError(f"The label of {where} in column {label_column!r} is {label!r}, outside the "
                                        f"classes 0..{num_classes - 1}")
            image = to_uint8_array(decode_image(row[column], where), channels, resolution, center_crop)
        except BadImageError as e:
            if on_bad_image == "stop":
                raise stop_on_bad_image(e) from e
            logger.warning("Skipping %s", e)
            continue
        batch.append(image)
        if label_column is not None:
            labels.append(int(label))
        if len(batch) == batch_size:
            images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
            yield images, (torch.tensor(labels, dtype=torch.int64) if label_column is not None else None)
            batch, labels = [], []


def to_model_range(batch: torch.Tensor, random_flip: bool = False, generator: Optional[torch.Generator] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] -> `dtype` in [-1, 1] (pixel k at -1 + 2k/255), with `random_flip` each image flipped
    left-right with probability 1/2."""
    x = batch.to(dtype).div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else "cpu") < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


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


def declared_class_names(features, column: str) -> List[str]:
    """The class names a --streaming dataset's label column declares: a stream is read as it trains, so its classes
    must be known before (a ClassLabel); its labels are checked as they come (`stream_batches`)."""
    import datasets

    feature = features[column]
    if not isinstance(feature, datasets.ClassLabel):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise UsageError(f"--streaming with --class_conditional needs the classes declared before the stream is read, "
                         f"and column {column!r} holds {kind} values, not a ClassLabel; drop --streaming (the labels "
                         "are then read whole), or give the dataset a ClassLabel column.")
    return list(feature.names)


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
