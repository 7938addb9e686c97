"""`ddpm-ema --keep best`: the best post-hoc EMA of a sweep becomes the run's published pipeline (the weights the card
shows and `ddpm-push` uploads), saying which σ_rel it is.

The run folder's posthoc_ema.json records it: the σ_rel, the snapshots and weights it was mixed from, the sweep, and
the SHA-256 of the UNet weights it describes. It is written before the pipeline is replaced, and it counts only while
the folder's UNet weights are those it names (`model_card.published_posthoc`): a kill in between, or a training run that later
writes its own EMA pipeline there, leaves a record that no longer describes the weights beside it, and the card then
says they are the run's EMA, as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddpm_hf.errors import StateError
from ddpm_hf.outputs.files import atomic_write_bytes, atomic_write_json
from ddpm_hf.outputs.folder_lock import FolderLock, holder_text
from ddpm_hf.outputs.run_folder import (
    EMA_SWEEP_PLOT,
    PIPELINE_HASHES,
    POSTHOC_RECORD,
    RUN_MARKER,
    UNET_WEIGHTS,
    posthoc_pipeline_dir,
)
from ddpm_hf.publishing.model_card import write_model_card


def publish_best(run_dir: Path, output_dir: Path, sweep: dict) -> dict:
    """Make the sweep's best pipeline the run's own (under the run folder's lock: never while it trains); rewrite the
    card. Returns the run's new posthoc_ema.json."""
    from ddpm_hf.saved.weights import load_pipeline, save_pipeline

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    best = sweep["best"]
    source = output_dir / posthoc_pipeline_dir(best["sigma_rel"])
    lock = FolderLock(run_dir, RUN_MARKER, named=str(run_dir), what="ddpm-ema --keep best")
    holder = lock.acquire()
    if holder is not None:
        raise StateError(f"{run_dir} is in use by a training run ({holder_text(holder)}); run --keep best once it "
                         "has ended.")
    try:
        mixed = json.loads((source / POSTHOC_RECORD).read_text())
        record = {
            **mixed, "metric": sweep["metric"], "value": best["value"], "error": best["error"],
            "sweep": sweep["rows"], "fixed_ema": sweep.get("fixed_ema"), "made_by": "ddpm-ema --keep best",
            "unet_sha256": json.loads((source / PIPELINE_HASHES).read_text())[UNET_WEIGHTS],
            "replaces": "the run's fixed-decay EMA weights (its last checkpoint's ema.safetensors keeps them)",
        }
        atomic_write_json(run_dir / POSTHOC_RECORD, record)  # first: it counts once the weights it names are there
        save_pipeline(load_pipeline(str(source)), run_dir)
        atomic_write_bytes(run_dir / EMA_SWEEP_PLOT, (output_dir / EMA_SWEEP_PLOT).read_bytes())
        write_model_card(run_dir)
    finally:
        lock.release(abandon=True)  # the run's marker as it was found: this is no training run
    return record
