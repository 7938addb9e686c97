"""Atomic file writing and file hashes: every file and folder we write appears whole under its final name or not
at all.

A file is written under a hidden temporary name beside its target (`.NAME.tmp-XXXXXXXX`), flushed, and renamed into
place; a crash or kill leaves only a temporary, which `remove_stale_temporaries` cleans on the next start.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from ddpm_hf.errors import StateError, UserError


def tmp_sibling(path: Path) -> Path:
    """A hidden temporary name beside `path` (.NAME.tmp-XXXXXXXX): written there, then renamed into place."""
    path = Path(path)
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


class WriteError(UserError, OSError):
    """A file that could not be written (a full disk, a read-only folder): one line naming it and what to do."""


def atomic_write(path: Path, write) -> None:
    """Run `write(tmp)` on a temporary beside `path`, then rename it into place; a failure removes the temporary and
    is one line naming `path`."""
    tmp = tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"Cannot write {path} ({e.strerror or e}); {what_to_do(e, Path(path).parent)} (what was "
                         "written before is intact).") from None


def what_to_do(error: BaseException, folder: Path, other: str = "folder") -> str:
    """The fix for a failed write, by its cause: permission for a refused one, else space (a full disk; safetensors
    says so in its own error type)."""
    if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {folder} writable for this user, or choose another {other}"
    return f"free space in {folder} or choose another {other}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(Path(path), write)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_image(image, path: Path, format: str = "PNG") -> None:
    """A PIL image, saved atomically."""
    atomic_write(Path(path), lambda tmp: image.save(tmp, format=format))


def atomic_save_figure(fig, path: Path) -> None:
    """A matplotlib figure as PNG, saved atomically, then closed."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


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


def links_in(folder: Path) -> list:
    """Every symbolic link inside `folder`, relative to it, none followed (a linked folder is listed, not entered)."""
    folder, found = Path(folder), []
    for root, dirs, files in os.walk(folder):
        found += [str((Path(root) / name).relative_to(folder)) for name in dirs + files
                  if (Path(root) / name).is_symlink()]
    return sorted(found)


def refuse_links(folder: Path, what: str) -> None:
    """A run folder's writes and pushes never go through a link: a link there (a folder copied with its links, a
    shared scratch folder) would take them outside the folder, or publish any file under an allowed name."""
    folder = Path(folder)
    _refuse(folder, links_in(folder) if folder.is_dir() else [], what)


def refuse_linked_names(folder: Path, names, what: str) -> None:
    """As `refuse_links`, for the entries `names` of `folder` only (the files a command writes into a folder it does
    not own)."""
    folder = Path(folder)
    _refuse(folder, sorted(name for name in names if (folder / name).is_symlink()), what)


def _refuse(folder: Path, links: list, what: str) -> None:
    if links:
        shown = ", ".join(f"{name} -> {os.readlink(folder / name)}" for name in links[:3])
        more = f" and {len(links) - 3} more" if len(links) > 3 else ""
        raise StateError(f"{folder} holds links ({shown}{more}); {what} neither writes nor publishes through a link, "
                         "which leads outside the folder: replace each with what it points to (cp -rL), or choose "
                         "another folder.")
