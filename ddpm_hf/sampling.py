"""Sampling many images into a folder: one seed per image, resumable, sharded across processes.

Image k is drawn from generator seed `seed + k` and saved as `{k:06d}-seed{seed + k}.png`, so it is
the same image whatever the batch size or process count. Each file is written under a temporary name
and renamed: a kill never leaves a half-written PNG under a final name, and a restart keeps the
complete images and draws only the missing ones. Under `accelerate launch` process r draws the
images k with k % world_size == r (disjoint, no duplicates, no rank-0-only work).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, List, Optional, Tuple

import torch

from .choices import SAMPLERS
from .outputs import atomic_save_image, atomic_write_json, check_provenance, state_dict_sha256

SAMPLING_FILE = "sampling.json"

_NAME = re.compile(r"^(\d{6,})-seed(\d+)\.png$")


def image_name(k: int, seed: int) -> str:
    return f"{k:06d}-seed{seed + k}.png"


def use_scheduler(pipe, name: str):
    """Swap in the sampler `name`, built from the pipeline's scheduler config."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name == "ddpm":
        return pipe
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "dpm-solver":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    else:
        raise ValueError(f"--scheduler {name!r} is not one of {', '.join(SAMPLERS)}.")
    return pipe


def process_share(num_images: int, rank: int = 0, world_size: int = 1, skip: Collection[int] = ()) -> List[int]:
    """The images k of 0..num_images-1 that process `rank` of `world_size` handles: k % world_size == rank,
    minus `skip` (those already done)."""
    return [k for k in range(rank, num_images, world_size) if k not in skip]


def draw_share(pipe, num_images: int, seed_of: Callable[[int], int], rank: int = 0, world_size: int = 1,
               batch_size: int = 64, skip: Collection[int] = (), **call: Any) -> Iterator[Tuple[List[int], Any]]:
    """This process's share of images 0..num_images-1 (`process_share`), image k drawn from a generator seeded
    `seed_of(k)`, in batches of `batch_size`: yields (ks, images). Image k is the same whatever the batch size or
    number of processes. `call` goes to the pipeline (num_inference_steps, output_type, eta)."""
    device = pipe._execution_device
    todo = process_share(num_images, rank, world_size, skip)
    for i in range(0, len(todo), batch_size):
        ks = todo[i : i + batch_size]
        generators = [torch.Generator(device).manual_seed(seed_of(k)) for k in ks]
        yield ks, pipe(batch_size=len(ks), generator=generators, **call).images


def complete_images(folder: Path, seed: int) -> set:
    """Indices k whose final file `image_name(k, seed)` exists (not checked to decode: see `sample_to_folder`).
    Files from another --seed are an error."""
    done = set()
    for path in Path(folder).glob("*.png"):
        match = _NAME.match(path.name)
        if match is None:
            continue
        k, s = int(match.group(1)), int(match.group(2))
        if s != seed + k:
            raise ValueError(
                f"{path} was drawn with another --seed (image {k} from seed {s}, but --seed {seed} gives {seed + k}); "
                "use a new output folder or the same --seed."
            )
        done.add(k)
    return done


def decodes(path: Path) -> bool:
    """Whether a kept PNG is whole (its chunks and their CRCs check out); a damaged one is removed."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for damaged files
        path.unlink(missing_ok=True)
        return False


def sample_to_folder(
    pipe,
    folder,
    num_images: int,
    batch_size: int = 64,
    num_inference_steps: int = 1000,
    seed: int = 0,
    eta: Optional[float] = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Draw this process's missing images of 0..num_images-1 into `folder`. Returns counts and images/s."""
    from tqdm.auto import tqdm

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images={num_images} and batch_size={batch_size} must be at least 1.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.png.tmp-*"):  # half-written files of a killed run (this rank's share)
        match = _NAME.match(stale.name[1:].split(".tmp-")[0])
        if match and int(match.group(1)) % world_size == rank:
            stale.unlink(missing_ok=True)
    mine = len(range(rank, num_images, world_size))
    done = {k for k in complete_images(folder, seed) if k >= num_images or k % world_size != rank or
            decodes(folder / image_name(k, seed))}  # this process's damaged images are drawn again
    kept = sum(1 for k in done if k < num_images and k % world_size == rank)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    bar = tqdm(total=mine, initial=kept, disable=not progress, unit="img", desc="Sampling")
    for ks, images in draw_share(pipe, num_images, lambda k: seed + k, rank, world_size, batch_size, skip=done,
                                 num_inference_steps=num_inference_steps, output_type="pil", eta=eta):
        for k, image in zip(ks, images):
            atomic_save_image(image, folder / image_name(k, seed))
        bar.update(len(ks))
    bar.close()
    seconds = time.perf_counter() - start
    written = mine - kept
    return {"written": written, "kept": kept, "seconds": seconds,
            "images_per_s": written / seconds if written and seconds > 0 else None}


def sample_command(pipe, pipeline_name: str, folder, num_images: int, batch_size: int, sampler: str,
                   num_inference_steps: int, eta: Optional[float], seed: int, overwrite: bool = False, state=None) -> dict:
    """`ddpm-sample`: refuse a folder drawn with other settings (before drawing anything), record the protocol
    in sampling.json, draw this process's missing images, then record how many the folder holds."""
    use_scheduler(pipe, sampler)
    is_main = state.is_main_process if state else True
    folder = Path(folder)
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(pipe.unet), "scheduler": sampler,
        "scheduler_config": dict(pipe.scheduler.config), "num_inference_steps": num_inference_steps, "eta": eta,
        "seed": seed, "weights": "EMA" if (Path(pipeline_name) / "training_config.json").is_file() else "as published",
    }
    check_provenance(folder, SAMPLING_FILE, protocol, "images drawn", "draw again from scratch", overwrite,
                     free=("pipeline", "num_images", "complete"))
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in folder.glob("*.png"):
                if _NAME.match(path.name):
                    path.unlink()
        atomic_write_json(folder / SAMPLING_FILE, {**protocol, "num_images": None, "complete": False})
    if state:
        state.wait_for_everyone()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    result = sample_to_folder(pipe, folder, num_images, batch_size, num_inference_steps, seed, eta, rank, world,
                              progress=state.is_local_main_process if state else True)
    if state:
        state.wait_for_everyone()
    if is_main:  # the protocol describes exactly the images beside it
        held = len(complete_images(folder, seed))
        atomic_write_json(folder / SAMPLING_FILE, {**protocol, "num_images": held, "complete": held >= num_images})
    return result
