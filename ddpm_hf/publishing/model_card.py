"""The model card (README.md) of a run's output folder, built with huggingface_hub's ModelCard.

Written into every output folder at the end of training, so a run that is never pushed is documented
too: metadata (license, library, tags, dataset, model-index with FID/IS/KID when metrics.json exists),
the sample grid, the metrics and their protocol, the resolved config and the command that reproduces
the run, the loss curve, and how to load the pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Optional, Tuple

from ddpm_hf.choices import BUILTIN_DATASETS, DATASET_ALIASES
from ddpm_hf.sizes import size_of
from ddpm_hf.outputs.files import atomic_write_bytes, sha256_of
from ddpm_hf.outputs.run_folder import (
    DENOISING_ANIMATIONS,
    DISTILL_RECORD,
    DISTILL_STUDENT_GRID,
    DISTILL_TEACHER_GRID,
    distill_round_dir,
    EMA_SWEEP_PLOT,
    EVALUATION,
    LOSS_CURVE,
    METRICS,
    METRICS_DINOV2,
    MODEL_CARD,
    NLL,
    POSTHOC_RECORD,
    PROGRESSIVE,
    SAMPLE_GRID,
    SCHEDULER_CONFIG,
    stamped_card,
    TRAIN_SUMMARY,
    TRAINING_CONFIG,
    UNET_CONFIG,
    UNET_WEIGHTS,
)
from ddpm_hf.recipes.config import TrainingConfig
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.devices import BF16_MIN_GAIN, rates_text

TAGS = ["pytorch", "diffusers", "unconditional-image-generation", "ddpm"]


def reproduce_command(config: TrainingConfig) -> str:
    """`python train_ddpm.py` with the preset and every flag whose value differs from it."""
    base = dataclasses.asdict(resolve_config({}, preset=config.preset))
    args = ["python", "train_ddpm.py"] + (["--preset", config.preset] if config.preset else [])
    for key, value in dataclasses.asdict(config).items():
        # resuming and publishing are not part of the experiment: a reproduction pushes nowhere
        if key in ("preset", "resume_from_checkpoint", "push_to_hub") or key.startswith("hub_") or value == base.get(key):
            continue
        if isinstance(value, bool):
            args.append(f"--{key}" if value else f"--no-{key}")
        else:
            args += [f"--{key}", "none" if value is None else str(value)]
    return " ".join(shlex.quote(a) for a in args)


def _hub_dataset(config: TrainingConfig) -> Optional[str]:
    if config.dataset in BUILTIN_DATASETS or Path(config.dataset).exists():
        return None
    return DATASET_ALIASES.get(config.dataset, config.dataset)


def _nll(output_dir: Path) -> Optional[Tuple[dict, str, Optional[str]]]:
    """(bits/dim terms {term: {mean, sem}}, how they were measured, split) from nll.json (`ddpm-nll`), else the last
    --eval_nll_every measurement in train_summary.json; None if neither exists."""
    path, summary_path = output_dir / NLL, output_dir / TRAIN_SUMMARY
    if path.is_file():
        nll = json.loads(path.read_text())
        p = nll.get("protocol", {})
        split = f" (split {p['split']})" if p.get("split") else ""  # local data is one set: no split to name
        return nll["bits_per_dim"], (
            f"`ddpm-nll` on {nll.get('num_images')} images of {p.get('dataset')}{split}, T = "
            f"{p.get('num_train_timesteps')}, `{p.get('variance_type')}` variance, x̂_0 clipped: {p.get('clip_denoised')}"), p.get("split")
    history = json.loads(summary_path.read_text()).get("nll") if summary_path.is_file() else None
    if history:
        last = history[-1]
        given = f", given {last['given']}" if last.get("given") else ""
        return last, f"during training, at step {last['step']}, on {last['images']} held-out images{given}", None
    return None


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _precision_recall_rows(metrics: dict) -> list:
    k = (metrics.get("precision_recall") or {}).get("k", 3)
    return [f"| {name.capitalize()} (k = {k}) | {metrics[name]:.4f} |" for name in ("precision", "recall") if name in metrics]


def _eval_results(metrics: Optional[dict], dinov2: Optional[dict], nll, dataset: Optional[str], dataset_label: str) -> list:
    """The card's model-index entries: bits/dim, FID/KID/IS and FD_DINOv2, those that were measured."""
    from huggingface_hub import EvalResult

    def result(metric_type: str, metric_name: str, value, split: Optional[str]):
        return EvalResult(task_type="unconditional-image-generation", dataset_type=dataset or "custom",
                          dataset_name=dataset_label, dataset_split=split, metric_type=metric_type,
                          metric_name=metric_name, metric_value=float(value))

    def split_of(measured: dict) -> Optional[str]:
        return (measured.get("protocol", {}).get("reference") or {}).get("split")

    results = [result("nll", "NLL (bits/dim)", nll[0]["total"]["mean"], nll[2])] if nll else []
    if metrics:
        values = {"FID": metrics.get("fid"), "KID": metrics.get("kid"),
                  "Inception Score": (metrics.get("inception_score") or {}).get("mean")}
        results += [result(metric.lower().replace(" ", "_"), metric, value, split_of(metrics))
                    for metric, value in values.items() if value is not None]
    if dinov2:
        results.append(result("fd_dinov2", "FD_DINOv2", dinov2["fd_dinov2"], split_of(dinov2)))
    return results


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else (f"{minutes} min {secs} s" if minutes else f"{secs} s")


