"""Atomic file writing and file hashes: every file and folder we write appears whole under its final name or not
at all.

A file is written under a hidden temporary name beside its target (`.NAME.tmp-XXXXXXXX`), flushed, and renamed into
place; a crash or kill leaves only a temporary, which `remove_stale_temporaries` cleans on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path


def tmp_sibling(path: Path) -> Path:
    """A hidden temporary name beside `path` (.NAME.tmp-XXXXXXXX): written there, then renamed into place."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = tmp_sibling(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_image(image, path: Path, format: str = "PNG") -> None:
    """A PIL image, saved atomically."""
    path = Path(path)
    tmp = tmp_sibling(path)
    image.save(tmp, format=format)
    os.replace(tmp, path)


def atomic_save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG, saved atomically, then closed."""
    import matplotlib.pyplot as plt

    tmp = tmp_sibling(Path(path))
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`. A reader sees the old `dst` or the new one, never a mix;
    if `dst` exists it is moved aside first and removed after."""
    old = None
    if dst.exists():
        old = tmp_sibling(dst)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove half-written files and folders left by a crash or kill (named .NAME.tmp-XXXX)."""
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def remove_atomically(path: Path) -> None:
    """Remove a file or folder by renaming it to a temporary first: a kill while removing leaves only a temporary,
    which the next start cleans up, never a half-removed folder under its own name."""
    doomed = tmp_sibling(Path(path))
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True) if doomed.is_dir() else doomed.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
