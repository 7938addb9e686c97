"""What `ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` does: the variational bound of a pipeline in
bits/dim (`likelihood`) on a dataset split or a folder of images, as a resumable folder job (`folder_jobs`).

Image k of the set is measured by process k mod N under `accelerate launch`, with its noise from a generator
seeded by (seed, k), and its result written to OUTPUT_DIR/images/{k:06d}.npz under a temporary name and renamed:
a killed run restarts where it stopped (a damaged file is measured again), and the numbers do not depend on
the batch size or the number of processes. Each result carries the SHA-256 of the pixels it was measured on, so a
rerun after the data changed under the same name measures the changed images again, and nll.json names the data by
content (the images' hash and the source files' fingerprint), not only by path. The protocol (weights hash, T, variance type, clipping, data, seed)
is recorded in OUTPUT_DIR/nll_protocol.json before the first image; a rerun with other settings is refused.
At the end nll.json holds the mean and standard error of each term with that protocol, and nll_terms.png the
mean bound term per timestep.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from ddpm_hf.data.decoding import image_fit_note, images_of
from ddpm_hf.data.sources import first_rows
from ddpm_hf.data.fingerprints import image_sha256, images_sha256, source_fingerprint
from ddpm_hf.diffusion.likelihood import GIVEN_CLASS, summarize, TERMS
from ddpm_hf.measuring.bound import bits_per_dim_of_share
from ddpm_hf.errors import StateError, UsageError
from ddpm_hf.outputs.files import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from ddpm_hf.outputs.folder_jobs import FolderJob
from ddpm_hf.outputs.plots import plot_bound_terms
from ddpm_hf.outputs.run_folder import NLL
from ddpm_hf.saved.weights import state_dict_sha256
from ddpm_hf.pipelines.counter_noise import NOISE
from ddpm_hf.sampling.samplers import cast_network

PROTOCOL_FILE = "nll_protocol.json"
TERMS_PLOT = "nll_terms.png"


def image_file(folder: Path, k: int) -> Path:
    return Path(folder) / "images" / f"{k:06d}.npz"


def read_image_result(path: Path, image_hash: Optional[str] = None) -> Optional[Dict[str, np.ndarray]]:
    """The terms of one image, or None if the file is missing or damaged, or (given `image_hash`) was measured on
    other pixels than the image now at its index."""
    try:
        with np.load(path) as data:
            result = {name: data[name] for name in (*TERMS, "terms")}
            measured_on = str(data["image_sha256"]) if "image_sha256" in data.files else None
        if image_hash is not None and measured_on != image_hash:
            return None
        return result if all(np.all(np.isfinite(v)) for v in result.values()) else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def write_image_result(path: Path, terms: Dict[str, torch.Tensor], i: int, image_hash: str) -> None:
    """Image k's terms, with the SHA-256 of the pixels they were measured on: a rerun after the data changed
    measures that image again instead of keeping its old result."""
    buffer = io.BytesIO()
    np.savez(buffer, image_sha256=np.array(image_hash),
             **{name: terms[name][i].cpu().numpy() for name in (*TERMS, "terms")})
    atomic_write_bytes(path, buffer.getvalue())


def done_images(folder: Path, hashes: Sequence[str]) -> Tuple[Set[int], int]:
    """(the images whose result is kept, how many results were of other pixels than the image now at their index:
    measured again); a damaged result is removed and measured again."""
    done, changed = set(), 0
    for path in (Path(folder) / "images").glob("*.npz"):
        if path.stem.isdigit() and int(path.stem) < len(hashes):
            k = int(path.stem)
            if read_image_result(path) is None:
                path.unlink()  # damaged: measured again
            elif read_image_result(path, hashes[k]) is None:
                changed += 1
            else:
                done.add(k)
    return done, changed


def measure(pipe, *, pipeline_name: str, folder, dataset: str, num_images: int, split: str = "test", batch_size: int = 64,
            seed: int = 0, clip_denoised: bool = True, dataset_config: Optional[str] = None,
            image_column: Optional[str] = None, overwrite: bool = False, output=None, state=None,
            notify: Callable[[str], None] = lambda message: None, dtype: str = "fp32",
            label_column: Optional[str] = None) -> Optional[dict]:
    """Measure this process's share (`state`: an accelerate PartialState, or None for one process); the main
    process then writes nll.json (at `output`, default folder/nll.json) and returns it. Images of other channels than
    the pipeline's are refused; a resize to its size is told to `notify` (on the main process). A class-conditional
    pipeline is measured given each image's label (its dataset's ClassLabel column, or `label_column`): the bound of
    -log p(x_0 | c)."""
    from ddpm_hf.pipelines.guidance import num_classes

    unet, scheduler = pipe.unet, pipe.scheduler
    conditional = num_classes(unet) is not None
    if label_column is not None and not conditional:
        raise UsageError("--label_column is for a class-conditional pipeline, and this one is unconditional; drop it.")
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(unet), "scheduler": dict(scheduler.config),
        "num_train_timesteps": scheduler.config.num_train_timesteps, "variance_type": scheduler.config.variance_type,
        "prediction_type": scheduler.config.prediction_type, "clip_denoised": clip_denoised, "dataset": dataset,
        "dataset_config": dataset_config, "split": split, "image_column": image_column,
        "resolution": unet.config.sample_size, "channels": unet.config.in_channels, "seed": seed,
        "noise": f"image k: seed ddpm_hf.seeding.mix_seed(seed, k, NLL_SEED_TAG), term t: {NOISE}",
        "convention": "improved DDPM calc_bpd_loop: index t = 0..T-1, decoder at t = 0 (exact normal CDF), bits/dim",
        "dtype": dtype,
    }
    if conditional:  # recorded only there: an unconditional folder's protocol stays as it was
        protocol.update(given=GIVEN_CLASS, label_column=label_column)
    cast_network(unet, dtype)
    with FolderJob(folder, PROTOCOL_FILE, protocol, state, results=lambda f: (f / "images").glob("*.npz")) as job:
        job.check("a bits/dim measurement", "measure again from scratch", overwrite)  # before any image is decoded
        rows = first_rows(dataset, split, num_images, dataset_config)
        note = image_fit_note(rows, unet.config.in_channels, unet.config.sample_size, image_column)
        if note and job.is_main:
            notify(note)
        images = images_of(rows, unet.config.in_channels, unet.config.sample_size, image_column)
        hashes = [image_sha256(image) for image in images.numpy()]
        labels = held_out_labels(rows, label_column, pipe) if conditional else None
        if labels is not None:  # a result is of the pixels and the label: either changed, it is measured again
            hashes = [labelled_sha256(h, int(c)) for h, c in zip(hashes, labels)]
        results = job.folder / "images"
        if job.is_main:
            results.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(results)
            if output:
                Path(output).parent.mkdir(parents=True, exist_ok=True)
        job.start(results.glob("*.npz") if overwrite else (), overwrite)
        done, changed = done_images(job.folder, hashes)
        if changed and job.is_main:
            notify(f"{changed} of the images in {folder}/images were measured on other pixels than --dataset {dataset} "
                   "now holds at their index (the data changed); they are measured again")
        todo = job.todo(num_images, done)
        # the bar counts image-terms (each image's T terms), so that it moves within a batch's 1000 network calls
        bar = job.bar(len(todo) * scheduler.config.num_train_timesteps, "Bits/dim", "term")
        for ks, terms in bits_per_dim_of_share(unet, scheduler, images, todo, seed, batch_size, clip_denoised,
                                               labels=labels, term_done=bar.update):
            for i, k in enumerate(ks):
                write_image_result(image_file(job.folder, k), terms, i, hashes[k])
        bar.close()
        if not job.finish():
            return None
        data = {"images_sha256": images_sha256(hashes), "source": source_fingerprint(dataset)}
        return write_summary(job.folder, hashes, {**protocol, "data": data}, output)


def held_out_labels(rows, label_column: Optional[str], pipe) -> torch.Tensor:
    """The class labels of the measured images (`find_label_column`, `class_names_of`): refused in one line where the
    data's classes are not the pipeline's."""
    from ddpm_hf.data.columns import check_same_classes, class_names_of, find_label_column
    from ddpm_hf.pipelines.guidance import num_classes

    column = find_label_column(rows.features, label_column)
    check_same_classes(class_names_of(rows, column), pipe.class_names or [str(k) for k in range(num_classes(pipe.unet))],
                       column)
    return torch.as_tensor(np.asarray(rows.with_format(None)[column]), dtype=torch.int64)


def labelled_sha256(image_hash: str, label: int) -> str:
    """The SHA-256 that names an image and its class label together."""
    return hashlib.sha256(f"{image_hash} class {label}".encode()).hexdigest()


def write_summary(folder: Path, hashes: Sequence[str], protocol: dict, output=None) -> dict:
    """nll.json from the per-image results of exactly the images `hashes` names (each measured on those pixels)."""
    num_images = len(hashes)
    results = [read_image_result(image_file(folder, k), hashes[k]) for k in range(num_images)]
    missing = [k for k, r in enumerate(results) if r is None]
    if missing:
        raise StateError(f"{len(missing)} images have no result in {folder}/images (first: {missing[0]}); run again.")
    per_image = {term: torch.tensor(np.array([r[term] for r in results]), dtype=torch.float64) for term in TERMS}
    per_timestep = np.mean([r["terms"] for r in results], axis=0)
    summary = {"bits_per_dim": summarize(per_image), "num_images": num_images,
               "per_timestep_mean": per_timestep.tolist(), "protocol": protocol}
    atomic_write_json(Path(output) if output else folder / NLL, summary)
    plot_bound_terms(per_timestep, folder / TERMS_PLOT, summary["bits_per_dim"]["prior"]["mean"])
    return summary