def _where(summary: Optional[dict]) -> str:
    """What the run trained on, as train_summary.json records it ("" where it does not)."""
    hardware = (summary or {}).get("hardware")
    if not hardware:
        return ""
    processes = hardware.get("processes", 1)
    where = f"{processes} x {hardware.get('name')}" if processes > 1 else hardware.get("name")
    return f"{where} ({hardware.get('device')})"


def _hardware(summary: Optional[dict]) -> str:
    """What the run trained on and how long it took, as train_summary.json records them."""
    if not _where(summary):
        return ""
    took = summary.get("training_seconds")
    wall = summary.get("wall_seconds")
    return (f" Trained on {_where(summary)}"
            + (f" in {_duration(took)} of training steps" if took is not None else "")
            + (f", {_duration(wall)} in all (data, grids, checkpoints and figures included)" if wall is not None else "")
            + ".")


def _precision(config: TrainingConfig, summary: Optional[dict]) -> str:
    """The training precision, and how --mixed_precision auto chose it when it did."""
    name = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(config.mixed_precision, config.mixed_precision)
    auto = (summary or {}).get("mixed_precision_auto")
    if not auto:
        return f"Precision: {name}."
    rates = auto.get("images_per_s") or {}
    measured = rates_text(rates)
    return f"Precision: {name}, chosen by `--mixed_precision auto` on {auto.get('device')}" + \
        (f" from {measured}, timed before training (bf16 where at least {BF16_MIN_GAIN:.2f}x as fast)." if measured else ".")


def _figures_section(output_dir: Path) -> list:
    """The denoising animation and the progressive figure, those whose files exist."""
    animation = next((name for name in DENOISING_ANIMATIONS if (output_dir / name).is_file()), None)
    progressive = (output_dir / PROGRESSIVE).is_file()
    if not (animation or progressive):
        return []
    images = ([f"![The reverse chain]({animation})"] if animation else []) + \
        ([f"![Progressive generation]({PROGRESSIVE})"] if progressive else [])
    captions = ([f"The reverse chain from x_T (`{animation}`)."] if animation else []) + \
        (["Progressive generation (Ho et al. 2020, Fig. 6): for each seed, x_t (upper row) and the predicted x̂_0 "
          f"(lower row) along the chain (`{PROGRESSIVE}`)."] if progressive else [])
    return [" ".join(images), "", "*" + " ".join(captions) + " figures.json says how each was made.*", ""]


