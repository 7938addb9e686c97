"""Network weights we write or measure: their soundness (finite, and finite outputs), their hash, and saving a
pipeline atomically. A checkpoint or a pipeline is never written with unsound weights."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from .files import replace_dir, sha256_of, tmp_sibling
from .run_folder import MODEL_INDEX, PIPELINE_HASHES, SCHEDULER_CONFIG, UNET_CONFIG


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
    """save_pretrained into output_dir, atomically per component: unet/, scheduler/, the SHA-256 of every file
    (PIPELINE_HASHES), and model_index.json last. Refuses non-finite weights."""
    output_dir = Path(output_dir)
    if not weights_are_finite(pipe.unet):
        raise NonFiniteWeightsError(f"The pipeline's weights are not finite, so it is not written to {output_dir}.")
    tmp = tmp_sibling(output_dir / "pipeline")
    pipe.save_pretrained(tmp)
    hashes = {p.relative_to(tmp).as_posix(): sha256_of(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / PIPELINE_HASHES).write_text(json.dumps(hashes, indent=2) + "\n")
    for entry in sorted(tmp.iterdir(), key=lambda p: p.name == MODEL_INDEX):  # the index last
        target = output_dir / entry.name
        if entry.is_dir():
            replace_dir(entry, target)
        else:
            os.replace(entry, target)
    shutil.rmtree(tmp, ignore_errors=True)


def pipeline_problem(folder: Path) -> Optional[str]:
    """Why a saved pipeline folder must not be loaded: a file that does not match the SHA-256 recorded when it was
    saved (PIPELINE_HASHES), or a config that is not valid JSON; None when it is sound or records no hashes (a
    pipeline saved by plain diffusers, or downloaded)."""
    folder = Path(folder)
    for name in (MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG, PIPELINE_HASHES):
        if (folder / name).is_file():
            try:
                json.loads((folder / name).read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return f"{folder / name} is not valid JSON ({str(e).splitlines()[0][:80]}); restore the file from a copy"
    if not (folder / PIPELINE_HASHES).is_file():
        return None
    for name, digest in json.loads((folder / PIPELINE_HASHES).read_text()).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_of(path) != digest:
            return (f"{path} does not match the SHA-256 recorded in {PIPELINE_HASHES} when the pipeline was saved, so it "
                    "is damaged or was changed; restore the folder from a copy, or save the pipeline again from a "
                    "checkpoint of its run")
    return None


def verify_pipeline(source: str) -> None:
    """Refuse, in one line, a pipeline folder with a `pipeline_problem`; a Hub repo id passes (the Hub checks its own)."""
    folder = Path(source).expanduser()
    problem = pipeline_problem(folder) if folder.is_dir() else None
    if problem:
        raise ValueError(f"Cannot load the pipeline {source}: {problem}.")


def load_pipeline(source: str):
    """Our DDPMPipeline from a folder (verified against its recorded hashes first) or a Hub repo id; a damaged or
    incomplete pipeline is one line naming the file and what to do."""
    from .pipelines.pipeline_ddpm import DDPMPipeline

    folder = Path(source).expanduser()
    verify_pipeline(source)
    try:
        return DDPMPipeline.from_pretrained(source)
    except Exception as e:  # diffusers and safetensors raise many types for a damaged file
        if not folder.is_dir():
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise OSError(f"Cannot load the pipeline {source} ({type(e).__name__}: {reason}); a file of it is damaged or "
                      "incomplete (a partial copy?): copy or save it again.") from None
