"""Network weights we write or measure: their soundness (finite, and finite outputs), their hash, and saving a
pipeline atomically, and reading a pipeline's config files from a folder or the Hub. A checkpoint or a pipeline is
never written with unsound weights."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from ddpm_hf.sizes import size_of
from ddpm_hf.errors import StateError, UsageError, first_line
from ddpm_hf.outputs.files import replace_dir, sha256_of, tmp_sibling
from ddpm_hf.outputs.run_folder import MODEL_INDEX, PIPELINE_HASHES, SCHEDULER_CONFIG, UNET_CONFIG


class NonFiniteWeightsError(StateError):
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


def weights_problem(unet: torch.nn.Module, probe: Optional[tuple] = None) -> Optional[str]:
    """Why a UNet's weights must not be saved: they are not finite, or (with `probe`, (channels, resolution, T)) they
    give non-finite outputs on a fixed probe batch (weights so large that the network overflows); None when sound."""
    if not weights_are_finite(unet):
        return "are not finite"
    if probe is None:
        return None
    channels, resolution, num_train_timesteps = probe
    device = next(unet.parameters()).device
    probe = torch.randn(2, channels, *size_of(resolution), generator=torch.Generator().manual_seed(0))
    rows = getattr(unet.config, "num_class_embeds", None)  # a class-conditional UNet: class 0, and "no class" (the last)
    labels = {} if rows is None else {"class_labels": torch.tensor([0, rows - 1], device=device)}
    with torch.no_grad():
        output = unet(probe.to(device), torch.tensor([0, num_train_timesteps - 1], device=device), **labels).sample
    return None if bool(torch.isfinite(output).all()) else "give non-finite outputs"


def refuse_unsound_weights(models: Dict[str, torch.nn.Module], what: str, *, step: Optional[int] = None,
                           advice: str = "", probe: Optional[tuple] = None) -> None:
    """The one guard against writing broken weights: NonFiniteWeightsError naming the first of `models` ({label:
    module}) whose weights are unsound (`weights_problem`), rather than write `what`."""
    for label, model in models.items():
        problem = weights_problem(model, probe)
        if problem:
            at = "" if step is None else f" at step {step}"
            raise NonFiniteWeightsError(f"The {label} weights {problem}{at}, so {what} is not written"
                                        + (f"; {advice}." if advice else "."))


def save_pipeline(pipe, output_dir: Path) -> None:
    """save_pretrained into output_dir, atomically per component: unet/, scheduler/, the SHA-256 of every file
    (PIPELINE_HASHES), and model_index.json last. Refuses non-finite weights."""
    output_dir = Path(output_dir)
    refuse_unsound_weights({"pipeline's": pipe.unet}, f"the pipeline in {output_dir}")
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
                return f"{folder / name} is not valid JSON ({first_line(e, limit=80)}); restore the file from a copy"
    code = own_code(json.loads((folder / MODEL_INDEX).read_text())) if (folder / MODEL_INDEX).is_file() else None
    if code:
        return (f"{folder / MODEL_INDEX} names code of its own ({code}), and ddpm_hf never runs a folder's code; load "
                "a pipeline that diffusers' or ddpm_hf's own classes make up")
    for name in (UNET_CONFIG, "config.json"):  # a pipeline's unet/, or a google/ddpm-* root layout
        config = json.loads((folder / name).read_text()) if (folder / name).is_file() else None
        if isinstance(config, dict) and config.get("_class_name") == "UNet2DModel":
            from ddpm_hf.diffusion.unets import unet_config_problem

            problem = unet_config_problem({k: v for k, v in config.items() if not k.startswith("_")})
            if problem:
                return f"{folder / name} describes a UNet that cannot be built ({problem}); restore the file from a copy"
            break
    if (folder / SCHEDULER_CONFIG).is_file():
        from ddpm_hf.diffusion.scheduler import DDPMScheduler

        problem = DDPMScheduler.chain_problem(json.loads((folder / SCHEDULER_CONFIG).read_text()))
        if problem:
            return (f"{folder / SCHEDULER_CONFIG} describes no diffusion that can run ({problem}); correct that value, "
                    "or restore the file from a copy")
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


# the libraries whose classes a model_index.json may name: anything else is a module of the folder's own code
KNOWN_LIBRARIES = ("diffusers", "ddpm_hf", "transformers", None)


def own_code(model_index: Dict[str, Any]) -> Optional[str]:
    """The component of a model_index.json that names a module of the pipeline's own code (what diffusers would import
    from the folder), as `name: module.Class`; None where every class is a library's."""
    from ddpm_hf.pipelines.pipeline_ddpm import PIPELINE_SETTINGS

    if isinstance(model_index.get("_class_name"), (list, tuple)):
        return "pipeline: " + ".".join(map(str, model_index["_class_name"]))
    for name, value in model_index.items():
        if (not name.startswith("_") and name not in PIPELINE_SETTINGS and isinstance(value, (list, tuple))
                and len(value) == 2 and value[0] not in KNOWN_LIBRARIES):
            return f"{name}: {value[0]}.{value[1]}"
    return None


