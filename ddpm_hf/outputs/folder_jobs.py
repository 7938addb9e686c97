"""Work shared over processes, and the resumable folder jobs built on it (`ddpm-sample`, `ddpm-nll`).

Sharding is per item: process `rank` of `world` handles the items k with k % world == rank, and item k's randomness
comes from its own seed, so a result never depends on the batch size or the number of processes. A folder job
writes one file per item (atomically), so a killed run restarts where it stopped; its protocol (the settings that
make the results what they are) is recorded before the first item, and a rerun with other settings is refused
before any work. One job at a time writes into a folder: its main process holds an OS lock on the folder's hidden
JOB_LOCK file from its check to its summary (released when the process dies, however it dies), so two runs started
together into one folder cannot both write, and both report success.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, List, Optional, Sequence, Tuple

from ddpm_hf.errors import StateError, UsageError
from ddpm_hf.outputs.files import WriteError, atomic_write_json, what_to_do
from ddpm_hf.outputs.folder_lock import FolderLock, holder_record, holder_text

JOB_LOCK = ".ddpm_hf-job"  # hidden: never read as an image, never published; records the process holding it


def handles(k: int, rank: int = 0, world_size: int = 1) -> bool:
    """Whether process `rank` of `world_size` handles item k: the one rule of per-item sharding."""
    return k % world_size == rank


def process_share(num_items: int, rank: int = 0, world_size: int = 1, skip: Collection[int] = ()) -> List[int]:
    """The items k of 0..num_items-1 that process `rank` of `world_size` handles (`handles`), minus `skip` (those
    already done)."""
    return [k for k in range(num_items) if handles(k, rank, world_size) and k not in skip]


def gather_by_index(rows: Sequence[Tuple[int, Any]]) -> List[Any]:
    """Every process's (k, value) rows, gathered on every process and put in order of k: the values."""
    from accelerate.utils import gather_object

    return [value for _, value in sorted(gather_object(list(rows)), key=lambda row: row[0])]


def recorded_protocol(folder: Path, filename: str) -> dict:
    """The protocol recorded in folder/filename: {} where there is none, {"unreadable": True} where it does not parse."""
    path = Path(folder) / filename
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        return {"unreadable": True}


def check_provenance(folder: Path, filename: str, protocol: dict, what: str, redo: str, overwrite: bool = False,
                     free: Sequence[str] = ("pipeline", "num_images")) -> None:
    """Refuse, in one line naming the settings, a folder whose recorded protocol (folder/filename) differs from
    `protocol` in anything but `free` (a path may change; the weights hash says what it holds), unless `overwrite`."""
    if overwrite or not (Path(folder) / filename).is_file():
        return
    recorded = recorded_protocol(folder, filename)
    protocol = json.loads(json.dumps(protocol))  # as it reads back from a file
    differ = sorted(k for k in (set(recorded) | set(protocol)) - set(free) if recorded.get(k) != protocol.get(k))
    if differ:
        raise UsageError(f"{folder} holds {what} with other settings ({', '.join(differ)}); use a new output folder, "
                         f"or --overwrite to {redo}.")