def measuring_commands(folder: str, dataset: str) -> tuple:
    """The three command lines that measure a run (ddpm-sample, ddpm-metrics, ddpm-nll), complete: the paper's counts
    (50,000 samples, the 10,000 test images), or the built-in digits' own (as many samples as training images, its 297
    held-out ones)."""
    run, data = shlex.quote(folder), shlex.quote(dataset)
    samples, held_out = (1500, 297) if dataset in BUILTIN_DATASETS else (50000, 10000)
    # a folder of the user's has no test split: the held-out images are theirs to name
    test = "HELD_OUT_IMAGES" if Path(dataset).expanduser().exists() else f"{data} --split test"
    return (f"ddpm-sample {run} {run}/generated --num_images {samples}",
            f"ddpm-metrics {run}/generated --reference {data} --output {run}/{METRICS}",
            f"ddpm-nll {run} {run}/nll --dataset {test} --num_images {held_out} --output {run}/{NLL}")


def _metrics_section(metrics: Optional[dict], dinov2: Optional[dict], nll, folder: str = "THIS_FOLDER",
                     dataset: str = "DATASET") -> list:
    """The metrics tables with their protocols: Inception, DINOv2 and bits/dim, as measured."""
    parts = []
    protocol = (metrics or {}).get("protocol", {})
    if metrics:
        sampling = protocol.get("sampling") or {}
        isc = metrics.get("inception_score") or {}
        parts += [
            "| metric | value |",
            "| --- | --- |",
            f"| FID | {metrics['fid']:.4f} |",
            *([f"| KID | {metrics['kid']:.6f} |"] if metrics.get("kid") is not None else []),
            *([f"| Inception Score | {isc['mean']:.3f} ± {isc['std']:.3f} ({isc.get('splits', 10)} splits) |"] if isc else []),
            *_precision_recall_rows(metrics),
            "",
            "Protocol: "
            f"{protocol.get('num_samples')} samples ({sampling.get('scheduler', '?')} sampler, "
            f"{sampling.get('num_inference_steps', '?')} steps, {sampling.get('weights', '?')} weights) against "
            f"{json.dumps(protocol.get('reference'))}; clean-fid mode `{protocol.get('mode')}`; feature network "
            f"{(protocol.get('feature_network') or {}).get('name')} (weights SHA-256 "
            f"`{(protocol.get('feature_network') or {}).get('weights_sha256', '')[:16]}…`).",
        ]
    if dinov2:
        dprotocol = dinov2.get("protocol", {})
        parts += [
            "",
            "| metric in DINOv2's feature space | value |",
            "| --- | --- |",
            f"| FD_DINOv2 | {dinov2['fd_dinov2']:.4f} |",
            *_precision_recall_rows(dinov2),
            "",
            f"FD_DINOv2 (Stein et al. 2023): {dprotocol.get('num_samples')} samples, features "
            f"{(dprotocol.get('feature_network') or {}).get('name')} against {json.dumps(dprotocol.get('reference'))}.",
        ]
    elif not metrics and not nll:
        sample, measure, bound = measuring_commands(folder, dataset)
        parts += [f"No metrics yet: draw samples with `{sample}`, measure them with `{measure}` (and the likelihood "
                  f"with `{bound}`), then rebuild this card with `ddpm-card {shlex.quote(folder)}`."]
    if nll:
        bpd, how, _ = nll
        parts += [
            "",
            "| NLL bound (bits/dim) | prior L_T | KL terms | decoder L_0 |",
            "| --- | --- | --- | --- |",
            f"| {bpd['total']['mean']:.4f} ± {bpd['total']['sem']:.4f} | {bpd['prior']['mean']:.4f} | "
            f"{bpd['kl']['mean']:.4f} | {bpd['decoder']['mean']:.4f} |",
            "",
            f"The variational bound (Ho et al. 2020, Eq. 5; ± the standard error over images), {how}.",
        ]
    return parts


