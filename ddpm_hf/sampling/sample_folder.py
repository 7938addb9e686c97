"""What `ddpm-sample` does: many images into a folder, one seed per image, resumable, sharded across processes.

Image k is drawn from generator seed `seed + k` and saved as `{k:06d}-seed{seed + k}.png`, so it is the same image
whatever the batch size or process count. Each file is written under a temporary name and renamed: a kill never
leaves a half-written PNG under a final name, and a restart keeps the complete images and draws only the missing
ones. Under `accelerate launch` process r draws the images k with k % world_size == r (`folder_jobs`). The folder
records how its images were drawn in sampling.json, and at the end how many it holds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_save_image
from ddpm_hf.outputs.folder_jobs import FolderJob, handles, process_share
from ddpm_hf.outputs.run_folder import TRAINING_CONFIG
from ddpm_hf.outputs.weights import state_dict_sha256
from ddpm_hf.pipelines.counter_noise import NOISE
from ddpm_hf.sampling.samplers import cast_network, draw_share, use_scheduler

SAMPLING_FILE = "sampling.json"
# A folder of PNGs holds a few million well; FID uses 50,000. A count beyond this is a typo, told before any work.
MAX_IMAGES = 10_000_000

_NAME = re.compile(r"^(\d{6,})-seed(\d+)\.png$")


def image_name(k: int, seed: int) -> str:
    return f"{k:06d}-seed{seed + k}.png"


def drawn_images(folder: Path):
    """The PNGs in `folder` that this command drew (by their names)."""
    return [path for path in Path(folder).glob("*.png") if _NAME.match(path.name)]


def complete_images(folder: Path, seed: int) -> set:
    """Indices k whose final file `image_name(k, seed)` exists (not checked to decode: see `sample_to_folder`).
    Files from another --seed are an error."""
    done = set()
    for path in drawn_images(folder):
        match = _NAME.match(path.name)
        k, s = int(match.group(1)), int(match.group(2))
        if s != seed + k:
            raise UsageError(
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


def count_problem(num_images: int, batch_size: int, num_inference_steps: int) -> Optional[str]:
    """What is wrong with the counts of a sampling run, or None: checked before the pipeline is loaded."""
    if num_images < 1 or batch_size < 1 or num_inference_steps < 1:
        return (f"--num_images {num_images}, --batch_size {batch_size} and --num_inference_steps {num_inference_steps} "
                "must each be at least 1")
    if num_images > MAX_IMAGES:
        return (f"--num_images {num_images} is more than one folder of PNGs holds well (at most {MAX_IMAGES:,}; FID "
                "uses 50,000): draw into several folders with --seed apart by the count")
    return None


def sample_to_folder(
    pipe,
    folder,
    num_images: int,
    *,
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

    problem = count_problem(num_images, batch_size, num_inference_steps)
    if problem:
        raise UsageError(problem + ".")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.png.tmp-*"):  # half-written files of a killed run (this rank's share)
        match = _NAME.match(stale.name[1:].split(".tmp-")[0])
        if match and handles(int(match.group(1)), rank, world_size):
            stale.unlink(missing_ok=True)
    mine = len(process_share(num_images, rank, world_size))
    done = {k for k in complete_images(folder, seed) if k >= num_images or not handles(k, rank, world_size) or
            decodes(folder / image_name(k, seed))}  # this process's damaged images are drawn again
    kept = mine - len(process_share(num_images, rank, world_size, skip=done))
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


def sample_command(pipe, *, pipeline_name: str, folder, num_images: int, batch_size: int, sampler: str,
                   num_inference_steps: int, eta: Optional[float], seed: int, overwrite: bool = False, state=None,
                   dtype: str = "fp32") -> dict:
    """`ddpm-sample`: refuse a folder drawn with other settings (before drawing anything), record the protocol
    in sampling.json, draw this process's missing images, then record how many the folder holds."""
    problem = count_problem(num_images, batch_size, num_inference_steps)
    if problem:  # before sampling.json is written: the corrected command finds the folder as it was
        raise UsageError(problem + ".")
    use_scheduler(pipe, sampler)
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(pipe.unet), "scheduler": sampler,
        "scheduler_config": dict(pipe.scheduler.config), "num_inference_steps": num_inference_steps, "eta": eta,
        "seed": seed, "noise": NOISE, "dtype": dtype, "weights": "EMA" if (Path(pipeline_name) / TRAINING_CONFIG).is_file() else "as published",
    }
    cast_network(pipe.unet, dtype)
    with FolderJob(folder, SAMPLING_FILE, protocol, state, free=("pipeline", "num_images", "complete")) as job:
        job.check("images drawn", "draw again from scratch", overwrite)
        job.start(drawn_images(job.folder) if overwrite else (), overwrite, num_images=None, complete=False)
        result = sample_to_folder(pipe, job.folder, num_images, batch_size=batch_size, num_inference_steps=num_inference_steps,
                                  seed=seed, eta=eta, rank=job.rank, world_size=job.world, progress=job.shows_progress)
        if job.finish():  # the protocol describes exactly the images beside it
            held = len(complete_images(job.folder, seed))
            job.record(num_images=held, complete=held >= num_images)
        return result
