"""Network weights we write or measure: their soundness (finite, and finite outputs), their hash, and saving a
pipeline atomically. A checkpoint or a pipeline is never written with unsound weights."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from .files import replace_dir, tmp_sibling
from .run_folder import MODEL_INDEX


class NonFiniteWeightsError(RuntimeError):
    """Weights that are not finite: never written as a checkpoint or a pipeline."""


def state_dict_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes and bytes, in name order): the same for the same
    weights whatever file format they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weights_are_finite(module: torch.nn.Module) -> bool:
    tensors = [p for p in module.state_dict().values() if p.is_floating_point()]
    return bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all()) if tensors else True


def weights_problem(unet: torch.nn.Module, channels: int, resolution: int, num_train_timesteps: int) -> Optional[str]:
    """Why a UNet's weights must not be saved: they are not finite, or they give non-finite outputs on a fixed probe
    batch (weights so large that the network overflows); None when they are sound."""
    if not weights_are_finite(unet):
        return "are not finite"
    device = next(unet.parameters()).device
    probe = torch.randn(2, channels, resolution, resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = unet(probe.to(device), torch.tensor([0, num_train_timesteps - 1], device=device)).sample
    return None if bool(torch.isfinite(output).all()) else "give non-finite outputs"


def save_pipeline(pipe, output_dir: Path) -> None:
    """save_pretrained into output_dir, atomically per component: model_index.json (last), unet/, scheduler/.
    Refuses non-finite weights."""
    output_dir = Path(output_dir)
    if not weights_are_finite(pipe.unet):
        raise NonFiniteWeightsError(f"The pipeline's weights are not finite, so it is not written to {output_dir}.")
    tmp = tmp_sibling(output_dir / "pipeline")
    pipe.save_pretrained(tmp)
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_INDEX):  # the index last
        target = output_dir / entry.name
        if entry.is_dir():
            replace_dir(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)