def _evaluation_section(output_dir: Path) -> list:
    """ddpm-evaluate's report (evaluation.json in the folder) as its table beside the paper's, with its protocol."""
    from ddpm_hf.measuring.evaluation import report_markdown

    report = _read_json(output_dir / EVALUATION)
    if not report:
        return []
    return ["", f"### Against the paper ({report['protocol']['protocol']}, `ddpm-evaluate`)", "",
            report_markdown(report).rstrip("\n")]


def _intro_section(name: str, config: TrainingConfig, unet: dict, dataset_label: str,
                   progress: Optional[Tuple[int, int]], posthoc: Optional[dict] = None) -> list:
    network = f"UNet from `{config.unet_config}`" if config.unet_config else f"UNet preset `{config.unet_preset}`"
    parts = [
        f"# {name}",
        "",
        f"A denoising diffusion probabilistic model ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)) trained "
        f"with ddpm_hf on **{dataset_label}** at {'x'.join(map(str, size_of(config.resolution)))} "
        f"({config.channels} channel{'s' if config.channels > 1 else ''}), {network} "
        f"({sum(1 for _ in unet['block_out_channels'])} levels, channels {unet['block_out_channels']}), "
        f"{config.max_train_steps or config.num_epochs} {'steps' if config.max_train_steps else 'epochs'} of batch {config.batch_size}. "
        + ("The weights are the EMA weights." if posthoc is None else
         f"The weights are the post-hoc EMA of σ_rel {posthoc['sigma_rel']:g}, chosen after training (see Post-hoc "
         "EMA below)."),
        "",
        *([f"Started from the weights of `{config.init_from}`.", ""] if config.init_from else []),
    ]
    if config.class_conditional:
        names = ", ".join(f"{k} `{name}`" for k, name in enumerate(config.class_names))
        parts += [f"**Class-conditional**, for classifier-free guidance ([Ho & Salimans 2021](https://arxiv.org/abs/2207.12598)): "
                  f"{len(config.class_names)} classes ({names}), from "
                  f"{f'column `{config.label_column}`' if config.label_column else 'the dataset labels'}; "
                  f"each training label was replaced by \"no class\" with probability {config.label_dropout}, so the one "
                  "network is also the unconditional model.", ""]
    if progress is not None:
        parts += [f"**Training in progress: step {progress[0]:,} of {progress[1]:,}.** The weights, samples and this "
                  "card are updated as it goes.", ""]
    return parts


def _samples_section(output_dir: Path, config: TrainingConfig) -> list:
    if not (output_dir / SAMPLE_GRID).is_file():
        return []
    if config.class_conditional:
        return [f"![Samples]({SAMPLE_GRID})", "",
                f"*Samples from fixed seeds, one row per class ({', '.join(config.class_names)}), by the conditional model "
                f"(guidance scale 1), {config.grid_steps} DDPM steps.*", ""]
    return [f"![Samples]({SAMPLE_GRID})", "",
            f"*Samples from fixed seeds ({config.num_sample_images} images, {config.grid_steps} DDPM steps).*", ""]


def _usage_section(load_id: str, config: TrainingConfig) -> list:
    if config.class_conditional:
        k = len(config.class_names)
        return [
            "## Usage",
            "",
            "Plain diffusers loads the UNet and the scheduler (`DiffusionPipeline.from_pretrained`), but its "
            "`DDPMPipeline` passes no class labels; sampling with labels and guidance takes ddpm_hf's pipeline "
            "(`pip install ddpm_hf`):",
            "",
            "```python",
            "from ddpm_hf import DDPMPipeline",
            "",
            f'pipe = DDPMPipeline.from_pretrained("{load_id}")',
            f"images = pipe(batch_size={k}, seeds=list(range({k})), class_labels=list(range({k})), guidance_scale=3.0).images",
            "```",
            "",
            "`guidance_scale` 0 is the unconditional model, 1 the conditional one, above 1 guided; `pipe.class_names` "
            "names the labels.",
            "",
        ]
    return [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import DDPMPipeline  # or: from ddpm_hf import DDPMPipeline",
        "",
        f'pipe = DDPMPipeline.from_pretrained("{load_id}")',
        "images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images",
        "```",
        "",
    ]


