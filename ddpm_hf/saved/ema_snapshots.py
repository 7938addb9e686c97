"""Post-hoc EMA's snapshots in a run folder: written by training (--ema_posthoc), read back by `ddpm-ema`.

`ema_snapshots/step-<step>-sigma_rel-<σ>.safetensors` holds one tracked power EMA's weights after a step, in fp16 or
fp32, its step, σ_rel and γ in the file's metadata (one JSON entry: safetensors orders several at random); `ema_snapshots/snapshots.json` lists every snapshot with its
SHA-256. Each file is written under a temporary name and renamed into place, then the index is rewritten (atomically):
a file the index does not list is not a snapshot (a kill between the two leaves one that the next write of that step
replaces), and a listed one whose bytes changed is refused by name when read.

Importing this module is light (torch loads on first use): `ddpm-ema` checks a run's snapshots before torch loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from ddpm_hf.errors import StateError
from ddpm_hf.outputs.files import atomic_write, atomic_write_json, remove_atomically, sha256_of
from ddpm_hf.outputs.run_folder import EMA_SNAPSHOTS_DIR, SNAPSHOT_INDEX, snapshot_file

if TYPE_CHECKING:
    import torch


class SnapshotError(StateError):
    """A snapshot that is missing, damaged or does not fit: one line naming it."""


def snapshot_index(run_dir: Path) -> List[dict]:
    """The snapshots a run folder lists ({file, step, t, sigma_rel, gamma, dtype, sha256}), by step then σ_rel; [] for
    a folder without any."""
    path = Path(run_dir) / EMA_SNAPSHOTS_DIR / SNAPSHOT_INDEX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["snapshots"]
    except (ValueError, KeyError, TypeError):
        raise SnapshotError(f"{path} is damaged (it does not read as the index ddpm_hf writes); the snapshots cannot be "
                            "told apart from other files, so none is used.") from None
    return sorted(entries, key=lambda e: (e["step"], e["sigma_rel"]))


def _write_index(run_dir: Path, entries: List[dict]) -> None:
    atomic_write_json(Path(run_dir) / EMA_SNAPSHOTS_DIR / SNAPSHOT_INDEX,
                      {"snapshots": sorted(entries, key=lambda e: (e["step"], e["sigma_rel"]))})


def write_snapshots(run_dir: Path, step: int, averages, dtype: str) -> List[dict]:
    """A snapshot of each of `averages` (a PowerEMA) after `step`, in `dtype` (fp16 or fp32), listed in the index
    (replacing an earlier one of the same step and σ_rel: a resumed run redoing the steps after its checkpoint).
    Returns the new entries."""
    import torch
    from safetensors.torch import save_file

    as_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]  # SNAPSHOT_DTYPES
    folder = Path(run_dir) / EMA_SNAPSHOTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for sigma_rel, gamma, model in zip(averages.sigma_rels, averages.gammas, averages.models):
        name = snapshot_file(step, sigma_rel)
        weights = {k: v.detach().to(as_dtype).contiguous().cpu() for k, v in model.state_dict().items()}
        about = {"step": step, "t": averages.t, "sigma_rel": sigma_rel, "gamma": gamma, "dtype": dtype}
        atomic_write(folder / name, lambda tmp: save_file(weights, str(tmp), metadata={"ddpm_hf": json.dumps(about, sort_keys=True)}))
        written.append({"file": name, **about, "sha256": sha256_of(folder / name)})
    kept = [e for e in snapshot_index(run_dir) if e["file"] not in {w["file"] for w in written}]
    _write_index(run_dir, kept + written)
    return written


def drop_snapshots_after(run_dir: Path, step: int) -> List[str]:
    """Remove the snapshots after `step` (a run resumed from the checkpoint of `step`, or started over at 0, redoes
    them; until then they belong to a run that no longer continues): the index first, then each file. Returns their
    names."""
    entries = snapshot_index(run_dir)
    dropped = [e for e in entries if e["step"] > step]
    if not dropped:
        return []
    _write_index(run_dir, [e for e in entries if e["step"] <= step])
    for entry in dropped:
        path = Path(run_dir) / EMA_SNAPSHOTS_DIR / entry["file"]
        if path.is_file():
            remove_atomically(path)
    return [e["file"] for e in dropped]


def snapshot_problem(run_dir: Path, entry: dict) -> Optional[str]:
    """Why a listed snapshot cannot be used (missing, or its bytes no longer those it was written with); None if
    intact."""
    path = Path(run_dir) / EMA_SNAPSHOTS_DIR / entry["file"]
    if not path.is_file():
        return f"{EMA_SNAPSHOTS_DIR}/{entry['file']} is missing"
    if sha256_of(path) != entry["sha256"]:
        return f"{EMA_SNAPSHOTS_DIR}/{entry['file']} does not match its SHA-256 (it changed after it was written)"
    return None


def load_snapshot(run_dir: Path, entry: dict) -> Dict[str, torch.Tensor]:
    """A verified snapshot's weights, in float32."""
    from safetensors.torch import load_file

    problem = snapshot_problem(run_dir, entry)
    if problem:
        raise SnapshotError(f"{problem}; that snapshot cannot be used.")
    return {k: v.float() for k, v in load_file(str(Path(run_dir) / EMA_SNAPSHOTS_DIR / entry["file"])).items()}


def snapshots_until(run_dir: Path, at_step: Optional[int] = None) -> List[dict]:
    """The listed snapshots up to `at_step` (default: the last snapshot's step), which a reconstruction there mixes."""
    entries = snapshot_index(run_dir)
    if at_step is None and entries:
        at_step = max(e["step"] for e in entries)
    return [e for e in entries if e["step"] <= (at_step or 0)]


def reconstructed_weights(run_dir: Path, entries: List[dict], mixes: Dict[float, List[float]]
                          ) -> Dict[float, Dict[str, "torch.Tensor"]]:
    """For each mix {key: weights x (phema.reconstruction's)}, Σ x_i θ̂_i over the snapshots `entries`, in float32:
    one pass over the snapshots, each read and verified once whatever the number of mixes, summed in float64 (memory
    holds one total per mix and one snapshot)."""
    totals: Dict[float, Dict[str, "torch.Tensor"]] = {key: {} for key in mixes}
    for i, entry in enumerate(entries):
        snapshot = load_snapshot(run_dir, entry)
        for key, weights in mixes.items():
            total = totals[key]
            for name, value in snapshot.items():
                term = value.double() * float(weights[i])
                total[name] = total[name] + term if name in total else term
    return {key: {k: v.float() for k, v in total.items()} for key, total in totals.items()}
