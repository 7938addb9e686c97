"""`ddpm-ema`'s work: post-hoc EMA pipelines reconstructed from a run's snapshots (Karras et al. 2024), and the sweep
over σ_rel measured with the project's own measuring code.

1. `plan`: what the run's snapshots can give, checked without torch: the snapshots up to the step asked, the solve for
   each σ_rel (diffusion/phema.py) and how near its mix comes to the asked profile, every snapshot's hash;
2. `write_pipelines`: one pipeline per σ_rel (the run's pipeline with the reconstructed weights), written whole under
   a temporary name and renamed into place, with its provenance (posthoc_ema.json: which snapshots, which weights,
   the profile's error); a rerun keeps the ones already made from the same snapshots;
3. `measure_sweep`: each pipeline's bits/dim (ddpm-nll's measurement, on the same images and noise for every σ_rel,
   so that their differences are the weights'), or the FID / FD_DINOv2 of its samples (ddpm-sample's and
   ddpm-metrics' code, the same seeds for every σ_rel), and the run's own fixed-decay EMA beside them; the table,
   the plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional, Sequence

from ddpm_hf.diffusion.phema import SIGMA_REL_WIDEST, reconstruction, sigma_rel_problem
from ddpm_hf.errors import MissingError, UsageError
from ddpm_hf.outputs.files import atomic_write_json, atomic_write_text, replace_dir, tmp_sibling
from ddpm_hf.outputs.folder_jobs import FolderJob
from ddpm_hf.outputs.run_folder import (
    EMA_SNAPSHOTS_DIR,
    EMA_SWEEP,
    EMA_SWEEP_PLOT,
    EMA_SWEEP_TABLE,
    MODEL_INDEX,
    POSTHOC_RECORD,
    SNAPSHOT_INDEX,
    TRAIN_SUMMARY,
    TRAINING_CONFIG,
    posthoc_pipeline_dir,
)
from ddpm_hf.saved.ema_snapshots import snapshot_index, snapshot_problem, snapshots_until

# A mix of snapshots further than this from the asked averaging profile (relative L2) is not that EMA: refused.
MAX_PROFILE_ERROR = 0.10
SWEEP_POINTS = 5  # σ_rel values of a sweep no --sigma_rel names
# what --measure takes (each lower-is-better): the bound in bits/dim, or a Fréchet distance of samples in a feature space
MEASURES = ("nll", "fid", "fd_dinov2")
FEATURE_SPACE = {"fid": "inception", "fd_dinov2": "dinov2"}  # the feature network of each distance
METRIC_NAMES = {"nll": "bits/dim (NLL bound)", "fid": "FID", "fd_dinov2": "FD_DINOv2"}
MEASURED_DIR = "measured"  # OUTPUT_DIR/measured/<pipeline>/: each measurement's own folder job
FIXED_EMA = "fixed_ema"  # the run's own pipeline (its fixed-decay EMA), measured beside the sweep


# ---------------------------------------------------------------- 1. plan


def expressible(times: Sequence[float], gammas: Sequence[float], t: float) -> tuple:
    """The σ_rel range (low, high) the snapshots reproduce within MAX_PROFILE_ERROR, on a fine grid."""
    import numpy as np

    grid = np.geomspace(0.005, SIGMA_REL_WIDEST, 120)
    fine = [float(s) for s in grid if reconstruction(times, gammas, t, float(s))["relative_error"] <= MAX_PROFILE_ERROR]
    return (min(fine), max(fine)) if fine else (None, None)


def default_sweep(times: Sequence[float], gammas: Sequence[float], t: float, count: int = SWEEP_POINTS) -> List[float]:
    """`count` σ_rel evenly spread (in log) over the range the snapshots express, to 2 significant digits."""
    import numpy as np

    low, high = expressible(times, gammas, t)
    if low is None:
        raise UsageError("the run's snapshots express no EMA length within "
                         f"{MAX_PROFILE_ERROR:.0%}; train with denser snapshots (--ema_posthoc_every).")
    def inside(s: float) -> float:  # to 2 significant digits, rounded towards the range's inside
        unit = 10.0 ** (math.floor(math.log10(s)) - 1)
        rounded = round(s / unit) * unit
        if rounded > high:
            rounded = math.floor(high / unit) * unit
        elif rounded < low:
            rounded = math.ceil(low / unit) * unit
        return float(f"{rounded:.2g}")

    return sorted({inside(float(s)) for s in np.geomspace(low, high, count)})


def plan(run_dir: Path, sigma_rels: Optional[Sequence[float]], at_step: Optional[int] = None) -> dict:
    """What the run's snapshots give for each σ_rel (default: `default_sweep`) at `at_step` (default: the last
    snapshot's step), or one line
    saying why not: no snapshots, too few, a step with none, a σ_rel they cannot express, a damaged snapshot. Reads
    the index and hashes the snapshots; loads no network."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_INDEX).is_file() or not (run_dir / TRAINING_CONFIG).is_file():
        raise MissingError(f"{run_dir} is not a training run's folder (no {MODEL_INDEX} and {TRAINING_CONFIG}); give "
                           "the --output_dir of a run trained with --ema_posthoc.")
    everything = snapshot_index(run_dir)
    if not everything:
        raise MissingError(f"{run_dir} has no post-hoc EMA snapshots ({EMA_SNAPSHOTS_DIR}/{SNAPSHOT_INDEX}): it was not "
                           "trained with --ema_posthoc (which a resume cannot turn on); train a new run with --ema_posthoc.")
    steps = sorted({e["step"] for e in everything})
    if at_step is not None and at_step not in steps:
        raise UsageError(f"--at_step {at_step}: the run has no snapshot there; its snapshots are at steps "
                         f"{_listed(steps)}.")
    entries = snapshots_until(run_dir, at_step)
    times = sorted({e["t"] for e in entries})
    if len(times) < 2:
        raise UsageError(f"{run_dir} has snapshots at one step only ({times[0]}): a reconstruction mixes snapshots of "
                         "at least two steps; train on (resume the run) past its next snapshot.")
    t = max(times)
    ts, gammas = [e["t"] for e in entries], [e["gamma"] for e in entries]
    if sigma_rels is None:  # a sweep over what these snapshots express
        sigma_rels = default_sweep(ts, gammas, t)
    solved = {}
    for sigma in sigma_rels:
        problem = sigma_rel_problem(sigma)
        if problem:
            raise UsageError(f"--sigma_rel: {problem}.")
        solution = reconstruction(ts, gammas, t, sigma)
        if solution["relative_error"] > MAX_PROFILE_ERROR:
            low, high = expressible(ts, gammas, t)
            within = f"they express σ_rel {low:.3g} to {high:.3g} within {MAX_PROFILE_ERROR:.0%}" if low else \
                "they express no σ_rel that closely"
            raise UsageError(f"--sigma_rel {sigma:g}: the run's {len(entries)} snapshots reproduce that averaging profile "
                             f"only to {solution['relative_error']:.0%} (relative L2); {within}: ask within that range, or "
                             "train with snapshots nearer it (--ema_posthoc_sigma_rels, or denser --ema_posthoc_every).")
        solved[sigma] = solution
    for entry in entries:  # every snapshot read is verified, before any network loads
        problem = snapshot_problem(run_dir, entry)
        if problem:
            raise MissingError(f"{run_dir}: {problem}; the reconstruction would be wrong, so nothing is made. Restore the "
                               "file, or reconstruct at an earlier step (--at_step) that does not mix it.")
    return {"run": str(run_dir), "t": t, "entries": entries, "solved": solved}


