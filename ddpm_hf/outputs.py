"""What a run writes: atomic files and folders, checkpoints, sample grids, the loss curve, the pipeline."""

from __future__ import annotations

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
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def remove_stale_temporaries(folder: Path) -> None:
    """Remove half-written files and folders left by a crash or kill (named .NAME.tmp-XXXX)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ---------------------------------------------------------------- checkpoints


def _contiguous(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(output_dir: Path, step: int, unet, ema_model, optimizer, trainer_state: dict,
                    name: Optional[str] = None) -> Path:
    """Write checkpoint-<step>/ (or `name`/: UNet and EMA weights as safetensors, optimizer state,
    trainer_state.json holding the step) under a temporary name, then rename it into place."""
    final = Path(output_dir) / (name or f"{CHECKPOINT_PREFIX}{step}")
    tmp = tmp_sibling(final)
    tmp.mkdir(parents=True)
    save_file(_contiguous(unet.state_dict()), str(tmp / "unet.safetensors"))
    save_file(_contiguous(ema_model.state_dict()), str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    with open(tmp / TRAINER_STATE, "w") as f:  # written last: its presence marks a complete checkpoint
        json.dump({**trainer_state, "step": step}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    replace_dir(tmp, final)
    return final


def list_checkpoints(output_dir: Path) -> List[tuple]:
    """(step, folder) of every complete checkpoint, oldest first. The step comes from trainer_state.json."""
    found = []
    for folder in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        state = folder / TRAINER_STATE
        if folder.is_dir() and state.is_file():
            try:
                found.append((int(json.loads(state.read_text())["step"]), folder))
            except (ValueError, KeyError, json.JSONDecodeError):
                continue
    return sorted(found)


def resolve_checkpoint(output_dir: Path, which: Optional[str]) -> Optional[Path]:
    """`latest` (the newest complete checkpoint in output_dir, or None if there is none) or a path."""
    if which is None:
        return None
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(which)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {which}: no {TRAINER_STATE} there; give a checkpoint-* folder or 'latest'.")
    return path


def load_checkpoint(folder: Path, unet, ema_model, optimizer) -> dict:
    """Load weights (safetensors) and optimizer state (weights_only) into the given objects; return trainer_state."""
    unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
    ema_model.load_state_dict(load_file(str(folder / "ema.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    return json.loads((folder / TRAINER_STATE).read_text())


def rotate_checkpoints(output_dir: Path, limit: Optional[int], keep: Sequence[Path] = ()) -> None:
    if not limit:
        return
    found = [f for _, f in list_checkpoints(output_dir) if f not in keep]
    for folder in found[: max(0, len(found) - limit)]:
        shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- pictures


def image_grid(images: torch.Tensor, pad: int = 1):
    """A near-square PIL grid of images in [0, 1] (NCHW), each framed by `pad` dark pixels; small images
    are enlarged (nearest neighbour) so the grid is at least ~256 px per image."""
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    n = images.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pil = DiffusionPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
    pil += [pil[0].point(lambda _: 0)] * (rows * cols - n)
    pil = [ImageOps.expand(img, border=pad, fill=0) for img in pil]
    grid = make_image_grid(pil, rows=rows, cols=cols)
    scale = max(1, 256 // images.shape[-1])
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
    """save_pretrained into output_dir, atomically per component: model_index.json, unet/, scheduler/."""
    output_dir = Path(output_dir)
    tmp = tmp_sibling(output_dir / "pipeline")
    pipe.save_pretrained(tmp)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json"):  # the index last
        target = output_dir / entry.name
        if entry.is_dir():
            replace_dir(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)