def _details(summary: str, text: str) -> list:
    return [f"<details><summary>{summary}</summary>", "", "```json", text, "```", "", "</details>", ""]


def _objective(config: TrainingConfig, scheduler: dict) -> str:
    if config.distill_teacher:  # a distillation round's student: its teacher's target, sampled by its own DDIM
        guided = (f"; the teacher guided at w = {config.distill_guidance_scale:g}, which this student draws at "
                  "`guidance_scale=1`, one pass a step" if config.class_conditional else "")
        return (f"distilled from `{config.distill_teacher}` to {config.distill_steps} DDIM steps (progressive "
                f"distillation, Salimans & Ho 2022: each step matches two of the teacher's; `{config.distill_weighting}` "
                f"weighting{guided}): sample it with `num_inference_steps={config.distill_steps}`")
    return (f"`{scheduler['variance_type']}` variance, `{config.loss}` loss"
            f"{f' (λ = {config.vlb_weight})' if config.loss == 'hybrid' else ''}, `{config.timestep_sampler}` timesteps")


def _training_section(output_dir: Path, config: TrainingConfig, scheduler: dict, unet: dict,
                      summary: Optional[dict]) -> list:
    return [
        "",
        "## Training",
        "",
        "Reproduce this run:",
        "",
        "```bash",
        reproduce_command(config),
        "```",
        "",
        *([f"![Loss curve]({LOSS_CURVE})", ""] if (output_dir / LOSS_CURVE).is_file() else []),
        f"Diffusion: T = {scheduler['num_train_timesteps']}, `{scheduler['beta_schedule']}` betas "
        f"{scheduler['beta_start']}..{scheduler['beta_end']}, `{scheduler['prediction_type']}` prediction, "
        f"{_objective(config, scheduler)}. UNet channels {unet['block_out_channels']}. {_precision(config, summary)}{_hardware(summary)}",
        "",
        *_details("Resolved training config", config.to_json()),
        *_details("Resolved UNet config", json.dumps({k: v for k, v in unet.items() if not k.startswith("_")}, indent=2)),
    ]


def published_posthoc(output_dir: Path) -> Optional[dict]:
    """The run folder's posthoc_ema.json (ddpm-ema's --keep best) where it describes the UNet weights beside it; else
    None (the weights are the run's own EMA)."""
    try:
        record = json.loads((Path(output_dir) / POSTHOC_RECORD).read_text())
        return record if record.get("unet_sha256") == sha256_of(Path(output_dir) / UNET_WEIGHTS) else None
    except (OSError, ValueError, AttributeError):
        return None


