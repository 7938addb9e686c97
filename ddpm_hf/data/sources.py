"""Where training and held-out images come from: the built-in digits, a Hub dataset (by id or alias), a local image
folder (searched recursively), or local parquet/arrow files; opened, not decoded, with one line where one is not there."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np
from PIL import Image

from ddpm_hf.choices import BUILTIN_DATASETS, DATASET_ALIASES
from ddpm_hf.errors import StateError, UsageError
from ddpm_hf.paths import names_a_local_path, no_such_dataset

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


# the built-in digits' splits: the last 297 of scikit-learn's 1,797 images (about 30 of each digit) are held out, so
# that bits/dim and FID have images the quick start's model was not trained on
DIGITS_SPLITS = {"train": slice(0, 1500), "test": slice(1500, 1797)}


LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetUnavailableError(StateError):
    """A dataset that cannot be loaded here (offline and not cached, or not found)."""


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
        raise DatasetUnavailableError(no_such_dataset(dataset))
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


def first_rows(dataset: str, split: str, num_images: int, dataset_config: Optional[str] = None):
    """The first `num_images` rows of a dataset split (anything --dataset takes), opened but not decoded: a name
    that is not there, or too few images, fail here, before any model is loaded."""
    ds = load_image_dataset(dataset, dataset_config, split)
    if len(ds) < num_images:
        raise UsageError(f"--dataset {dataset} (split {split}) has {len(ds)} images; lower --num_images to at most {len(ds)}.")
    return ds.select(range(num_images))
