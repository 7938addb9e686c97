"""What a run writes: atomic files and folders, checkpoints, sample grids, the loss curve, the pipeline."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"


def tmp_sibling(path: Path) -> Path:
    """A hidden temporary name beside `path` (.NAME.tmp-XXXXXXXX): written there, then renamed into place."""
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


def atomic_save_image(image, path: Path) -> None:
    path = Path(path)
    tmp = tmp_sibling(path)
    image.save(tmp, format="PNG")
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


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and bytes, in name order): the same for the same
    weights whatever file format they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def check_provenance(folder: Path, filename: str, protocol: dict, what: str, redo: str, overwrite: bool = False,
                     free: Sequence[str] = ("pipeline", "num_images")) -> None:
    """Refuse, in one line naming the settings, a folder whose recorded protocol (folder/filename) differs from
    `protocol` in anything but `free` (a path may change; the weights hash says what it holds), unless `overwrite`."""
    path = Path(folder) / filename
    if overwrite or not path.is_file():
        return
    try:
        recorded = json.loads(path.read_text())
    except ValueError:
        recorded = {"unreadable": True}
    protocol = json.loads(json.dumps(protocol))  # as it reads back from a file
    differ = sorted(k for k in (set(recorded) | set(protocol)) - set(free) if recorded.get(k) != protocol.get(k))
    if differ:
        raise ValueError(f"{folder} holds {what} with other settings ({', '.join(differ)}); use a new output folder, "
                         f"or --overwrite to {redo}.")


def remove_stale_temporaries(folder: Path) -> None:
    """Remove half-written files and folders left by a crash or kill (named .NAME.tmp-XXXX)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used: one line saying which, why, and what to do."""


class NonFiniteWeightsError(RuntimeError):
    """Weights that are not finite: never written as a checkpoint or a pipeline."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_are_finite(module: torch.nn.Module) -> bool:
    tensors = [p for p in module.state_dict().values() if p.is_floating_point()]
    return bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all()) if tensors else True


def _contiguous(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(output_dir: Path, step: int, unet, ema_model, optimizer, trainer_state: dict,
                    name: Optional[str] = None, extra_files: Optional[Dict[str, str]] = None) -> Path:
    """Write checkpoint-<step>/ (or `name`/): UNet and EMA weights as safetensors, optimizer state, `extra_files`
    ({name: text}, e.g. the run's configs), and last trainer_state.json holding the step and the SHA-256 of every
    other file.
    Written under a temporary name and renamed into place; non-finite weights are refused, and a failed write
    (a full disk) removes its temporary and leaves the previous checkpoints as they were."""
    final = Path(output_dir) / (name or f"{CHECKPOINT_PREFIX}{step}")
    for label, model in (("UNet", unet), ("EMA", ema_model)):
        if not weights_are_finite(model):
            raise NonFiniteWeightsError(f"The {label} weights are not finite at step {step}, so {final.name} is not written; "
                                        "resume from the last checkpoint with a lower --learning_rate.")
    tmp = tmp_sibling(final)
    try:
        tmp.mkdir(parents=True)
        save_file(_contiguous(unet.state_dict()), str(tmp / "unet.safetensors"))
        save_file(_contiguous(ema_model.state_dict()), str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text + "\n")
        files = {p.name: sha256_of(p) for p in sorted(tmp.iterdir())}
        with open(tmp / TRAINER_STATE, "w") as f:  # written last: its presence marks a complete checkpoint
            json.dump({**trainer_state, "step": step, "files": files}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"Cannot write the checkpoint {final} ({e.strerror or e}); free space in {final.parent} "
                              "or choose another --output_dir, then resume (the earlier checkpoints are intact).") from None
    return final


def checkpoint_problem(folder: Path) -> Optional[str]:
    """Why `folder` cannot be resumed from (its state missing or damaged, a file missing or not matching its
    SHA-256), or None when it is intact."""
    state_path = Path(folder) / TRAINER_STATE
    if not state_path.is_file():
        return f"no {TRAINER_STATE}"
    try:
        state = json.loads(state_path.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is damaged"
    files = state.get("files") or {}
    for name in sorted(set(files) | {"unet.safetensors", "ema.safetensors", "optimizer.pt"}):
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if name in files and sha256_of(path) != files[name]:
            return f"{name} does not match its SHA-256"
    return None


def list_checkpoints(output_dir: Path) -> List[tuple]:
    """(step, folder) of every checkpoint whose state file reads, oldest first. The step comes from trainer_state.json."""
    found = []
    for folder in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        state = folder / TRAINER_STATE
        if folder.is_dir() and state.is_file():
            try:
                found.append((int(json.loads(state.read_text())["step"]), folder))
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(found)


def resolve_checkpoint(output_dir: Path, which: Optional[str], warn=lambda message: None) -> Optional[Path]:
    """The checkpoint to resume from, verified against its hashes: `latest` (the newest intact one in output_dir;
    damaged ones are skipped and named through `warn`; None if output_dir has none at all) or a folder."""
    if which is None:
        return None
    if which == "latest":
        folders = [f for f in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if f.is_dir()]
        readable = [folder for _, folder in reversed(list_checkpoints(output_dir))]  # newest first, by their step
        # a checkpoint whose state does not read has no step to order it by: it is named first
        skipped = [f"{f.name} ({checkpoint_problem(f)})" for f in sorted(set(folders) - set(readable))]
        for folder in readable:
            problem = checkpoint_problem(folder)
            if problem is None:
                if skipped:
                    warn(f"Skipped damaged checkpoints: {'; '.join(skipped)}. Resuming from {folder.name}.")
                return folder
            skipped.append(f"{folder.name} ({problem})")
        if skipped:
            raise CheckpointError(f"{output_dir} holds checkpoints but none is intact: {'; '.join(skipped)}. Move them away "
                                  "to start over, or resume from a copy with --resume_from_checkpoint PATH.")
        return None
    path = Path(which)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {which}: no {TRAINER_STATE} there; give a checkpoint-* folder or 'latest'.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"--resume_from_checkpoint {which}: {problem}, so the checkpoint is damaged; resume from "
                              "another one (--resume_from_checkpoint latest takes the newest intact one).")
    return path


def load_checkpoint(folder: Path, unet, ema_model, optimizer) -> dict:
    """Load weights (safetensors) and optimizer state (weights_only) into the given objects; return trainer_state."""
    try:
        unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
        ema_model.load_state_dict(load_file(str(folder / "ema.safetensors")))
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder} does not fit this network or optimizer ({str(e).splitlines()[0][:200]}); "
                              "resume with the settings it was trained with.") from None
    return json.loads((folder / TRAINER_STATE).read_text())


