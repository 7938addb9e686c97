"""One writer per folder: an OS lock (`fcntl.flock`) on the folder itself, and a hidden file of the folder recording the
process holding it. The OS releases a lock when its process dies, however it dies, so a lock is never stale. A
training run's folder (`RUN_MARKER`, training.run_guard) and a folder job's (`JOB_LOCK`, folder_jobs) are both taken
with it: it is the one guarded way into every folder ddpm_hf writes.

The lock is on the folder, not on the file: a file can be deleted or swapped from under its lock (a second writer would
then lock a new file and run beside the first), a folder open in a process cannot. Links in the folder are refused
before anything is written (a link would take a write outside it), and the record file is opened without following
one.

Taking a lock may create the folder and the file; a writer refused or stopped before it started
(`release(abandon=True)`) leaves the folder as it found it: no folder or file of its own making, and a file it found
holding the bytes it held.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ddpm_hf.outputs.files import refuse_linked_names, refuse_links


def holder_record(**more) -> dict:
    """What a lock file records of the process that holds it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), **more}


def holder_text(holder: dict) -> str:
    """The holder of a lock, as the refusal names it: `process PID on HOST, since WHEN`."""
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"


class FolderLock:
    """The lock of `folder`/`name`; `named` is how a message names the folder (a flag and its value, say)."""

    def __init__(self, folder, name: str, named: Optional[str] = None, what: str = "this command",
                 links_among: Optional[Sequence[str]] = None):
        self.folder = Path(folder)
        # None: a link anywhere in the folder is refused (a folder we write into); names: only those are (a folder of
        # the user's, e.g. where ddpm-metrics --output puts one file, is not walked)
        self.links_among = links_among
        self.path = self.folder / name
        self.named = named or str(self.folder)
        self.what = what
        self.fd: Optional[int] = None
        self.folder_fd: Optional[int] = None  # the folder itself, open and locked while held
        self.made_folders: List[Path] = []  # the folders taking the lock made, deepest first
        self.made_file = False
        self.found = b""  # the file's bytes as found: what an abandoned writer puts back
        self.wrote = False

    def acquire(self) -> Optional[dict]:
        """Make the folder and the file where missing, and lock the file without waiting. None when taken; the
        holder's record when another process holds it (then nothing is held, and nothing was made)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock; the callers' folder checks still hold
            return None
        if self.links_among is None:
            refuse_links(self.folder, self.what)  # before anything is made or written there
        else:
            refuse_linked_names(self.folder, self.links_among, self.what)
        try:
            self.made_folders = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            holder = self._lock_folder(fcntl)
            if holder is not None:
                self._remove_made()
                return holder
            self.made_file = not os.path.lexists(self.path)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            self._unlock_folder(fcntl)
            self._remove_made()
            message = f"Cannot write to {self.named} ({e.strerror or e}); choose a folder you can write to."
            raise OSError(message) from None
        except BaseException:  # a signal while making the folder or the file: neither is left behind
            self.release(abandon=True) if self.fd is not None else (self._unlock_folder(fcntl), self._remove_made())
            raise
        self.found = _read_all(self.fd)
        return None

    def _lock_folder(self, fcntl) -> Optional[dict]:
        """Lock the folder itself (flock belongs to an open file: two locks of one process contend as two processes
        do); the holder's record (what the file says, {} where nothing) when another holds it."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return self.read()
        except BaseException:  # a signal while taking the lock (StopSignals raises from its handler)
            os.close(fd)
            raise
        self.folder_fd = fd
        return None

    def _unlock_folder(self, fcntl) -> None:
        if self.folder_fd is not None:
            fcntl.flock(self.folder_fd, fcntl.LOCK_UN)
            os.close(self.folder_fd)
            self.folder_fd = None

    def read(self) -> dict:
        """What the file records now ({} where it records nothing readable)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return {}
        try:
            return json.loads(_read_all(fd).decode() or "{}")
        except ValueError:
            return {}
        finally:
            os.close(fd)

    def write(self, record: dict) -> None:
        """Replace what the held file records (fsynced: the record of a run killed right after is this one)."""
        self.wrote = True
        if not self._still_in_place():  # deleted or replaced while held: the record goes back in its place
            os.close(self.fd)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        self._put(json.dumps(record).encode())

    def _still_in_place(self) -> bool:
        try:
            here, held = os.lstat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _put(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self, abandon: bool = False, tidy: bool = False) -> None:
        """Unlock. `abandon`: the writer never started, so the folder is left as it was found. `tidy`: a lock file
        this lock made goes too (a command whose results need no lock file between runs)."""
        if self.fd is None:
            return
        import fcntl

        if (abandon or tidy) and self.made_file:  # removed while still held: no other writer can have taken it meanwhile
            self.path.unlink(missing_ok=True)
        elif abandon and self.wrote:  # a file found is left as it was, byte for byte
            self._put(self.found)
        os.close(self.fd)
        self.fd = None
        self._unlock_folder(fcntl)
        if abandon:
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in self.made_folders:
            if not folder.is_dir() or any(folder.iterdir()):  # something else was written there meanwhile: kept
                break
            folder.rmdir()
        self.made_folders = []


def _read_all(fd: int) -> bytes:
    """Every byte of an open file, from its start."""
    chunks, offset = [], 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)