def verify_pipeline(source: str) -> None:
    """Refuse, in one line, a pipeline folder with a `pipeline_problem`; a Hub repo id passes (the Hub checks its own)."""
    folder = Path(source).expanduser()
    problem = pipeline_problem(folder) if folder.is_dir() else None
    if problem:
        raise UsageError(f"Cannot load the pipeline {source}: {problem}.")


def load_pipeline(source: str):
    """Our DDPMPipeline from a folder (verified against its recorded hashes first) or a Hub repo id; a damaged or
    incomplete pipeline is one line naming the file and what to do."""
    from ddpm_hf.pipelines.pipeline_ddpm import DDPMPipeline

    folder = Path(source).expanduser()
    verify_pipeline(source)
    try:
        return DDPMPipeline.from_pretrained(source)
    except Exception as e:  # diffusers and safetensors raise many types for a damaged file
        if not folder.is_dir():
            raise
        if caused_by(e, pickle.UnpicklingError):  # torch's message suggests turning the safe load off: never repeat it
            raise UsageError(f"Cannot load the pipeline {source}: a weights file of it holds objects that a safe load "
                             "refuses (not only tensors), so it is not a saved network; load a pipeline saved with "
                             "safetensors (save_pretrained's default).") from None
        reason = first_line(e, limit=200)
        raise OSError(f"Cannot load the pipeline {source} ({type(e).__name__}: {reason}); a file of it is damaged or "
                      "incomplete (a partial copy?): copy or save it again.") from None


def caused_by(error: BaseException, kind: type) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a `kind` (diffusers wraps what
    torch.load refuses in an OSError of its own)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def read_pipeline_json(source: str, names: Sequence[str]) -> Dict[str, Any]:
    """The first of `names` in a pipeline folder or Hub repo (cached repos work offline), parsed."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        for name in names:
            if (folder / name).is_file():
                return json.loads((folder / name).read_text())
        raise UsageError(f"--init_from {source}: no {' or '.join(names)} there; give a pipeline folder (save_pretrained, a "
                         "training run) or a Hub repo id.")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    for name in names:
        try:
            return json.loads(Path(hf_hub_download(source, name)).read_text())
        except EntryNotFoundError:
            continue
        except (LocalEntryNotFoundError, RepositoryNotFoundError, OSError, ValueError) as e:
            raise UsageError(f"--init_from {source}: not a local folder, and the Hub repo cannot be read here "
                             f"({type(e).__name__}); pass a folder, or download the repo where there is internet "
                             f"(`hf download {source}`) and copy the cache (HF_HOME).") from None
    raise UsageError(f"--init_from {source}: the repo has no {' or '.join(names)}.")
