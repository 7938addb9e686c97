"""What identifies data by its content rather than its name: caches and recorded protocols carry these, so that a
file rewritten with other images under the same name is measured afresh instead of answered from what it held before.

Two kinds, by cost: a source's fingerprint (the paths, sizes and modification times of every file a local --dataset
reads: cheap for any size of data, and changed by any rewrite, copy or addition), and the SHA-256 of decoded images
(the pixels themselves, for results kept per image).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ddpm_hf.choices import BUILTIN_DATASETS
from ddpm_hf.data.sources import local_data_files


def files_fingerprint(files: Iterable[str], root) -> dict:
    """{"files", "bytes", "fingerprint"} of `files` under `root`: the fingerprint hashes each one's path (relative to
    root), size and modification time, in sorted order."""
    digest, count, total = hashlib.sha256(), 0, 0
    for name in sorted(map(str, files)):
        stat = os.stat(name)
        digest.update(f"{os.path.relpath(name, root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        count, total = count + 1, total + stat.st_size
    return {"files": count, "bytes": total, "fingerprint": digest.hexdigest()[:16]}


def source_fingerprint(dataset: str) -> Optional[dict]:
    """The fingerprint of the files a local `dataset` (anything --dataset takes) reads; None for the built-in set and
    a Hub dataset, which are named by their id (a Hub dataset's revision is the Hub's)."""
    path = Path(dataset).expanduser()
    if dataset in BUILTIN_DATASETS or not path.exists():
        return None
    _, files = local_data_files(path) or (None, [])
    return files_fingerprint(files, path if path.is_dir() else path.parent)


def image_sha256(image: np.ndarray) -> str:
    """The SHA-256 of a decoded image's pixels (uint8, with its shape), as the model sees them."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    return hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()


def images_sha256(hashes: Iterable[str]) -> str:
    """One SHA-256 for an ordered set of images, from theirs."""
    return hashlib.sha256("".join(hashes).encode()).hexdigest()