def _posthoc_section(output_dir: Path, posthoc: Optional[dict]) -> list:
    """The post-hoc EMA sweep the published weights were chosen by: its table and plot."""
    from ddpm_hf.measuring.ema_sweep import value_text

    if posthoc is None:
        return []
    rows = sorted(posthoc.get("sweep") or [], key=lambda r: r["sigma_rel"])
    parts = ["", "### Post-hoc EMA", "",
             f"The published weights are the post-hoc EMA of σ_rel {posthoc['sigma_rel']:g} ([Karras et al. "
             "2024](https://arxiv.org/abs/2312.02696)), reconstructed after training from "
             f"{len(posthoc['snapshots'])} snapshots of the power EMAs the run tracked, and chosen as the best "
             f"{posthoc['metric']} of the sweep below (ddpm-ema's --keep best; posthoc_ema.json lists the snapshots "
             "and their weights).", "", f"| σ_rel | {posthoc['metric']} |", "| --- | --- |"]
    for row in rows:
        mark = " (published)" if row["sigma_rel"] == posthoc["sigma_rel"] else ""
        paired = row.get("minus_fixed_ema") or {}
        beside = f" ({paired['mean']:+.4f} ± {paired['sem']:.4f} against the run's EMA, paired)" if paired.get("sem") else ""
        parts.append(f"| {row['sigma_rel']:g}{mark} | {value_text(row)}{beside} |")
    fixed = posthoc.get("fixed_ema")
    if fixed:
        parts.append(f"| {fixed['label']} | {value_text(fixed)} |")
    if (output_dir / EMA_SWEEP_PLOT).is_file():
        parts += ["", f"![Post-hoc EMA sweep]({EMA_SWEEP_PLOT})"]
    return parts