def _listed(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{', '.join(map(str, steps[:4]))}, ..., {steps[-1]}"


def provenance(planned: dict, sigma: float) -> dict:
    """posthoc_ema.json of the pipeline of `sigma`: the snapshots mixed, each with its weight and hash."""
    solution = planned["solved"][sigma]
    return {
        "method": "post-hoc EMA (Karras et al. 2024, Sec. 3.2): least-squares mix of power-EMA snapshots",
        "run": planned["run"], "sigma_rel": sigma, "gamma": solution["gamma"], "t": planned["t"],
        "profile_relative_error": solution["relative_error"],
        "snapshots": [{"file": e["file"], "step": e["step"], "sigma_rel": e["sigma_rel"], "sha256": e["sha256"],
                       "weight": float(x)} for e, x in zip(planned["entries"], solution["weights"])],
    }


# ---------------------------------------------------------------- 2. the pipelines


def write_pipelines(planned: dict, output_dir: Path, state=None, overwrite: bool = False,
                    measure: Optional[dict] = None) -> List[Path]:
    """A pipeline per planned σ_rel under output_dir (this process's share of them), each made once: an existing
    one whose provenance matches is kept. Returns every σ_rel's folder."""
    from ddpm_hf.saved.ema_snapshots import reconstructed_weights
    from ddpm_hf.saved.weights import load_pipeline, pipeline_problem, save_pipeline

    output_dir = Path(output_dir)
    sigmas = list(planned["solved"])
    protocol = {"run": planned["run"], "at_step": planned["t"], "measure": measure,
                "snapshots": {e["file"]: e["sha256"] for e in planned["entries"]}}
    folders = [output_dir / posthoc_pipeline_dir(s) for s in sigmas]
    with FolderJob(output_dir, EMA_SWEEP, protocol, state, free=("run", "sigma_rels", "rows", "fixed_ema", "best"),
                   results=lambda f: f.glob("sigma_rel-*"), results_are="folders named as ddpm-ema's pipelines") as job:
        job.check("post-hoc EMA pipelines", "make them again from scratch", overwrite)
        job.start([], False, sigma_rels=sigmas)
        mine = job.todo(len(sigmas))  # this process's share
        bar = job.bar(len(mine), "Post-hoc EMA", "pipeline")
        records = {sigmas[k]: provenance(planned, sigmas[k]) for k in mine}
        todo = [s for s, folder in zip(sigmas, folders) if s in records and
                (overwrite or _recorded(folder) != records[s] or pipeline_problem(folder) is not None)]
        bar.update(len(mine) - len(todo))  # made before from the same snapshots: kept
        if todo:
            template = load_pipeline(planned["run"])
            mixed = reconstructed_weights(planned["run"], planned["entries"],
                                          {s: record_weights(records[s]) for s in todo})
            for sigma in todo:
                folder = output_dir / posthoc_pipeline_dir(sigma)
                template.unet.load_state_dict(mixed.pop(sigma))
                tmp = tmp_sibling(folder)
                save_pipeline(template, tmp)
                atomic_write_json(tmp / POSTHOC_RECORD, records[sigma])
                replace_dir(tmp, folder)
                bar.update(1)
        bar.close()
        job.finish()
    return folders


def record_weights(record: dict) -> List[float]:
    return [s["weight"] for s in record["snapshots"]]


def _recorded(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / POSTHOC_RECORD).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- 3. the sweep, measured


def measure_sweep(planned: dict, output_dir: Path, folders: Sequence[Path], measure: dict, state=None,
                  notify=lambda message: None, network=None) -> Optional[dict]:
    """Each pipeline's `measure["metric"]` (and the run's own pipeline's, where the sweep is at the run's last step):
    bits/dim with ddpm-nll's measurement on the same images and noise, or the Fréchet distance in `network`'s feature
    space of samples drawn with the same seeds; on the main process, ema_sweep.json's rows, ema_sweep.md and
    ema_sweep.png, and the result."""
    from ddpm_hf.outputs.plots import plot_ema_sweep
    from ddpm_hf.saved.weights import load_pipeline

    output_dir = Path(output_dir)
    device = state.device if state is not None else "cpu"
    fixed = _fixed_ema(Path(planned["run"]), planned["t"])
    targets = [(f"{posthoc_pipeline_dir(s)}", folder) for s, folder in zip(planned["solved"], folders)]
    if fixed is not None:
        targets.append((FIXED_EMA, Path(planned["run"])))
    values = {}
    for i, (name, folder) in enumerate(targets):
        pipe = load_pipeline(str(folder)).to(device)
        values[name] = measured_value(pipe, str(folder), output_dir / MEASURED_DIR / name, measure, state, network,
                                      notify if i == 0 else lambda message: None)  # a note once, not per pipeline
    if state is not None and not state.is_main_process:
        return None
    rows = [{"sigma_rel": s, **values[posthoc_pipeline_dir(s)], "pipeline": posthoc_pipeline_dir(s)}
            for s in planned["solved"]]
    best = min(rows, key=lambda r: r["value"])
    fixed_row = None
    if fixed is not None:
        fixed_row = {**values[FIXED_EMA], "label": fixed["label"], "ema_decay": fixed["decay"]}
    if fixed is not None and measure["metric"] == "nll":
        for row in rows:  # on the same images and noise, the paired difference is far surer than either mean
            row["minus_fixed_ema"] = paired_difference(output_dir / MEASURED_DIR / row["pipeline"],
                                                       output_dir / MEASURED_DIR / FIXED_EMA, measure["num_images"])
    metric = METRIC_NAMES[measure["metric"]]
    sweep = json.loads((output_dir / EMA_SWEEP).read_text())
    sweep.update(rows=rows, best=best, fixed_ema=fixed_row, metric=metric)
    atomic_write_json(output_dir / EMA_SWEEP, sweep)
    atomic_write_text(output_dir / EMA_SWEEP_TABLE, sweep_markdown(rows, best, fixed_row, metric, measure))
    plot_ema_sweep(rows, metric, output_dir / EMA_SWEEP_PLOT, fixed_row)
    return sweep


def measured_value(pipe, name: str, folder: Path, measure: dict, state, network, notify) -> Optional[dict]:
    """{"value", "error"} of one pipeline (the error: the standard error of the bits/dim; None for a distance),
    measured into its own `folder` (a folder job: resumable); None on processes other than the main one."""
    from ddpm_hf.measuring.folder_metrics import measure_folder
    from ddpm_hf.measuring.nll_folder import measure as measure_nll
    from ddpm_hf.outputs.run_folder import metrics_file
    from ddpm_hf.sampling.sample_folder import sample_command

    if measure["metric"] == "nll":
        result = measure_nll(pipe, pipeline_name=name, folder=folder, dataset=measure["dataset"],
                             num_images=measure["num_images"], split=measure["split"],
                             batch_size=measure["batch_size"], seed=measure["seed"], state=state, notify=notify)
        return result and {"value": result["bits_per_dim"]["total"]["mean"],
                           "error": result["bits_per_dim"]["total"]["sem"]}
    samples = folder / "samples"
    sample_command(pipe, pipeline_name=name, folder=samples, num_images=measure["num_images"],
                   batch_size=measure["batch_size"], sampler=measure["scheduler"],
                   num_inference_steps=measure["num_inference_steps"], eta=None, seed=measure["seed"], state=state)
    if state is not None and not state.is_main_process:
        return None
    result = measure_folder(samples, measure["reference"], network, split=measure["split"],
                            resolution=pipe.unet.config.sample_size, channels=pipe.unet.config.in_channels, kid=False,
                            isc=False, output=folder / metrics_file(network.kind), batch_size=measure["batch_size"],
                            device=pipe.device)
    return {"value": result[measure["metric"]], "error": None}


def paired_difference(folder_a: Path, folder_b: Path, num_images: int) -> dict:
    """The mean over images of a's bits/dim minus b's, each image measured with the same noise by both, and its
    standard error."""
    import numpy as np

    from ddpm_hf.measuring.nll_folder import image_file, read_image_result

    totals = [[float(read_image_result(image_file(folder, k))["total"]) for k in range(num_images)]
              for folder in (folder_a, folder_b)]
    d = np.array(totals[0]) - np.array(totals[1])
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None}


