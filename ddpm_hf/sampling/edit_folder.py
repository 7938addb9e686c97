"""What `ddpm-edit` does: a folder of the user's images edited (SDEdit, `pipe.edit`) or inpainted (RePaint,
`pipe.inpaint`) into another folder, one seed per image, resumable, sharded across processes.

Input k is the k-th image file of IMAGES (sorted by path; a single file is one image), fitted to the UNet's size as
training fits its data (short side resized, bicubic, center-cropped), edited with seed `seed + k` and saved as
`{k:06d}-{stem}.png`, so a result never depends on the batch size or the number of processes. The inputs are
never written to. The folder records in edit.json what its results were made from: the weights' SHA-256, the edit and
its settings, and each input's and mask's SHA-256, so a rerun after an input changed is refused rather than keeping
edits of the old pixels. `comparison.png` shows the first rows: the input, the kept part (inpainting) and the result.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ddpm_hf.data.decoding import decode_image, to_uint8_array
from ddpm_hf.data.sources import data_files_under, IMAGE_SUFFIXES
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_save_image, remove_stale_temporaries, sha256_of
from ddpm_hf.outputs.folder_jobs import FolderJob, handles
from ddpm_hf.saved.weights import state_dict_sha256
from ddpm_hf.pipelines.counter_noise import NOISE
from ddpm_hf.pipelines.pipeline_ddpm import sdedit_steps
from ddpm_hf.sampling.samplers import chain_steps_shown

EDIT_FILE = "edit.json"
COMPARISON = "comparison.png"
COMPARISON_ROWS = 8
FIT = "short side resized to the UNet's size (bicubic, antialiased), center-cropped; masks alike, then white >= 0.5"


def input_files(images) -> List[Path]:
    """The image files of IMAGES (a file, or every image under a folder, sorted); one line where there are none."""
    path = Path(images).expanduser()
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UsageError(f"{path} is not an image ({', '.join(sorted(IMAGE_SUFFIXES))}); give an image or a folder of them.")
        return [path]
    if not path.is_dir():
        raise UsageError(f"{path}: no such file or folder; give an image or a folder of images to edit.")
    files = [Path(f) for f in data_files_under(path, IMAGE_SUFFIXES)]
    if not files:
        raise UsageError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


_RESULT = re.compile(r"^\d{6,}-.*\.png$")


def output_name(k: int, source: Path) -> str:
    return f"{k:06d}-{source.stem}.png"


def edited_files(folder: Path) -> List[Path]:
    """Every result of ours in `folder` (by its name), of these inputs or earlier ones, and the comparison figure."""
    return [p for p in Path(folder).glob("*.png") if _RESULT.match(p.name) or p.name == COMPARISON]


def half_mask(side: str, size: tuple) -> torch.Tensor:
    """1 (fill) on the `side` half of an image of `size` (H, W), 0 elsewhere: 1HW."""
    mask = torch.zeros(1, *size)
    h, w = size
    region = {"top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, h), slice(None)),
              "left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, w))}[side]
    mask[(slice(None), *region)] = 1
    return mask


def fitted(path: Path, channels: int, size) -> torch.Tensor:
    """An image file as the UNet takes it, at `size` (N or (H, W)): CHW in [0, 1]."""
    array = to_uint8_array(decode_image(path.read_bytes(), str(path)), channels, size)
    return torch.from_numpy(np.array(array)).permute(2, 0, 1).float() / 255  # a copy: PIL's buffer is read-only


def mask_files(mask, inputs: Sequence[Path], root: Path) -> List[Path]:
    """--mask: one file for every input, or a folder holding a mask under each input's own relative path."""
    mask = Path(mask).expanduser()
    if mask.is_file():
        return [mask] * len(inputs)
    if not mask.is_dir():
        raise UsageError(f"--mask {mask}: no such file or folder; give one mask image, or a folder with a mask named as "
                         "each input.")
    found = []
    for source in inputs:
        rel = source.relative_to(root) if root.is_dir() else Path(source.name)
        match = next((p for p in (mask / rel, *(mask / rel.with_suffix(s) for s in sorted(IMAGE_SUFFIXES))) if p.is_file()), None)
        if match is None:
            raise UsageError(f"--mask {mask} has no mask for {source} (looked for {mask / rel} with any image suffix).")
        found.append(match)
    return found