def build_model_card(output_dir, repo_id: Optional[str] = None, progress: Optional[Tuple[int, int]] = None):
    """A `huggingface_hub.ModelCard` for the run in `output_dir`, section by section; `progress` = (step, total steps)
    marks a run still training. Images are shown only when their files exist."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    config = TrainingConfig.load(output_dir / TRAINING_CONFIG)
    metrics, dinov2 = _read_json(output_dir / METRICS), _read_json(output_dir / METRICS_DINOV2)
    summary, nll = _read_json(output_dir / TRAIN_SUMMARY), _nll(output_dir)
    name = repo_id or output_dir.resolve().name
    dataset = _hub_dataset(config)
    dataset_label = dataset or ("scikit-learn digits (built in)" if config.dataset == "digits" else Path(config.dataset).name)
    eval_results = _eval_results(metrics, dinov2, nll, dataset, dataset_label)
    data = ModelCardData(
        license="apache-2.0", library_name="diffusers", tags=TAGS + (["class-conditional"] if config.class_conditional else []),
        datasets=[dataset] if dataset else None,
        model_name=name, eval_results=eval_results or None, pipeline_tag="unconditional-image-generation",
    )
    scheduler = json.loads((output_dir / SCHEDULER_CONFIG).read_text())
    unet = json.loads((output_dir / UNET_CONFIG).read_text())
    posthoc = published_posthoc(output_dir)
    parts = [
        *_intro_section(name, config, unet, dataset_label, progress, posthoc),
        *_samples_section(output_dir, config),
        *_figures_section(output_dir),
        *_usage_section(repo_id or config.output_dir, config),  # the folder the run wrote, as it was given
        "## Metrics",
        "",
        *_metrics_section(metrics, dinov2, nll, config.output_dir, config.dataset),
        *_evaluation_section(output_dir),
        *_posthoc_section(output_dir, posthoc),
        *_training_section(output_dir, config, scheduler, unet, summary),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def write_model_card(output_dir, repo_id: Optional[str] = None, progress: Optional[Tuple[int, int]] = None) -> Path:
    path = Path(output_dir) / MODEL_CARD
    atomic_write_bytes(path, stamped_card(str(build_model_card(output_dir, repo_id, progress))).encode())
    return path


def build_distill_card(output_dir, repo_id: Optional[str] = None):
    """The card of `ddpm-distill`'s folder (its last student at the top): what it is distilled from and for how many
    steps, its grid beside its first teacher's DDIM grid at the same steps (those whose files exist), how to sample it,
    and what the distillation cost, round by round, from each round's train_summary.json."""
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    record = json.loads((output_dir / DISTILL_RECORD).read_text())
    steps, name = record["to_steps"], repo_id or output_dir.resolve().name
    rounds = [(n, _read_json(output_dir / distill_round_dir(n) / TRAIN_SUMMARY)) for n in record["rounds"]]
    last = TrainingConfig.load(output_dir / distill_round_dir(steps) / TRAINING_CONFIG)
    guided = (f", its teacher guided at w = {last.distill_guidance_scale:g} (classifier-free guidance), which it draws "
              "with one forward pass a step at its own guidance scale of 1" if last.class_conditional else "")
    data = ModelCardData(license="apache-2.0", library_name="diffusers", model_name=name,
                         tags=TAGS + ["progressive-distillation"] + (["class-conditional"] if last.class_conditional else []),
                         pipeline_tag="unconditional-image-generation")
    parts = [f"# {name}", "",
             f"A {steps}-step student of `{record['teacher']}`, by progressive distillation (Salimans & Ho 2022) from "
             f"DDIM at {record['from_steps']} steps: {len(rounds)} rounds of {record['steps_per_round']} optimizer steps "
             f"at batch {last.batch_size}, each student taking in one DDIM step what its teacher took in two{guided}. "
             f"It is a plain diffusers pipeline: a `UNet2DModel` and a `DDIMScheduler` whose `set_timesteps({steps})` "
             "gives exactly the steps it learned.", ""]
    if record.get("teacher_samples"):
        parts += [f"Its rounds trained on {record['teacher_samples']:,} images its teacher drew first (DDIM at "
                  f"{record['from_steps']} steps, in `teacher-samples/`), not on data.", ""]
    else:
        parts += [f"Its rounds trained on `{last.dataset}`.", ""]
    at = f"{steps} step{'s' if steps != 1 else ''}"
    grids = [(f, caption) for f, caption in ((DISTILL_STUDENT_GRID, f"the student at {at}"),
                                             (DISTILL_TEACHER_GRID, f"its teacher by DDIM at {at}"))
             if (output_dir / f).is_file()]
    if grids:
        parts += ["| " + " | ".join(c for _, c in grids) + " |", "|" + " --- |" * len(grids),
                  "| " + " | ".join(f"![{c}]({f})" for f, c in grids) + " |", "",
                  "*Image i from seed i in both" + (", of class i mod K" if last.class_conditional else "") + ".*", ""]
    load_id = repo_id or str(output_dir)
    call = (f"pipe(class_labels=[0, 1, 2, 3], num_inference_steps={steps}).images" if last.class_conditional
            else f"pipe(batch_size=16, num_inference_steps={steps}).images")
    parts += ["## Usage", "", "```python",
              "from ddpm_hf import DDPMPipeline  # its class labels are ddpm_hf's" if last.class_conditional
              else "from diffusers import DDPMPipeline  # or ddpm_hf's", "",
              f'pipe = DDPMPipeline.from_pretrained("{load_id}")', f"images = {call}", "```", "",
              f"or `ddpm-sample {load_id} samples --num_images 64`, which takes its {steps} steps unless told "
              "otherwise.", "",
              "## What it cost", "", "| round: student steps | optimizer steps | training steps' time | in all |",
              "| ---: | ---: | ---: | ---: |"]
    for n, summary in rounds:
        summary = summary or {}
        parts.append(f"| {n} | {summary.get('steps', '–')} | {_duration(summary.get('training_seconds', 0))} | "
                     f"{_duration(summary.get('wall_seconds', 0))} |")
    training = sum((summary or {}).get("training_seconds", 0) for _, summary in rounds)
    wall = sum((summary or {}).get("wall_seconds", 0) for _, summary in rounds)
    hardware = _where(rounds[0][1])
    parts += ["", f"In all {_duration(training)} of training steps and {_duration(wall)} with each round's setup, grids "
              f"and checkpoints" + (f", on {hardware}" if hardware else "") + " (the last session of a resumed round: "
              "its wall time counts that session only).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def write_distill_card(output_dir, repo_id: Optional[str] = None) -> Path:
    path = Path(output_dir) / MODEL_CARD
    atomic_write_bytes(path, stamped_card(str(build_distill_card(output_dir, repo_id))).encode())
    return path
