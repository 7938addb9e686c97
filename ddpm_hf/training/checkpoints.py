"""Checkpoints: writing, verifying, listing, rotating, and finding the one to resume from.

A checkpoint is a folder `checkpoint-<step>/` (or `best_checkpoint/`, outside the rotation) holding the UNet and EMA
weights (safetensors), the optimizer state (loaded with weights_only), the run's configs, and, written last,
`trainer_state.json`: the step, the TrainState and the SHA-256 of every other file. The folder is written under a
temporary name and renamed into place, so a checkpoint under its final name is always complete; a resume verifies
the hashes and skips (or refuses) a damaged one.

Importing this module is light (torch loads on first use): the command lines read checkpoints before torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

from ddpm_hf.errors import MissingError, StateError, UsageError, first_line
from ddpm_hf.outputs.files import remove_atomically, replace_dir, sha256_of, tmp_sibling, what_to_do
from ddpm_hf.outputs.run_folder import (
    CHECKPOINT_EMA,
    checkpoint_folders,
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_PREFIX,
    CHECKPOINT_UNET,
    list_checkpoints,
    named_checkpoint,
    named_step,
    TRAINER_STATE,
)

REQUIRED_FILES = (CHECKPOINT_UNET, CHECKPOINT_EMA, CHECKPOINT_OPTIMIZER)
# what a resume reads from trainer_state.json besides the step and the hashes
REQUIRED_STATE = ("lr_scheduler", "ema")
STATE_HASH = "state_sha256"  # trainer_state.json's own contents (all but this key), so that they are covered too


class CheckpointError(StateError):
    """A checkpoint that cannot be written or used: one line saying which, why, and what to do."""


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step}"


def state_sha256(state: dict) -> str:
    """SHA-256 of a trainer state's contents, all but its own hash, in a canonical JSON form."""
    body = {k: v for k, v in state.items() if k != STATE_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _contiguous(state):
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(output_dir: Path, step: int, unet, ema_model, optimizer, trainer_state: dict,
                    name: Optional[str] = None, extra_files: Optional[Dict[str, str]] = None,
                    averages: Optional[Dict[str, object]] = None) -> Path:
    """Write checkpoint-<step>/ (or `name`/): UNet and EMA weights as safetensors, `averages` ({file name: model},
    e.g. --ema_posthoc's power EMAs) as safetensors too, optimizer state, `extra_files` ({name: text}, e.g. the run's
    configs), and last trainer_state.json holding the step and the SHA-256 of every other file.
    Written under a temporary name and renamed into place; non-finite weights are refused, and a failed write
    (a full disk) removes its temporary and leaves the previous checkpoints as they were."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from ddpm_hf.saved.weights import refuse_unsound_weights

    final = Path(output_dir) / (name or checkpoint_name(step))
    refuse_unsound_weights({"UNet": unet, "EMA": ema_model, **(averages or {})}, final.name, step=step,
                           advice="resume from the last checkpoint with a lower --learning_rate")
    tmp = tmp_sibling(final)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(unet.state_dict()), str(tmp / CHECKPOINT_UNET))
        save_file(_contiguous(ema_model.state_dict()), str(tmp / CHECKPOINT_EMA))
        for filename, model in (averages or {}).items():
            save_file(_contiguous(model.state_dict()), str(tmp / filename))
        optimizer_state = optimizer.state_dict()
        optimizer_state["param_groups"] = plain_numbers(optimizer_state["param_groups"])
        torch.save(optimizer_state, tmp / CHECKPOINT_OPTIMIZER)
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text + "\n")
        files = {p.name: sha256_of(p) for p in sorted(tmp.iterdir())}
        state = {**trainer_state, "step": step, "files": files}
        with open(tmp / TRAINER_STATE, "w") as f:  # written last: its presence marks a complete checkpoint
            json.dump({**state, STATE_HASH: state_sha256(state)}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error type
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else _io_reason(e)
        raise CheckpointError(f"Cannot write the checkpoint {final} ({reason}); "
                              f"{what_to_do(e, final.parent, '--output_dir')}, then resume (the earlier checkpoints are "
                              "intact).") from None
    return final


def _io_reason(error: Exception) -> str:
    text = str(error)
    return "No space left on device" if "StorageFull" in text or "No space" in text else text.splitlines()[0][:120]


def checkpoint_problem(folder: Path, required: Sequence[str] = ()) -> Optional[str]:
    """Why `folder` cannot be resumed from (its state missing, damaged, changed since it was written, naming another
    step than the folder, or without the `required` entries; a file missing or not matching its SHA-256), or None
    when it is intact."""
    state_path = Path(folder) / TRAINER_STATE
    if not state_path.is_file():
        return f"no {TRAINER_STATE}"
    try:
        state = json.loads(state_path.read_text())
        step = state["step"]
    except (ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is damaged"
    if STATE_HASH in state and state[STATE_HASH] != state_sha256(state):
        return f"{TRAINER_STATE} does not match its SHA-256 (it was changed after it was written)"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"{TRAINER_STATE} holds step {step!r}, not a step count"
    named = named_step(folder)
    if named is not None and named != step:
        return f"{TRAINER_STATE} says step {step}, but the folder is {Path(folder).name}"
    missing = [key for key in required if key not in state]
    if missing:
        return f"{TRAINER_STATE} is incomplete (no {', '.join(missing)})"
    files = state.get("files") or {}
    for name in sorted(set(files) | set(REQUIRED_FILES)):
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if name in files and sha256_of(path) != files[name]:
            return f"{name} does not match its SHA-256"
    return None


def resolve_checkpoint(output_dir: Path, which: Optional[str], warn: Callable[[str], None] = lambda message: None
                       ) -> Optional[Path]:
    """The checkpoint to resume from, verified against its hashes: `latest` (the newest intact one in output_dir;
    damaged ones are skipped and named through `warn`; None if output_dir has none at all) or a folder."""
    if which is None:
        return None
    if which == "latest":
        folders = checkpoint_folders(output_dir)
        readable = [folder for _, folder in reversed(list_checkpoints(output_dir))]  # newest first, by their step
        # a checkpoint whose state does not read has no step to order it by: it is named first
        skipped = [f"{f.name} ({checkpoint_problem(f, REQUIRED_STATE)})" for f in sorted(set(folders) - set(readable))]
        for folder in readable:
            problem = checkpoint_problem(folder, REQUIRED_STATE)
            if problem is None:
                if skipped:
                    warn(f"Skipped damaged checkpoints: {'; '.join(skipped)}. Resuming from {folder.name}.")
                return folder
            skipped.append(f"{folder.name} ({problem})")
        if skipped:
            raise CheckpointError(f"{output_dir} holds checkpoints but none is intact: {'; '.join(skipped)}. Move them away "
                                  "to start over, or resume from a copy with --resume_from_checkpoint PATH.")
        return None
    path = named_checkpoint(output_dir, which)
    if not (path / TRAINER_STATE).is_file():
        raise MissingError(f"--resume_from_checkpoint {which}: no {TRAINER_STATE} there; give a checkpoint-* folder or 'latest'.")
    problem = checkpoint_problem(path, REQUIRED_STATE)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {which}: {problem}, so the checkpoint is damaged; resume from "
                              "another one (--resume_from_checkpoint latest takes the newest intact one).")
    return path


def checkpoint_step(folder: Path) -> int:
    """The step a checkpoint (verified by `resolve_checkpoint`) was written after."""
    return int(json.loads((Path(folder) / TRAINER_STATE).read_text())["step"])


def refuse_resume_past_end(checkpoint: Path, which: str, total_steps: int, limit: str) -> None:
    """A resume from a checkpoint past this run's last step would train nothing and then publish the checkpoint's
    weights under this run's step count: refused, before any work."""
    step = checkpoint_step(checkpoint)
    if step > total_steps:
        raise UsageError(f"--resume_from_checkpoint {which}: {checkpoint.name} is at step {step}, past this run's "
                         f"{total_steps} steps ({limit}), so nothing is trained or written; give --max_train_steps "
                         f"above {step} to train on from it, or resume from an earlier checkpoint.")


def checkpoint_to_resume(output_dir: Path, which: Optional[str], overwrite: bool,
                         warn: Callable[[str], None] = lambda message: None) -> Optional[Path]:
    """`resolve_checkpoint`, after refusing a fresh start (`which` None) in a folder that holds checkpoints unless
    `overwrite`: a run never starts over silently. The optimizer state of the one found is read once (memory-mapped)
    so that a file a safe load refuses is refused here, before the data and the model."""
    if which is None:
        existing = [f.name for f in checkpoint_folders(output_dir)]
        if existing and not overwrite:
            raise UsageError(f"{output_dir} already holds a run ({', '.join(existing)}): pass --resume_from_checkpoint "
                             "latest to carry on, --overwrite_output_dir to start over there, or another --output_dir.")
        return None
    checkpoint = resolve_checkpoint(output_dir, which, warn)
    if checkpoint is not None:
        _load_optimizer_state(checkpoint, mmap=True)
    return checkpoint


def _load_optimizer_state(folder: Path, mmap: bool = False):
    """The optimizer state, loaded with weights_only (tensors, numbers and containers only)."""
    import pickle

    import torch

    try:
        return torch.load(folder / CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        # torch's own message suggests turning the safe load off: never repeat that for a file we did not write
        raise CheckpointError(f"{folder / CHECKPOINT_OPTIMIZER} holds objects that a safe load refuses (not only tensors "
                              "and numbers), so ddpm_hf did not write it or it was changed; resume from another "
                              "checkpoint.") from None


OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # torch.optim's per-group switches


def load_checkpoint(folder: Path, unet, ema_model, optimizer, averages: Optional[Dict[str, object]] = None) -> dict:
    """Load weights (safetensors; `averages` as `save_checkpoint` takes them) and optimizer state (weights_only) into
    the given objects; return trainer_state."""
    from safetensors.torch import load_file

    try:
        unet.load_state_dict(load_file(str(folder / CHECKPOINT_UNET)))
        ema_model.load_state_dict(load_file(str(folder / CHECKPOINT_EMA)))
        for filename, model in (averages or {}).items():
            model.load_state_dict(load_file(str(folder / filename)))
        # how the optimizer runs is this machine's (fused and capturable in a CUDA graph, foreach elsewhere), not the
        # checkpoint's: a state saved on a GPU resumes on a CPU
        runs_as = [{k: g[k] for k in OPTIMIZER_IMPLEMENTATION if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(_load_optimizer_state(folder))
        for group, flags in zip(optimizer.param_groups, runs_as):
            group.update(flags)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{folder} does not fit this network or optimizer ({first_line(e, limit=200)}); "
                              "resume with the settings it was trained with.") from None
    return json.loads((folder / TRAINER_STATE).read_text())


def rotate_checkpoints(output_dir: Path, limit: Optional[int], keep: Sequence[Path] = ()) -> None:
    """Keep the newest `limit` checkpoints. Each one removed is first renamed to a temporary name: a kill while
    removing leaves only a temporary, which the next start cleans up, never a half-removed checkpoint-N/."""
    if not limit:
        return
    found = [f for _, f in list_checkpoints(output_dir) if f not in keep]
    for folder in found[: max(0, len(found) - limit)]:
        remove_atomically(folder)


def plain_numbers(value):
    """`value` with its 0-d tensors as Python numbers, through dicts and lists. A step replayed as a CUDA graph holds its
    learning rate in a device tensor (step_graph.py); a checkpoint saves the number (in the optimizer's groups and the
    LR schedule's state), which JSON can hold and any device resumes."""
    import torch

    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_numbers(v) for v in value)
    return value