def rotate_checkpoints(output_dir: Path, limit: Optional[int], keep: Sequence[Path] = ()) -> None:
    """Keep the newest `limit` checkpoints. Each one removed is first renamed to a temporary name: a kill while
    removing leaves only a temporary, which the next start cleans up, never a half-removed checkpoint-N/."""
    if not limit:
        return
    found = [f for _, f in list_checkpoints(output_dir) if f not in keep]
    for folder in found[: max(0, len(found) - limit)]:
        doomed = tmp_sibling(folder)
        os.replace(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------- pictures


def image_grid(images: torch.Tensor, pad: int = 1, cols: Optional[int] = None, min_size: int = 256):
    """A PIL grid of images in [0, 1] (NCHW), near-square or `cols` wide, each framed by `pad` dark pixels; small
    images are enlarged (nearest neighbour) to at least ~`min_size` px each."""
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    n = images.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pil = DiffusionPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
    pil += [pil[0].point(lambda _: 0)] * (rows * cols - n)
    pil = [ImageOps.expand(img, border=pad, fill=0) for img in pil]
    grid = make_image_grid(pil, rows=rows, cols=cols)
    scale = max(1, min_size // images.shape[-1])
    return grid.resize((grid.width * scale, grid.height * scale), resample=0) if scale > 1 else grid


def plot_loss_curve(history: List[dict], path: Path) -> None:
    """loss_curve.png: the training loss over steps, overall and by timestep quartile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history]
    for q in range(4):
        key = f"loss_t_q{q + 1}"
        if any(key in h for h in history):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], lw=0.8, alpha=0.7, label=f"t in quartile {q + 1}")
    ax.plot(steps, [h["loss"] for h in history], color="black", lw=1.6, label="all t")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per-sample MSE)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.tight_layout()
    tmp = tmp_sibling(Path(path))
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def save_pipeline(pipe, output_dir: Path) -> None:
    """save_pretrained into output_dir, atomically per component: model_index.json, unet/, scheduler/. Refuses
    non-finite weights."""
    output_dir = Path(output_dir)
    if not weights_are_finite(pipe.unet):
        raise NonFiniteWeightsError(f"The pipeline's weights are not finite, so it is not written to {output_dir}.")
    tmp = tmp_sibling(output_dir / "pipeline")
    pipe.save_pretrained(tmp)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):  # the index last
        target = output_dir / entry.name
        if entry.is_dir():
            replace_dir(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)