class FolderJob:
    """A resumable job over items 0..N-1 writing into `folder`, shared over the processes of `state` (an accelerate
    PartialState, or None for one process), with its protocol recorded in folder/`protocol_file`.

    Used as a context manager (`with FolderJob(...) as job:`), which releases the folder's lock at the end. Its
    stages, in order: `check` (lock the folder, then refuse other settings, before any heavy work), `start` (the main
    process prepares the folder and records the protocol; all wait), `todo` (this process's items not yet done),
    `bar` (progress), `finish` (all wait; True on the main process, which then writes the summary)."""

    def __init__(self, folder, protocol_file: str, protocol: Optional[dict], state=None,
                 free: Sequence[str] = ("pipeline", "num_images"),
                 results: Callable[[Path], Iterable[Path]] = lambda folder: (),
                 results_are: str = "files named as this command's results",
                 ours: Optional[Callable[[Path], bool]] = None, leaves_lock: bool = True):
        self.folder, self.protocol_file, self.protocol, self.state, self.free = Path(folder), protocol_file, protocol, state, free
        self.results = results  # the files named as this job's results in a folder: ours only beside our protocol
        self.results_are = results_are  # how a refusal calls them
        # whether a folder's results are ours: by default, our protocol file is there (it is written before the first
        # result); a job whose record comes last (protocol None: no settings compared) says what else marks it
        self.ours = ours or (lambda folder: (folder / protocol_file).is_file())
        self.leaves_lock = leaves_lock  # False: the lock file it made goes at the end (a folder that is not only ours)
        self.rank, self.world = (state.process_index, state.num_processes) if state else (0, 1)
        self.is_main = state.is_main_process if state else True
        self.shows_progress = state.is_local_main_process if state else True
        self._folder_lock = FolderLock(self.folder, JOB_LOCK)
        self._started = False  # until then a refused job leaves the folder as it found it

    def __enter__(self) -> "FolderJob":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self, what: str, redo: str, overwrite: bool) -> None:
        """Lock the folder (refused in one line while another run writes there), then refuse a folder whose results
        were made with other settings (see `check_provenance`)."""
        refused = self._lock() if self.is_main else None
        if self.world > 1:  # every process stops on the main one's refusal, not only the main one
            from accelerate.utils import broadcast_object_list

            refused = broadcast_object_list([refused], from_process=0)[0]
        if refused:
            raise StateError(refused)
        self._refuse_foreign_results()
        if self.protocol is not None:
            check_provenance(self.folder, self.protocol_file, self.protocol, what, redo, overwrite, self.free)

    def _refuse_foreign_results(self) -> None:
        """Files named as our results in a folder without our protocol are not ours (the protocol is written before the
        first result): refused by name, never replaced or removed. Checked under the lock, so a folder another job of
        ours is still filling is said to be in use instead."""
        if not self.folder.is_dir() or self.ours(self.folder):
            return
        foreign = sorted(p.name for p in self.results(self.folder))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise UsageError(f"{self.folder} holds {self.results_are} but no {self.protocol_file} ({shown}): they are not "
                             "ours, and are never replaced; choose a new output folder.")

    def _lock(self) -> Optional[str]:
        """Take the folder's lock; the line refusing this run when another process holds it."""
        holder = self._folder_lock.acquire()
        if holder is not None:
            return (f"{self.folder} is in use: another run ({holder_text(holder)}) is writing into it; wait for it to "
                    "end, or choose another output folder.")
        if self._folder_lock.fd is not None:
            self._folder_lock.write(holder_record())
        return None

    def release(self) -> None:
        """Unlock; a job refused before it started leaves the folder as it found it (no lock file or folder of its
        own making, an earlier lock file's bytes as they were)."""
        self._folder_lock.release(abandon=not self._started, tidy=not self.leaves_lock)

    def start(self, results: Iterable[Path] = (), overwrite: bool = False, **recorded: Any) -> None:
        """On the main process: make the folder, remove the earlier `results` when overwriting, record the protocol
        (with `recorded` beside it; none where the job has none); then every process waits for that."""
        if self.is_main:
            self._started = True  # the folder is the job's from here
            self.folder.mkdir(parents=True, exist_ok=True)
            if overwrite:
                for path in results:
                    try:
                        path.unlink(missing_ok=True)
                    except OSError as e:  # a folder (or file) the user made read-only or immutable
                        raise WriteError(f"Cannot remove {path} to start again (--overwrite): {e.strerror or e}; "
                                         f"{what_to_do(e, self.folder, 'output folder')}.") from None
            if self.protocol is not None:
                self.record(**recorded)
        self.wait()

    def recorded(self) -> dict:
        """What the folder's protocol file records now ({} where it has none)."""
        return recorded_protocol(self.folder, self.protocol_file)

    def record(self, **recorded: Any) -> None:
        atomic_write_json(self.folder / self.protocol_file, {**self.protocol, **recorded})

    def todo(self, num_items: int, done: Collection[int] = ()) -> List[int]:
        return process_share(num_items, self.rank, self.world, done)

    def bar(self, total: int, desc: str, unit: str, initial: int = 0):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, disable=not self.shows_progress, unit=unit, desc=desc)

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def finish(self) -> bool:
        """Wait for every process; True on the main process (which then describes the results)."""
        self.wait()
        return self.is_main


class OutputFile:
    """The guarded way to one file a command writes into a folder it does not own (`ddpm-metrics --output`): the
    folder locked as a job's is (so no job of ours writes there meanwhile), the file and the lock not links, a file
    already there replaced only where `is_ours(path)` says we wrote it. Used as a context manager; it leaves the
    folder's lock file as it found it (none where there was none)."""

    def __init__(self, path, is_ours: Callable[[Path], bool], what: str, flag: str):
        self.path, self.is_ours, self.what, self.flag = Path(path), is_ours, what, flag
        self._lock = FolderLock(self.path.parent, JOB_LOCK, what=what, links_among=(JOB_LOCK, self.path.name))

    def __enter__(self) -> "OutputFile":
        holder = self._lock.acquire()
        if holder is not None:
            raise StateError(f"{self.path.parent} is in use: another run ({holder_text(holder)}) is writing into it; "
                             f"wait for it to end, or choose another {self.flag}.")
        try:
            if self._lock.fd is not None:
                self._lock.write(holder_record())
            if self.path.exists() and not self.is_ours(self.path):
                raise UsageError(f"{self.path} is not ours (not a record {self.what} wrote), and is never replaced; "
                                 f"choose another {self.flag}.")
        except BaseException:
            self._lock.release(abandon=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release(abandon=True)
