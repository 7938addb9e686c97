"""What `ddpm-sample` does: many images into a folder, one seed per image, resumable, sharded across processes.

Image k is drawn from generator seed `seed + k` and saved as `{k:06d}-seed{seed + k}.png` (from a class-conditional
pipeline, of class `labels[k % len(labels)]` and saved as `{k:06d}-seed{seed + k}-class{label}.png`), so it is the same
image whatever the batch size or process count. Each file is written under a temporary name and renamed: a kill never
leaves a half-written PNG under a final name, and a restart keeps the complete images and draws only the missing
ones. Under `accelerate launch` process r draws the images k with k % world_size == r (`folder_jobs`). The folder
records how its images were drawn in sampling.json, and at the end how many it holds. With `npz`, the complete folder
is also one samples.npz (`write_npz`), whose SHA-256 sampling.json records beside the count it holds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_save_image, atomic_write, sha256_of
from ddpm_hf.outputs.folder_jobs import FolderJob, handles, process_share
from ddpm_hf.outputs.run_folder import TRAINING_CONFIG
from ddpm_hf.saved.weights import state_dict_sha256
from ddpm_hf.pipelines.counter_noise import NOISE
from ddpm_hf.pipelines.pipeline_ddpm import epsilon_from_clipped_x0, takes_timesteps
from ddpm_hf.sampling.counts import count_problem
from ddpm_hf.sampling.samplers import (
    cast_network,
    chain_timesteps,
    draw_share,
    use_scheduler,
    with_spacing,
)

SAMPLING_FILE = "sampling.json"
IMAGE_HASHES = "images_sha256"  # sampling.json's {file name: SHA-256} of each image drawn: what the folder holds
# the folder as one file for other toolchains: arr_0 uint8 NHWC (guided-diffusion's evaluator reads it), arr_1 labels
SAMPLES_NPZ = "samples.npz"

_NAME = re.compile(r"^(\d{6,})-seed(\d+)(?:-class(\d+))?\.png$")


def image_name(k: int, seed: int, labels: Optional[Sequence[int]] = None) -> str:
    """The file of image k; with `labels` (a class-conditional folder's), of class labels[k % len(labels)]."""
    return f"{k:06d}-seed{seed + k}" + ("" if labels is None else f"-class{label_of(k, labels)}") + ".png"


def label_of(k: int, labels: Sequence[int]) -> int:
    """The class of image k in a folder drawn with `labels`: they repeat in order (k mod their count)."""
    return labels[k % len(labels)]


def class_labels_of(text: str, num_classes: Optional[int]) -> Optional[List[int]]:
    """--class_labels: `balanced` (0..K-1, so that every class has the same share of the images) or comma-separated
    labels; None where none were given. One line where they do not fit the pipeline (`num_classes` K; None: it is
    unconditional)."""
    if text is None:
        if num_classes is not None:
            raise UsageError(f"The pipeline is class-conditional ({num_classes} classes): pass --class_labels balanced (every "
                             "class alike) or the labels to draw, e.g. --class_labels 0,3,7.")
        return None
    if num_classes is None:
        raise UsageError("The pipeline is unconditional (its UNet has no class embedding): drop --class_labels and "
                         "--guidance_scale.")
    if text == "balanced":
        return list(range(num_classes))
    try:
        labels = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--class_labels {text!r}: give comma-separated integer labels (e.g. 0,3,7) or balanced.") from None
    outside = [k for k in labels if not 0 <= k < num_classes]
    if outside:
        raise UsageError(f"--class_labels {text}: {outside[0]} is outside the pipeline's classes 0..{num_classes - 1}.")
    return labels


def drawn_images(folder: Path):
    """The PNGs in `folder` that this command drew (by their names)."""
    return [path for path in Path(folder).glob("*.png") if _NAME.match(path.name)]


def sampled_files(folder: Path) -> List[Path]:
    """Every file in `folder` named as one of this command's results: its PNGs and its npz."""
    return drawn_images(folder) + [p for p in (Path(folder) / SAMPLES_NPZ,) if p.exists()]


def misnamed_image(folder: Path, seed: int, labels: Optional[Sequence[int]] = None) -> Optional[Tuple[Path, int, int]]:
    """The first PNG named as image k that is not `image_name(k, seed, labels)`, with its k and its seed; None where
    every one is."""
    for path in sorted(drawn_images(folder)):
        match = _NAME.match(path.name)
        k, s = int(match.group(1)), int(match.group(2))
        if path.name != image_name(k, seed, labels):
            return path, k, s
    return None


def complete_images(folder: Path, seed: int, labels: Optional[Sequence[int]] = None) -> set:
    """Indices k whose final file `image_name(k, seed, labels)` exists (not checked to decode: see
    `sample_to_folder`). Files from another --seed or of other classes are an error."""
    wrong = misnamed_image(folder, seed, labels)
    if wrong is not None:
        path, k, s = wrong
        if s != seed + k:
            raise UsageError(
                f"{path} was drawn with another --seed (image {k} from seed {s}, but --seed {seed} gives {seed + k}); "
                "use a new output folder or the same --seed."
            )
        raise UsageError(f"{path} was drawn with other --class_labels (image {k} is {image_name(k, seed, labels)} "
                         "with these); use a new output folder or the same --class_labels.")
    return {int(_NAME.match(path.name).group(1)) for path in drawn_images(folder)}


def image_hashes(folder: Path, names, known: Optional[dict] = None) -> dict:
    """{name: SHA-256} of the images `names` in `folder`, taking those in `known` as they are."""
    known = known or {}
    return {name: known.get(name) or sha256_of(Path(folder) / name) for name in sorted(names)}


def verified_images(folder: Path, recorded: dict) -> dict:
    """The images a folder's record hashed (`IMAGE_HASHES`) that are still there, each checked to be the image drawn:
    one changed since (replaced or edited by hand) is refused by name, never measured or put into an npz. Returns
    their {name: SHA-256}."""
    folder, kept = Path(folder), {}
    for name, digest in (recorded.get(IMAGE_HASHES) or {}).items():
        path = folder / name
        if not path.is_file():
            continue  # removed: drawn again
        if sha256_of(path) != digest:
            if not decodes(path, remove=False):
                continue  # damaged (a disk error, a copy cut short), not changed: drawn again
            raise UsageError(f"{path} is not the image drawn there (its SHA-256 differs from the one {SAMPLING_FILE} "
                             "records): it was changed after drawing; move it out of the folder and run ddpm-sample again to draw it "
                             "again, or draw the folder again with --overwrite.")
        kept[name] = digest
    return kept


def decodes(path: Path, remove: bool = True) -> bool:
    """Whether a kept PNG is whole (its chunks and their CRCs check out); a damaged one is removed (with `remove`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many types for damaged files
        if remove:
            path.unlink(missing_ok=True)
        return False


def write_npz(folder: Path, num_images: int, seed: int, labels: Optional[Sequence[int]] = None) -> dict:
    """Images 0..num_images-1 of `folder` as one `SAMPLES_NPZ` beside them, written atomically: `arr_0` uint8 NHWC with
    image k at index k, the PNGs' pixels as they are (C = 1 for a grayscale folder), and for a class-conditional folder
    `arr_1`, image k's class. Streamed into the (uncompressed, as np.savez writes) zip one image at a time, so that
    50,000 images at 256x256 need one image's memory, not 10 GB. Returns its record for sampling.json."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npy
    from PIL import Image

    def pixels(k: int) -> "np.ndarray":
        with Image.open(folder / image_name(k, seed, labels)) as image:
            array = np.asarray(image, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array

    first = pixels(0)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as f:
                npy.write_array_header_1_0(f, {"descr": npy.dtype_to_descr(first.dtype), "fortran_order": False,
                                               "shape": (num_images, *first.shape)})
                for k in range(num_images):
                    array = first if k == 0 else pixels(k)
                    if array.shape != first.shape:
                        raise UsageError(f"{folder / image_name(k, seed, labels)} is {array.shape}, not {first.shape} "
                                         "as image 0: the folder was changed by hand; draw it again with --overwrite.")
                    f.write(np.ascontiguousarray(array).tobytes())
            if labels is not None:
                with archive.open("arr_1.npy", "w") as f:
                    npy.write_array(f, np.asarray([label_of(k, labels) for k in range(num_images)], dtype=np.int64))

    path = Path(folder) / SAMPLES_NPZ
    atomic_write(path, write)
    return {"file": SAMPLES_NPZ, "sha256": sha256_of(path), "num_images": num_images,
            "arrays": "arr_0: uint8 NHWC, image k at index k" + ("; arr_1: image k's class" if labels is not None else "")}


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
    labels: Optional[Sequence[int]] = None,
    guidance_scale: float = 1.0,
    timesteps: Optional[Sequence[int]] = None,
) -> dict:
    """Draw this process's missing images of 0..num_images-1 into `folder` (of a class-conditional pipeline: image k
    of class `label_of(k, labels)`, with classifier-free guidance `guidance_scale`; with `timesteps`, on that chain
    instead of `num_inference_steps` spaced ones). Returns counts and images/s."""
    problem = count_problem(num_images, batch_size, num_inference_steps)
    if problem:
        raise UsageError(problem + ".")
    return draw_missing(pipe, folder, num_images, batch_size=batch_size, num_inference_steps=num_inference_steps, seed=seed,
                        eta=eta, rank=rank, world_size=world_size, progress=progress, labels=labels,
                        guidance_scale=guidance_scale, timesteps=timesteps)


def draw_missing(pipe, folder, num_images: int, *, batch_size: int, num_inference_steps: int, seed: int,
                 eta: Optional[float], rank: int, world_size: int, progress: bool, labels: Optional[Sequence[int]],
                 guidance_scale: float, timesteps: Optional[Sequence[int]]) -> dict:
    """`sample_to_folder` on counts its caller has checked (`sample_command` checks them before its record is written)."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.png.tmp-*"):  # half-written files of a killed run (this rank's share)
        match = _NAME.match(stale.name[1:].split(".tmp-")[0])
        if match and handles(int(match.group(1)), rank, world_size):
            stale.unlink(missing_ok=True)
    mine = len(process_share(num_images, rank, world_size))
    done = {k for k in complete_images(folder, seed, labels) if k >= num_images or not handles(k, rank, world_size) or
            decodes(folder / image_name(k, seed, labels))}  # this process's damaged images are drawn again
    kept = mine - len(process_share(num_images, rank, world_size, skip=done))
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    # the bar counts image-steps (each image's chain steps), so it moves within a batch of 1000-step chains
    steps = len(timesteps) if timesteps is not None else num_inference_steps
    bar = tqdm(total=mine * steps, initial=kept * steps, disable=not progress, unit="step", desc="Sampling",
               unit_scale=True, postfix=f"{kept}/{mine} img")
    guided = {} if labels is None else {"label_of": lambda k: label_of(k, labels), "guidance_scale": guidance_scale}
    if timesteps is not None:
        guided["timesteps"] = list(timesteps)
    saved = kept
    for ks, images in draw_share(pipe, num_images, lambda k: seed + k, rank, world_size, batch_size, skip=done,
                                 step_progress=bar.update, num_inference_steps=num_inference_steps, output_type="pil",
                                 eta=eta, **guided):
        for k, image in zip(ks, images):
            atomic_save_image(image, folder / image_name(k, seed, labels))
        saved += len(ks)
        bar.set_postfix_str(f"{saved}/{mine} img")
    bar.close()
    seconds = time.perf_counter() - start
    written = mine - kept
    return {"written": written, "kept": kept, "seconds": seconds,
            "images_per_s": written / seconds if written and seconds > 0 else None}


def sample_command(pipe, *, pipeline_name: str, folder, num_images: int, batch_size: int, sampler: str,
                   num_inference_steps: int, eta: Optional[float], seed: int, overwrite: bool = False, state=None,
                   dtype: str = "fp32", labels: Optional[Sequence[int]] = None, guidance_scale: float = 1.0,
                   npz: bool = False, timestep_spacing: Optional[str] = None, timesteps: str = "uniform") -> dict:
    """`ddpm-sample`: refuse a folder drawn with other settings (before drawing anything), record the protocol
    in sampling.json, draw this process's missing images, then record how many the folder holds. A class-conditional
    pipeline's `labels` (image k of class labels[k mod their count]) and `guidance_scale` are part of the protocol.
    With `npz`, images 0..num_images-1 are also written as samples.npz (`write_npz`); one drawn again (--overwrite),
    removed or changed since its record is removed with its record, so the record describes exactly the files.
    `timestep_spacing` respaces the sampler's N steps (recorded in its scheduler_config); `timesteps` `quadratic` is
    the DDIM paper's chain instead (recorded with its timesteps)."""
    problem = count_problem(num_images, batch_size, num_inference_steps)
    if problem:  # before sampling.json is written: the corrected command finds the folder as it was
        raise UsageError(problem + ".")
    with_spacing(use_scheduler(pipe, sampler), timestep_spacing)
    chain = chain_timesteps(timesteps, num_inference_steps, pipe.scheduler)
    if chain is None:  # a spacing diffusers' DDIM step would not follow: its chain, followed by Eq. 12 (recorded)
        from ddpm_hf.diffusion.ddim import followed_chain

        chain = followed_chain(pipe.scheduler, num_inference_steps)
    if chain is not None and not takes_timesteps(pipe.scheduler):
        raise UsageError(f"--timesteps {timesteps} needs a sampler that takes a list of timesteps, and --scheduler "
                         f"{sampler} steps by one fixed stride; use --scheduler ddpm or dpm-solver with it.")
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(pipe.unet), "scheduler": sampler,
        "scheduler_config": dict(pipe.scheduler.config), "num_inference_steps": num_inference_steps, "eta": eta,
        "seed": seed, "noise": NOISE, "dtype": dtype, "weights": "EMA" if (Path(pipeline_name) / TRAINING_CONFIG).is_file() else "as published",
    }
    if labels is not None:  # recorded only where drawn: an unconditional folder's protocol stays as it was
        protocol.update(class_labels=list(labels), class_names=[pipe.class_names[k] for k in labels]
                        if pipe.class_names else None, guidance_scale=guidance_scale)
    if chain is not None:  # recorded only where used: a folder drawn before these flags keeps its protocol
        protocol.update(timesteps=timesteps, chain=chain)
    if epsilon_from_clipped_x0(pipe.scheduler):  # recorded only where used (DDIM): its images are not the old ones
        protocol.update(epsilon_from_clipped_x0=True)
    cast_network(pipe.unet, dtype)
    with FolderJob(folder, SAMPLING_FILE, protocol, state, free=("pipeline", "num_images", "complete", "npz", IMAGE_HASHES),
                   results=sampled_files) as job:
        job.check("images drawn", "draw again from scratch", overwrite)
        found = job.recorded()  # read once: the record as the folder holds it
        if job.is_main and found:  # an npz half-written by a killed run (as large as the folder's images)
            for stale in job.folder.glob(f".{SAMPLES_NPZ}.tmp-*"):
                stale.unlink(missing_ok=True)
        recorded = {} if overwrite else found
        known = verified_images(job.folder, recorded)  # on every process: each stops on a changed image alike
        wrong = misnamed_image(job.folder, seed, labels) if recorded else None
        if wrong is not None:  # the record has these settings: a name they do not give was not drawn under it
            raise UsageError(f"{wrong[0]} is not named as this folder names image {wrong[1]} "
                             f"({image_name(wrong[1], seed, labels)}): renamed by hand, or put there; move it out of "
                             "the folder.")
        recorded_npz, npz_path = found.get("npz"), job.folder / SAMPLES_NPZ
        npz_record = None if overwrite else recorded_npz
        if npz_record and not (npz_path.is_file() and sha256_of(npz_path) == npz_record.get("sha256")):
            npz_record = None  # ours (its record says so), changed since: removed below, once the folder is the job's
        held = complete_images(job.folder, seed, labels) if recorded.get("complete") else set()
        if (recorded.get("complete") and recorded.get("num_images") == len(held) == len(known)
                and held >= set(range(num_images)) and npz_record == recorded_npz
                and (not npz or (npz_record or {}).get("num_images") == num_images)):
            # nothing to draw or record: the folder is left as it is (a folder the user made read-only, too)
            mine = len(process_share(num_images, job.rank, job.world))
            return {"written": 0, "kept": mine, "seconds": 0.0, "images_per_s": None}
        if job.is_main and recorded_npz and npz_record is None:  # its images drawn again, or it changed since
            npz_path.unlink(missing_ok=True)
        job.start(drawn_images(job.folder) if overwrite else (), overwrite, num_images=None, complete=False,
                  npz=npz_record, **{IMAGE_HASHES: known})
        result = draw_missing(pipe, job.folder, num_images, batch_size=batch_size, num_inference_steps=num_inference_steps,
                              seed=seed, eta=eta, rank=job.rank, world_size=job.world, progress=job.shows_progress,
                              labels=labels, guidance_scale=guidance_scale, timesteps=chain)
        if job.finish():  # the protocol describes exactly the images beside it
            held = complete_images(job.folder, seed, labels)
            hashes = image_hashes(job.folder, [image_name(k, seed, labels) for k in held], known)
            if npz:  # every image 0..num_images-1 is in the folder once every process has finished
                npz_record = write_npz(job.folder, num_images, seed, labels)
            job.record(num_images=len(held), complete=len(held) >= num_images, npz=npz_record, **{IMAGE_HASHES: hashes})
        return result
