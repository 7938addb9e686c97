"""What `ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` does: the variational bound of a pipeline in
bits/dim (`ddpm_hf.likelihood`) on a dataset split or a folder of images.

Image k of the set is measured by process k mod N under `accelerate launch`, with its noise from a generator
seeded by (seed, k), and its result written to OUTPUT_DIR/images/{k:06d}.npz under a temporary name and renamed:
a killed run restarts where it stopped (a damaged file is measured again), and the numbers do not depend on
the batch size or the number of processes. The protocol (weights hash, T, variance type, clipping, data, seed)
is recorded in OUTPUT_DIR/nll_protocol.json before the first image; a rerun with other settings is refused.
At the end nll.json holds the mean and standard error of each term with that protocol, and nll_terms.png the
mean bound term per timestep.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional, Set

import numpy as np
import torch

from .data import load_images
from .likelihood import TERMS, bits_per_dim_of_share, summarize
from .outputs import (
    atomic_write_bytes,
    atomic_write_json,
    check_provenance,
    remove_stale_temporaries,
    state_dict_sha256,
    tmp_sibling,
)
from .sampling import process_share

PROTOCOL_FILE = "nll_protocol.json"


def image_file(folder: Path, k: int) -> Path:
    return Path(folder) / "images" / f"{k:06d}.npz"


def read_image_result(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """The terms of one image, or None if the file is missing or damaged."""
    try:
        with np.load(path) as data:
            result = {name: data[name] for name in (*TERMS, "terms")}
        return result if all(np.all(np.isfinite(v)) for v in result.values()) else None
    except (OSError, ValueError, KeyError, EOFError):
        return None


def write_image_result(path: Path, terms: Dict[str, torch.Tensor], i: int) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: terms[name][i].cpu().numpy() for name in (*TERMS, "terms")})
    atomic_write_bytes(path, buffer.getvalue())


def done_images(folder: Path, num_images: int) -> Set[int]:
    done = set()
    for path in (Path(folder) / "images").glob("*.npz"):
        if path.stem.isdigit() and int(path.stem) < num_images:
            if read_image_result(path) is None:
                path.unlink()  # damaged: measured again
            else:
                done.add(int(path.stem))
    return done


def plot_terms(per_timestep: np.ndarray, path: Path) -> None:
    """nll_terms.png: the mean bound term (bits/dim) at each training index t; t = 0 is the decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(np.arange(len(per_timestep)), per_timestep, lw=1.2)
    ax.set_xlabel("training index t (0: the decoder L_0)")
    ax.set_ylabel("bound term (bits/dim)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Terms of the variational bound: total {per_timestep.sum():.4f} bits/dim without L_T")
    fig.tight_layout()
    tmp = tmp_sibling(Path(path))
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


def measure(pipe, pipeline_name: str, folder, dataset: str, num_images: int, split: str = "test", batch_size: int = 64,
            seed: int = 0, clip_denoised: bool = True, dataset_config: Optional[str] = None,
            image_column: Optional[str] = None, overwrite: bool = False, output=None, state=None) -> Optional[dict]:
    """Measure this process's share (`state`: an accelerate PartialState, or None for one process); the main
    process then writes nll.json (at `output`, default folder/nll.json) and returns it."""
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    is_main = state.is_main_process if state else True
    folder, unet, scheduler = Path(folder), pipe.unet, pipe.scheduler
    protocol = {
        "pipeline": pipeline_name, "weights_sha256": state_dict_sha256(unet), "scheduler": dict(scheduler.config),
        "num_train_timesteps": scheduler.config.num_train_timesteps, "variance_type": scheduler.config.variance_type,
        "prediction_type": scheduler.config.prediction_type, "clip_denoised": clip_denoised, "dataset": dataset,
        "dataset_config": dataset_config, "split": split, "image_column": image_column,
        "resolution": unet.config.sample_size, "channels": unet.config.in_channels, "seed": seed,
        "noise": "image k: torch.Generator seeded by ddpm_hf.seeding.mix_seed(seed, k, NLL_SEED_TAG), t = T-1 .. 0",
        "convention": "improved DDPM calc_bpd_loop: index t = 0..T-1, decoder at t = 0 (exact normal CDF), bits/dim",
    }
    # before any image is decoded or measured
    check_provenance(folder, PROTOCOL_FILE, protocol, "a bits/dim measurement", "measure again from scratch", overwrite)
    images = load_images(dataset, split, num_images, unet.config.in_channels, unet.config.sample_size, dataset_config,
                         image_column)
    if is_main:
        (folder / "images").mkdir(parents=True, exist_ok=True)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in (folder / "images").glob("*.npz"):
                path.unlink()
        remove_stale_temporaries(folder / "images")
        atomic_write_json(folder / PROTOCOL_FILE, protocol)
    if state:
        state.wait_for_everyone()
    todo = process_share(num_images, rank, world, skip=done_images(folder, num_images))
    bar = tqdm(total=len(todo), disable=not (state.is_local_main_process if state else True), unit="img", desc="Bits/dim")
    for ks, terms in bits_per_dim_of_share(unet, scheduler, images, todo, seed, batch_size, clip_denoised):
        for i, k in enumerate(ks):
            write_image_result(image_file(folder, k), terms, i)
        bar.update(len(ks))
    bar.close()
    if state:
        state.wait_for_everyone()
    return write_summary(folder, num_images, protocol, output) if is_main else None


def write_summary(folder: Path, num_images: int, protocol: dict, output=None) -> dict:
    results = [read_image_result(image_file(folder, k)) for k in range(num_images)]
    missing = [k for k, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no result in {folder}/images (first: {missing[0]}); run again.")
    per_image = {term: torch.tensor(np.array([r[term] for r in results]), dtype=torch.float64) for term in TERMS}
    per_timestep = np.mean([r["terms"] for r in results], axis=0)
    summary = {"bits_per_dim": summarize(per_image), "num_images": num_images,
               "per_timestep_mean": per_timestep.tolist(), "protocol": protocol}
    atomic_write_json(Path(output) if output else folder / "nll.json", summary)
    plot_terms(per_timestep, folder / "nll_terms.png")
    return summary
