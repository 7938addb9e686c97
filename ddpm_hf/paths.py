"""Where ddpm_hf keeps files outside a run: the cache of reference statistics and feature-network weights.
No heavy imports: the command lines show these in their help."""

import difflib
import os
from pathlib import Path
from typing import Optional

from ddpm_hf.choices import BUILTIN_DATASETS, DATASET_ALIASES

CACHE_ENV = "DDPM_HF_CACHE"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
WEIGHTS_ENV = "DDPM_HF_INCEPTION_WEIGHTS"
# FD_DINOv2 (Stein et al. 2023; EDM2 reports it) uses the large ViT
DINOV2_DEFAULT = "facebook/dinov2-large"


def default_cache_dir() -> Path:
    """$DDPM_HF_CACHE, else ~/.cache/ddpm_hf (never site-packages or /tmp)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ddpm_hf")


def names_a_local_path(name) -> bool:
    """Whether `name` can only mean a local path: it starts with ./ ../ / or ~, ends with a slash, has more than the one
    slash of `namespace/name`, or its first part is a folder here (as `runs/digits` is in a checkout that has `runs/`).
    A Hub id otherwise."""
    text = os.fspath(name).replace("\\", "/")
    first = text.split("/")[0]
    return (text.startswith((".", "/", "~")) or text.endswith("/") or text.count("/") > 1
            or ("/" in text and bool(first) and os.path.isdir(first)))


def no_such_dataset(name: str, flag: str = "--dataset") -> str:
    """The line for a dataset named by a local path that is not there."""
    return (f"{flag} {name}: no such file or folder; give a folder of images, .parquet/.arrow files, an alias such as "
            "cifar10, or a Hub dataset id.")


def hub_dataset_cached(name: str) -> bool:
    """Whether a Hub dataset of this id is in the local Hugging Face caches (the hub's and datasets'), read from the
    folder names alone: a name close to a built-in one (emnist, celeba) that the user has is theirs, not a typo."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub").expanduser()
    datasets = Path(os.environ.get("HF_DATASETS_CACHE") or home / "datasets").expanduser()
    return ((hub / ("datasets--" + name.replace("/", "--"))).is_dir()
            or (datasets / name.replace("/", "___")).is_dir())


def dataset_name_problem(name: str, flag: str = "--dataset") -> Optional[str]:
    """What is wrong with a dataset name, known without loading anything (so a command answers before torch loads): a
    local path that is not there, or a plain name that is no built-in set, alias or folder but close to one (suggested).
    None for anything else (a Hub id is looked up when loaded)."""
    if (name in BUILTIN_DATASETS or name in DATASET_ALIASES or os.path.exists(os.path.expanduser(name))
            or hub_dataset_cached(name)):
        return None
    if names_a_local_path(name):
        return no_such_dataset(name, flag)
    close = difflib.get_close_matches(name, [*BUILTIN_DATASETS, *DATASET_ALIASES], n=1, cutoff=0.75)
    if close and "/" not in name:
        return (f"{flag} {name} is no built-in set, alias or folder here; did you mean {flag} {close[0]}? (A Hub "
                "dataset is named by its id, e.g. uoft-cs/cifar10.)")
    return None


def reference_problem(reference: str, flag: str = "--reference") -> Optional[str]:
    """What is wrong with a measuring reference, known without loading anything: as for a dataset name, except that
    clean-fid's precomputed statistics (cleanfid:NAME:SPLIT:RES) are looked up when measured."""
    return None if reference.startswith("cleanfid:") else dataset_name_problem(reference, flag)


def samples_folder_problem(folder: str, named: str = "SAMPLES") -> Optional[str]:
    """A folder a command reads (e.g. the samples it measures) that is not there."""
    path = Path(folder).expanduser()
    if path.is_dir():
        return None
    what = "is a file" if path.exists() else "no such folder"
    return f"{named} {folder}: {what}; give the folder of generated images (e.g. from ddpm-sample)."