def edit_problem(strength: Optional[float], mask, mask_half: Optional[str], distilled_for: Optional[str] = None,
                 **counts: int) -> Optional[str]:
    """What is wrong with an edit's settings (one edit, a strength in [0, 1], `counts` at least 1, a seed from 0), or
    None: checked before the pipeline is loaded. `distilled_for`: the pipeline, where it is a student distilled for
    exactly these steps (more steps would be timesteps it never learned)."""
    modes = [flag for flag, value in (("--strength", strength), ("--mask", mask), ("--mask_half", mask_half))
             if value is not None]
    if len(modes) != 1:
        return ("give one edit: --strength S (SDEdit), or --mask PATH or --mask_half SIDE (inpainting)"
                + (f", not {' and '.join(modes)}" if modes else ""))
    if strength is not None and not 0 <= strength <= 1:
        return f"--strength {strength} must be in [0, 1] (0 returns the images, 1 samples anew)"
    for flag, value in counts.items():
        if value < (0 if flag == "seed" else 1):
            return f"--{flag} {value} must be at least {0 if flag == 'seed' else 1}"
    steps = counts.get("num_inference_steps", 1)
    if strength is not None and strength > 0 and sdedit_steps(strength, steps) == 0:
        if distilled_for is not None:
            return (f"--strength {strength} runs none of the {steps} DDIM step(s) {distilled_for} was distilled for: "
                    f"give a --strength above {0.5 / steps:g}, or edit with its teacher")
        return (f"--strength {strength} of --num_inference_steps {steps} runs no step (it would return the inputs); "
                f"raise --num_inference_steps to at least {int(0.5 / strength) + 1}, or --strength")
    return None


def refuse_overlap(images: Path, output_dir: Path, mask: Optional[str]) -> None:
    """Inputs are never outputs: the results never go among the user's inputs (nor a rerun read them as inputs), and
    no input lies in OUTPUT_DIR, where --overwrite would remove it before reading it."""
    out = os.path.realpath(output_dir)
    for given, what in ((images, "IMAGES"), (mask, "--mask")):
        if given is None:
            continue
        src = os.path.realpath(Path(given).expanduser())
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
            raise UsageError(f"OUTPUT_DIR {output_dir} is inside {what} {given}: the results would be written among "
                             "the inputs; choose an output folder outside it.")
        if src.startswith(out.rstrip(os.sep) + os.sep):
            raise UsageError(f"{what} {given} is inside OUTPUT_DIR {output_dir}: an input would be among the results "
                             "(and --overwrite would remove it); copy it out of that folder, or choose another output "
                             "folder.")


def comparison_figure(rows: Sequence[Sequence[torch.Tensor]]):
    """Rows of (input, [kept part,] result) images, CHW in [0, 1], as one picture."""
    from ddpm_hf.outputs.plots import image_grid

    return image_grid(torch.stack([image for row in rows for image in row]), cols=len(rows[0]), min_size=64)


