"""What guards a training run: its folder (one run at a time, and a new run only where it overwrites nothing but an
earlier run of ours), and its end (a signal stops it at a step boundary, with a checkpoint).

The folder's hidden marker file (`run_folder.RUN_MARKER`) is locked for the whole run (`outputs.folder_lock`, an OS
file lock) and records the process holding it. The OS releases a lock when its process dies, however it dies, so a
lock is never stale: a run that finds the marker unlocked but saying "running" knows the earlier run was killed, says
so, and takes over. The marker stays after the run: it tells a folder we wrote from a folder of the user's.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ddpm_hf.errors import StateError, StopRequested, UsageError
from ddpm_hf.outputs.folder_lock import FolderLock, holder_record, holder_text
from ddpm_hf.outputs.run_folder import (
    BEST_CHECKPOINT,
    CHECKPOINT_FILES,
    CHECKPOINT_PREFIX,
    MODEL_CARD,
    MODEL_INDEX,
    PIPELINE_HASHES,
    RUN_MARKER,
    SAMPLE_GRIDS_DIR,
    SCHEDULER_CONFIG,
    SCHEDULER_DIR,
    TRAINER_STATE,
    TRAINING_CONFIG,
    UNET_CONFIG,
    UNET_DIR,
    UNET_WEIGHTS,
)

_HELD: Dict[Path, "RunFolderLock"] = {}  # the locks this process holds, by folder


class RunFolderLock:
    """The lock of one run folder (its `RUN_MARKER`, an `outputs.folder_lock.FolderLock`), held from `acquire` to
    `release` (also released when the process dies); the marker says whether the run is running or ended."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / RUN_MARKER
        self.lock = FolderLock(self.folder, RUN_MARKER, named=f"--output_dir {self.folder}", what="training")
        self.had_marker = False

    def acquire(self, warn: Callable[[str], None] = lambda message: None) -> "RunFolderLock":
        """Make the folder if needed and lock it; refuse, in one line naming the holder, a folder another run holds."""
        earlier_here = _HELD.get(self.path.resolve())
        if earlier_here is not None:  # a run of this very process that was never ended (set up, then dropped)
            earlier_here.release()
        self.had_marker = self.path.is_file()
        holder = self.lock.acquire()
        if holder is not None:
            raise StateError(f"{self.folder} is in use by another training run ({holder_text(holder)}); wait for it to "
                             "end, or choose another --output_dir.")
        if self.lock.fd is None:  # not POSIX: no lock, the folder checks still hold
            return self
        try:
            earlier = self.lock.read()
            if earlier.get("state") == "running":
                warn(f"{self.folder}: the run of {holder_text(earlier)}, stopped without ending (killed?); this run "
                     "takes the folder over.")
            self.lock.write(holder_record(state="running"))
            _HELD[self.path.resolve()] = self
        except BaseException:  # a signal while taking the folder over: it is left as it was found
            self.release(abandon=True)
            raise
        return self

    def release(self, abandon: bool = False) -> None:
        """Unlock; `abandon`: the run never started (it was refused), so leave the folder as it was found: no marker
        where there was none, no folder where there was none, a marker found byte for byte."""
        if self.lock.fd is None:
            return
        if not abandon:
            self.lock.write({**self.lock.read(), "state": "ended", "ended": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.lock.release(abandon)
        _HELD.pop(self.path.resolve(), None)


def folder_entries(folder: Path) -> List[str]:
    """What a folder holds besides our marker and hidden temporaries."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in Path(folder).iterdir()
                  if p.name != RUN_MARKER and not p.name.startswith("."))


def not_ours(folder: Path, had_marker: bool) -> List[str]:
    """What in a folder a ddpm_hf run did not write: nothing in a folder with our marker or (written before the marker
    existed) a run's training_config.json, ours by its content (another tool's file of that name is the user's);
    elsewhere everything, names of a run's products (logs/, samples/, checkpoint-*) included: a run writes its marker
    before any of them, so a folder without it never held one of ours."""
    from ddpm_hf.recipes.config import saved_by_us

    if had_marker or saved_by_us(Path(folder) / TRAINING_CONFIG):
        return []
    return folder_entries(folder)


def _listed(names: List[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_fresh_start(folder: Path, had_marker: bool, overwrite: bool) -> None:
    """A new run (no resume) starts in an empty folder, in an earlier run of ours that saved nothing yet (no
    checkpoint, no pipeline), or with --overwrite_output_dir over an earlier run of ours. A folder holding anything
    else is refused, with or without the flag: its files are never written over."""
    entries = folder_entries(folder)
    if not entries:
        return
    strange = not_ours(folder, had_marker)
    if strange:
        shown = _listed(strange)
        raise UsageError(f"--output_dir {folder} holds files that ddpm_hf did not write ({shown}); a run would write its "
                         "pipeline and model card over them, so it is refused (--overwrite_output_dir clears only an "
                         "earlier ddpm_hf run): choose a new or empty --output_dir.")
    if not overwrite and (any(e.startswith(CHECKPOINT_PREFIX) for e in entries) or (Path(folder) / MODEL_INDEX).is_file()):
        shown = _listed(entries)
        checkpoints = [e for e in entries if e.startswith(CHECKPOINT_PREFIX)]
        how = "pass --resume_from_checkpoint latest to carry on, " if checkpoints else ""
        raise UsageError(f"{folder} already holds a run ({shown}): {how}--overwrite_output_dir to start over there, or "
                         "another --output_dir.")


def user_files_in_run(folder: Path, overwrite: bool) -> List[str]:
    """The user's files inside an earlier run of ours that this run would delete or write over: in the pipeline's
    unet/ and scheduler/ (replaced whole when the pipeline is saved) what its PIPELINE_HASHES does not list; in a
    checkpoint (rotated away, replaced, or cleared by --overwrite_output_dir) what its trainer_state.json does not
    list; a README.md that is not the card as we wrote it (`run_folder.card_is_ours`); with `overwrite`, what in
    samples/ is not a grid of ours. logs/ is the tracker's, whose file names are its own."""
    from ddpm_hf.outputs.run_folder import card_is_ours

    folder = Path(folder)
    found: List[str] = []

    def unlisted(sub: Path, listed) -> None:
        if sub.is_dir() and not sub.is_symlink():
            found.extend(p.relative_to(folder).as_posix() for p in sorted(sub.rglob("*"))
                         if not p.is_dir() and p.relative_to(sub).as_posix() not in listed)

    hashes = _json_keys(folder / PIPELINE_HASHES)
    for sub in (UNET_DIR, SCHEDULER_DIR):
        saved = {UNET_CONFIG, UNET_WEIGHTS, SCHEDULER_CONFIG, *hashes}
        unlisted(folder / sub, {name[len(sub) + 1:] for name in saved if name.startswith(f"{sub}/")})
    for checkpoint in sorted([*folder.glob(f"{CHECKPOINT_PREFIX}*"), folder / BEST_CHECKPOINT]):
        unlisted(checkpoint, {*(_json_keys(checkpoint / TRAINER_STATE, "files") or CHECKPOINT_FILES), TRAINER_STATE})
    card = folder / MODEL_CARD
    if card.is_file() and not card_is_ours(card):
        found.append(f"{MODEL_CARD} (not the card ddpm_hf wrote)")
    if overwrite:
        grids = folder / SAMPLE_GRIDS_DIR
        unlisted(grids, {p.name for p in grids.glob("step-*.png") if p.is_file()} if grids.is_dir() else set())
    return found


def _json_keys(path: Path, key: Optional[str] = None) -> List[str]:
    """The keys of the JSON object in `path` (of its `key` entry); none where it does not read."""
    try:
        value = json.loads(path.read_text())
        value = value.get(key) if key is not None else value
        return list(value) if isinstance(value, dict) else []
    except (OSError, ValueError, AttributeError):
        return []


def check_user_files(folder: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse, in one line naming them, to start where this run would delete or write over the user's files inside an
    earlier run of ours (`user_files_in_run`): they are moved out by the user, never lost."""
    found = user_files_in_run(folder, overwrite)
    if found:
        what = "--overwrite_output_dir" if overwrite else ("this resume" if resuming else "this run")
        raise StateError(f"--output_dir {folder} holds files of yours inside its earlier run ({_listed(found)}), which "
                         f"{what} may delete or write over, so it is refused; move them out of the folder, then run "
                         "the same command again.")


STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # a scheduler's or spot instance's notice, Ctrl-C, a user's request


class RunStopped(Exception):
    """The run stopped on a signal after writing a checkpoint; the command exits with the signal's code. `resume` is
    the command that carries on (a caller that runs training rounds of its own names its own command instead)."""

    def __init__(self, stopped: str, signum: int, resume: str):
        super().__init__(f"{stopped}; resume with {resume}.")
        self.stopped, self.signum, self.exit_code = stopped, signum, 128 + signum

    def resumed_by(self, resume: str) -> "RunStopped":
        return RunStopped(self.stopped, self.signum, resume)


class StopSignals:
    """While inside: SIGTERM, SIGINT or SIGUSR1 asks the run to stop at the next step boundary (`received` holds the
    signal; the loop then checkpoints and raises RunStopped). A second signal stops at once, as it would have, unless
    it is the same signal within `same_notice` seconds: a launcher (torchrun) forwards to its workers the SIGTERM that
    a scheduler also sent them, and that copy must not cut the checkpoint short.

    While `before_training` is set (what the run is doing before its first step: decoding the data, timing the
    precision), there is no step boundary to wait for and nothing to checkpoint: a signal stops the run at once with
    StopRequested saying so (the setup's own cleanup then leaves the folder as it was found)."""

    def __init__(self, same_notice: float = 2.0, before_training: Optional[str] = None):
        self.received: Optional[int] = None
        self.same_notice, self._at = same_notice, 0.0
        self._previous: Dict[int, object] = {}
        self.before_training = before_training

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python takes handlers in the main thread only
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    signum = getattr(signal, name)
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.before_training is not None and self.received is None:
            self.received, self._at = signum, time.monotonic()
            raise StopRequested(f"{signal.Signals(signum).name} received while {self.before_training}, before the first "
                             "training step: nothing was trained, and the output folder is as it was; run the same "
                             "command again to start.", signum)
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            return
        if signum == self.received and time.monotonic() - self._at < self.same_notice:
            return  # the same notice, forwarded
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__(None, None, None)
        if callable(previous):
            previous(signum, frame)  # Python's own SIGINT handler: KeyboardInterrupt
        else:
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