def _fixed_ema(run_dir: Path, t: int) -> Optional[dict]:
    """The run's own pipeline (its fixed-decay EMA) where it is of step `t` (the run ended there), else None."""
    try:
        steps = json.loads((run_dir / TRAIN_SUMMARY).read_text())["steps"]
        decay = json.loads((run_dir / TRAINING_CONFIG).read_text())["ema_decay"]
    except (OSError, ValueError, KeyError):
        return None
    if steps != t:
        return None
    return {"decay": decay, "label": f"the run's EMA (decay {decay:g})"}


def sweep_markdown(rows: List[dict], best: dict, fixed: Optional[dict], metric: str, measure: dict) -> str:
    paired_rows = any(row.get("minus_fixed_ema") for row in rows)
    if measure["metric"] == "nll":
        about = (f"{measure['num_images']} images of {measure['dataset']} ({measure['split']}), the same images and "
                 "noise for every row; mean ± standard error")
    else:
        about = (f"{measure['num_images']} samples of each pipeline ({measure['scheduler']}, "
                 f"{measure['num_inference_steps']} steps, the same seeds for every row) against "
                 f"{measure['reference']} ({measure['split']})")
    lines = [f"# Post-hoc EMA sweep: {metric}", "", about + (", and each row minus the run's own EMA, paired image by image"
                                                         if paired_rows else "") + ".", "",
             "| σ_rel | " + metric + (" | minus the run's EMA (paired) |" if paired_rows else " |"),
             "|---|---|" + ("---|" if paired_rows else "")]
    for row in sorted(rows, key=lambda r: r["sigma_rel"]):
        mark = " **(best)**" if row is best else ""
        paired = row.get("minus_fixed_ema")
        extra = f" {paired['mean']:+.4f} ± {paired['sem']:.4f} |" if paired and paired["sem"] is not None else \
            (" |" if paired_rows else "")
        lines.append(f"| {row['sigma_rel']:g} | {value_text(row)}{mark} |{extra}")
    if fixed is not None:
        lines.append(f"| {fixed['label']} | {value_text(fixed)} |" + (" 0 |" if measure["metric"] == "nll" else ""))
    return "\n".join(lines) + "\n"


def value_text(row: dict) -> str:
    """A measured value, with its standard error where it has one."""
    return f"{row['value']:.4f}" + (f" ± {row['error']:.4f}" if row.get("error") is not None else "")