def edit_command(pipe, *, pipeline_name: str, images, folder, strength: Optional[float] = None, mask=None,
                 mask_half: Optional[str] = None, num_inference_steps: int = 1000, jump_length: int = 10,
                 jump_n_sample: int = 10, seed: int = 0, batch_size: int = 16, overwrite: bool = False, state=None,
                 labels: Optional[Sequence[int]] = None, guidance_scale: float = 1.0) -> dict:
    """`ddpm-edit`: SDEdit at `strength`, or RePaint inpainting of `mask` (a file or folder) or `mask_half` (white /
    the half: filled). Refuses a folder made from other inputs or settings before any work; returns counts."""
    from ddpm_hf.sampling.sample_folder import decodes, label_of

    problem = edit_problem(strength, mask, mask_half, num_inference_steps=num_inference_steps, batch_size=batch_size,
                           jump_length=jump_length, jump_n_sample=jump_n_sample, seed=seed)
    if problem:
        raise UsageError(problem + ".")
    refuse_overlap(images, folder, mask)
    root, sources = Path(images).expanduser(), input_files(images)
    masks = mask_files(mask, sources, root) if mask is not None else None
    for path in dict.fromkeys([*sources, *(masks or [])]):  # a bad file: one line naming it, before any work, on
        decode_image(path.read_bytes(), str(path))          # every process alike (never one process stopping alone)
    for path in dict.fromkeys(masks or []):
        if not (fitted(path, 1, pipe._sample_size()) >= 0.5).any():
            raise UsageError(f"--mask {path} selects nothing to fill (no white pixel at the UNet's size): inpainting "
                             "would return the input; white marks what RePaint fills.")
    channels, size = pipe.unet.config.in_channels, pipe._sample_size()
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(pipe.unet), "scheduler_config": dict(pipe.scheduler.config),
        "num_inference_steps": num_inference_steps, "seed": seed, "noise": f"input k: seed + k; {NOISE}", "fit": FIT,
        "inputs": [{"file": str(p.relative_to(root) if root.is_dir() else p.name), "sha256": sha256_of(p)} for p in sources],
    }
    if strength is not None:
        protocol.update(edit="sdedit (Meng et al. 2022)", strength=strength)
    else:
        protocol.update(edit="repaint (Lugmayr et al. 2022)", jump_length=jump_length, jump_n_sample=jump_n_sample,
                        mask={"half": mask_half} if mask_half else {"sha256": [sha256_of(p) for p in masks]})
    if labels is not None:
        protocol.update(class_labels=list(labels), guidance_scale=guidance_scale)
    with FolderJob(folder, EDIT_FILE, protocol, state, free=("pipeline", "complete"), results=edited_files,
                   results_are="PNGs named as ddpm-edit's results") as job:
        job.check("edits", "edit again from scratch", overwrite)
        names = [output_name(k, p) for k, p in enumerate(sources)]
        # overwriting a folder of ours (it has edit.json): the results of earlier inputs go too, so that edit.json
        # describes exactly the files beside it; files in a folder we did not make are never removed
        job.start(edited_files(job.folder) if overwrite and job.recorded() else (), overwrite, complete=False)
        if job.is_main:
            remove_stale_temporaries(job.folder)
        job.wait()
        done = {k for k, n in enumerate(names) if (job.folder / n).is_file() and  # this process's damaged ones again
                (not handles(k, job.rank, job.world) or decodes(job.folder / n))}
        todo = job.todo(len(sources), done)
        pipe.set_progress_bar_config(disable=True)
        # the bar counts image-steps, so that it moves within a batch's chain (RePaint's moves: steps and undos)
        if strength is not None:
            per_image = sdedit_steps(strength, num_inference_steps)
        else:
            from ddpm_hf.pipelines.pipeline_ddpm import repaint_moves

            per_image = len(repaint_moves(num_inference_steps, jump_length, jump_n_sample))
        bar = job.bar(len(todo) * per_image, "Editing" if strength is not None else "Inpainting", "step")
        for at in range(0, len(todo), batch_size):
            ks = todo[at : at + batch_size]
            shown = chain_steps_shown(pipe, lambda n=len(ks): bar.update(n))
            x = torch.stack([fitted(sources[k], channels, size) for k in ks])
            guided = {} if labels is None else {"class_labels": [label_of(k, labels) for k in ks],
                                                "guidance_scale": guidance_scale}
            seeds = [seed + k for k in ks]
            if strength is not None:
                with shown:
                    out = pipe.edit(x, strength=strength, seeds=seeds, num_inference_steps=num_inference_steps, **guided)
            else:
                m = (half_mask(mask_half, size)[None].expand(len(ks), -1, -1, -1) if mask_half else
                     torch.stack([fitted(masks[k], 1, size) for k in ks]))
                with shown:
                    out = pipe.inpaint(x, m, seeds=seeds, num_inference_steps=num_inference_steps,
                                       jump_length=jump_length, jump_n_sample=jump_n_sample, **guided)
            for k, image in zip(ks, out.images):
                atomic_save_image(image, job.folder / names[k])
        bar.close()
        if job.finish():
            held = sum((job.folder / n).is_file() for n in names)
            if held == len(names):
                rows = []
                for k in range(min(COMPARISON_ROWS, len(names))):
                    x = fitted(sources[k], channels, size)
                    result = fitted(job.folder / names[k], channels, size)
                    if strength is not None:
                        rows.append((x, result))
                    else:
                        fill = (half_mask(mask_half, size) if mask_half else (fitted(masks[k], 1, size) >= 0.5).float())
                        rows.append((x, x * (1 - fill) + 0.5 * fill, result))
                atomic_save_image(comparison_figure(rows), job.folder / COMPARISON)
            job.record(complete=held == len(names))
        return {"written": len(todo), "kept": len(done), "images": len(names)}
