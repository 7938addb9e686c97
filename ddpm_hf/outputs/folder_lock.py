"""One writer per folder: an OS lock (`fcntl.flock`) on a hidden file of the folder, which records the process holding
it. The OS releases a lock when its process dies, however it dies, so a lock is never stale. A training run's folder
(`RUN_MARKER`, training.run_guard) and a folder job's (`JOB_LOCK`, folder_jobs) are both taken with it.

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
from typing import List, Optional


def holder_record(**more) -> dict:
    """What a lock file records of the process that holds it."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"), **more}


def holder_text(holder: dict) -> str:
    """The holder of a lock, as the refusal names it: `process PID on HOST, since WHEN`."""
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"


class FolderLock:
    """The lock of `folder`/`name`; `named` is how a message names the folder (a flag and its value, say)."""

    def __init__(self, folder, name: str, named: Optional[str] = None):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.named = named or str(self.folder)
        self.fd: Optional[int] = None
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
        try:
            self.made_folders = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
            self.folder.mkdir(parents=True, exist_ok=True)
            self.made_file = not self.path.is_file()
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._remove_made()
            message = f"Cannot write to {self.named} ({e.strerror or e}); choose a folder you can write to."
            raise OSError(message) from None
        except BaseException:  # a signal while making the folder or the file: neither is left behind
            self.release(abandon=True) if self.fd is not None else self._remove_made()
            raise
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self.read()
            os.close(self.fd)
            self.fd = None
            return holder
        except BaseException:  # a signal while taking the lock (StopSignals raises from its handler)
            self.release(abandon=True)
            raise
        self.found = os.pread(self.fd, 1 << 16, 0)
        return None

    def read(self) -> dict:
        """What the file records now ({} where it records nothing readable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def write(self, record: dict) -> None:
        """Replace what the held file records (fsynced: the record of a run killed right after is this one)."""
        self.wrote = True
        self._put(json.dumps(record).encode())

    def _put(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def release(self, abandon: bool = False) -> None:
        """Unlock. `abandon`: the writer never started, so the folder is left as it was found."""
        if self.fd is None:
            return
        import fcntl

        if abandon and self.made_file:  # removed while still held: no other writer can have taken it meanwhile
            self.path.unlink(missing_ok=True)
        elif abandon and self.wrote:  # a file found is left as it was, byte for byte
            self._put(self.found)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
        if abandon:
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in self.made_folders:
            if not folder.is_dir() or any(folder.iterdir()):  # something else was written there meanwhile: kept
                break
            folder.rmdir()
        self.made_folders = []
