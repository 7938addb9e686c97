"""What watches a training run from outside its steps: the sample grids, FID and IS (or FD_DINOv2) of the EMA model,
its bits/dim on held-out images, and the model card's figures. The loop calls these on its schedule; each draws or
measures with fixed seeds, shared over the processes (image i on process i mod N) and gathered in order.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import torch
from accelerate.logging import get_logger

from ddpm_hf.data.decoding import ImageBank
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_save_image
from ddpm_hf.outputs.folder_jobs import gather_by_index, process_share
from ddpm_hf.outputs.plots import image_grid
from ddpm_hf.outputs.run_folder import SAMPLE_GRID, sample_grid_file
from ddpm_hf.sampling.samplers import cast_network, draw_share, pipeline_for
from ddpm_hf.seeding import EVAL_SEED_TAG, GRID_SEED_TAG, mix_seed
from ddpm_hf.recipes.config import TrainingConfig
from ddpm_hf.training.state import Run, TrainState

logger = get_logger(__name__)  # Accelerate's: logs on the main process only


def inner_bars(accelerator) -> bool:
    """Whether bars inside the training bar are shown: on the local main process, on a terminal only (written to a
    file or a CI log, nested bars leave cursor-movement escapes between the lines)."""
    return accelerator.is_local_main_process and sys.stderr.isatty()


def ema_pipeline(run: Run, sampler: str = "ddpm", network=None):
    """The pipeline of the EMA weights (or `network`) with the run's scheduler (then `sampler`) and classes; a
    distillation round's student with its own DDIM, whose N steps are the grid it learned."""
    pipe = pipeline_for(run.ema.model if network is None else network, run.scheduler.config, sampler,
                        run.config.class_names)
    if run.config.distill_teacher:
        from ddpm_hf.diffusion.distillation import student_scheduler

        pipe.scheduler = student_scheduler(dict(run.scheduler.config), run.config.distill_steps, run.config.prediction_type)
    return pipe


def evaluated_network(run: Run) -> torch.nn.Module:
    """The EMA network in --eval_dtype, for the evaluations: itself in fp32, else a cast copy (the EMA itself stays in
    float32, as it keeps averaging)."""
    import copy

    if run.config.eval_dtype == "fp32":
        return run.ema.model
    network = copy.deepcopy(run.ema.model)
    cast_network(network, run.config.eval_dtype)
    return network


def grid_seed(config: TrainingConfig, i: int) -> int:
    """The seed of grid image i (also the card figures' seeds)."""
    return mix_seed(config.seed, i, GRID_SEED_TAG)


# ---------------------------------------------------------------- sample grids


def grid_labels(config: TrainingConfig) -> Optional[List[int]]:
    """The class of each grid image of a class-conditional run: one row per class, --num_sample_images // K images
    in each (at least one), drawn by the conditional model (guidance 1); None for an unconditional run."""
    if not config.class_conditional:
        return None
    per_class = max(1, config.num_sample_images // len(config.class_names))
    return [i // per_class for i in range(per_class * len(config.class_names))]


def sample_images(run: Run) -> torch.Tensor:
    """The fixed-seed grid images of the EMA model (image i from seed (seed, i); of class `grid_labels`[i] in a
    class-conditional run), shared out over all processes and gathered; every process returns the full [N, C, H, W]
    batch in [0, 1]."""
    config, accelerator = run.config, run.accelerator
    pipe = ema_pipeline(run)
    pipe.set_progress_bar_config(disable=not inner_bars(accelerator), desc="Sampling grid", leave=False)
    labels = grid_labels(config)
    count = config.num_sample_images if labels is None else len(labels)
    drawn = draw_share(pipe, count, lambda i: grid_seed(config, i),
                       accelerator.process_index, accelerator.num_processes, batch_size=count,
                       label_of=None if labels is None else labels.__getitem__,
                       num_inference_steps=config.grid_steps, output_type="pt")
    return torch.stack(gather_by_index([(i, image.cpu()) for ids, images in drawn for i, image in zip(ids, images)]))


def save_grid(run: Run, step: int) -> None:
    """samples/step-<step>.png and samples.png (the latest), and the grid to the trackers."""
    images = sample_images(run)
    if run.is_main:
        labels = grid_labels(run.config)  # one row per class
        grid = image_grid(images, cols=None if labels is None else labels.count(0))
        atomic_save_image(grid, run.output_dir / sample_grid_file(step))
        atomic_save_image(grid, run.output_dir / SAMPLE_GRID)
        log_grid(run.accelerator, grid, step)


def log_grid(accelerator, grid, step: int) -> None:
    """The sample grid (a PIL image) to the trackers that take images."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step)


# ---------------------------------------------------------------- FID (FD_DINOv2) during training


def evaluation_reference(config: TrainingConfig, network, accelerator) -> tuple:
    """(mean, covariance) of the training set's features in `network`'s space, for --eval_every: the main process
    computes and caches them, then the others read the cache."""
    from ddpm_hf.measuring.folder_metrics import default_cache_dir, reference_features
    from ddpm_hf.measuring.metrics import feature_statistics

    cache = Path(config.eval_cache_dir or default_cache_dir())
    with accelerator.main_process_first():
        features, _ = reference_features(config.dataset, network, "clean", cache, config.split, config.resolution,
                                         config.channels)
    return feature_statistics(features[:, : network.num_features])


def sample_quality(run: Run) -> dict:
    """FID and IS (or FD_DINOv2) of `eval_samples` images of the EMA model drawn with DDIM in `eval_steps` steps, each
    process drawing its share (image i from seed (seed, i)); every process returns the same numbers."""
    from ddpm_hf.measuring.folder_metrics import features_of_images
    from ddpm_hf.measuring.metrics import feature_statistics, frechet_distance, inception_score

    config, accelerator, network = run.config, run.accelerator, run.feature_network
    pipe = ema_pipeline(run, "ddim", evaluated_network(run))
    pipe.set_progress_bar_config(disable=True)
    # a class-conditional run: class-balanced (image i of class i mod K), by the conditional model
    label_of = (lambda i: i % len(config.class_names)) if config.class_conditional else None
    drawn = draw_share(pipe, config.eval_samples, lambda i: mix_seed(config.seed, i, EVAL_SEED_TAG),
                       accelerator.process_index, accelerator.num_processes, label_of=label_of,
                       batch_size=run.config.micro_batch(run.accelerator.num_processes),
                       num_inference_steps=config.eval_steps, output_type="pt", eta=0.0)
    rows = [row for ids, images in drawn for row in zip(ids, features_of_images(images, network, device=accelerator.device))]
    feats = torch.stack(gather_by_index(rows)).double().numpy()
    d = network.num_features
    result = {network.metric("fd"): frechet_distance(*feature_statistics(feats[:, :d]), *run.reference)}
    if feats.shape[1] > d and feats.shape[0] >= 10:
        result["inception_score"] = inception_score(feats[:, d:], splits=10)[0]
    return result


def log_sample_quality(run: Run, state: TrainState) -> bool:
    """FID (and IS) of the EMA model now, into the state, the trackers and the log; True when --keep_best should
    keep this step's checkpoint (the best so far)."""
    config = run.config
    metrics = sample_quality(run)
    state.evals.append({"step": state.step, **metrics})
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    isc = f", IS {metrics['inception_score']:.3f}" if "inception_score" in metrics else ""
    key = run.feature_network.metric("fd")
    logger.info("Step %d: %s %.4f (%d samples, DDIM %d steps, network in %s)%s", state.step, key.upper(), metrics[key],
                config.eval_samples, config.eval_steps, config.eval_dtype, isc)
    if config.keep_best and (state.best is None or metrics[key] < state.best[key]):
        state.best = {"step": state.step, key: metrics[key]}
        return True
    return False


# ---------------------------------------------------------------- bits/dim during training


def load_held_out_images(config: TrainingConfig) -> ImageBank:
    """The first --eval_nll_images images of the held-out set, uint8 at the training resolution and channels; of a
    --class_conditional run, with their labels (classes checked to be the run's). Refuses a set that is the training
    data itself."""
    from ddpm_hf.data.columns import check_same_classes, class_names_of, find_image_column, find_label_column
    from ddpm_hf.data.decoding import build_image_bank
    from ddpm_hf.choices import BUILTIN_DATASETS
    from ddpm_hf.data.sources import load_image_dataset

    name = config.eval_nll_dataset or config.dataset
    local = name not in BUILTIN_DATASETS and Path(name).expanduser().exists()
    if config.eval_nll_dataset is None and (local or config.eval_nll_split == config.split):
        raise UsageError(
            f"--eval_nll_every needs held-out images, and --dataset {config.dataset} (split {config.eval_nll_split}) is "
            "the training data: give --eval_nll_dataset (images not trained on), or --eval_nll_split of a Hub dataset "
            "or the built-in digits.")
    split = None if local else config.eval_nll_split  # local data is one set, used whole
    ds = load_image_dataset(name, config.dataset_config if name == config.dataset else None, split)
    ds = ds.select(range(min(config.eval_nll_images, len(ds))))
    label_column = None
    if config.class_conditional:  # the bound of -log p(x_0 | c): each image given its own class
        if name == config.dataset:
            label_column = find_label_column(ds.features, config.label_column)
        else:  # another set: its labels are in a ClassLabel column, or in one named as the training labels' column
            label_column = find_label_column(
                ds.features, config.label_column if config.label_column in ds.features else None,
                whose=f"the held-out set (--eval_nll_dataset {name})",
                fix="give it a ClassLabel column, or a column named as the training data's (--label_column names both)")
        check_same_classes(class_names_of(ds, label_column), config.class_names, label_column, whose="run")
    return build_image_bank(ds, find_image_column(ds.features, config.image_column if name == config.dataset else None),
                            config.channels, config.resolution, config.center_crop, config.on_bad_image, progress=False,
                            label_column=label_column)


def evaluate_nll(run: Run, state: TrainState) -> None:
    """The EMA model's bound in bits/dim on the held-out images, each process its share (image k's noise from
    (seed, k)); mean and standard error of each term into the state, the trackers and the log."""
    from ddpm_hf.diffusion.likelihood import GIVEN_CLASS, summarize, TERMS
    from ddpm_hf.measuring.bound import bits_per_dim_of_share

    config, accelerator = run.config, run.accelerator
    held_out = run.held_out
    ids = process_share(len(held_out), accelerator.process_index, accelerator.num_processes)
    rows = [(k, {term: terms[term][i].item() for term in TERMS})
            for ks, terms in bits_per_dim_of_share(evaluated_network(run), run.scheduler, held_out.images, ids,
                                                   config.seed, run.config.micro_batch(run.accelerator.num_processes),
                                                   labels=held_out.labels)
            for i, k in enumerate(ks)]
    measured = gather_by_index(rows)
    summary = summarize({term: torch.tensor([r[term] for r in measured], dtype=torch.float64) for term in TERMS})
    given = {} if held_out.labels is None else {"given": GIVEN_CLASS}  # recorded only there, as ddpm-nll does
    state.nll.append({"step": state.step, "images": len(measured), **given, **summary})
    accelerator.log({f"eval/bpd_{term}": summary[term]["mean"] for term in TERMS}, step=state.step)
    logger.info("Step %d: NLL bound %.4f ± %.4f bits/dim on %d held-out images, network in %s (prior %.4f, KL %.4f, "
                "decoder %.4f)", state.step, summary["total"]["mean"], summary["total"]["sem"], len(measured),
                config.eval_dtype, summary["prior"]["mean"],
                summary["kl"]["mean"], summary["decoder"]["mean"])


# ---------------------------------------------------------------- the model card's figures


def save_card_figures(run: Run) -> None:
    """The denoising animation and the progressive figure of the EMA pipeline (the grid's first 16 seeds and its
    sampler steps: the animation ends on the grid's first images), for the model card."""
    from ddpm_hf.sampling.figures import chain_figures, record_figures

    config = run.config
    pipe = ema_pipeline(run)
    pipe.set_progress_bar_config(disable=not inner_bars(run.accelerator), desc="Card figures", leave=False)
    labels = grid_labels(config)
    count = min(16, config.num_sample_images if labels is None else len(labels))
    seeds = [grid_seed(config, i) for i in range(count)]
    record_figures(run.output_dir, chain_figures(pipe, run.output_dir, seeds, config.grid_steps,
                                                 about={"pipeline": "this run (EMA)"},
                                                 class_labels=None if labels is None else labels[:count]))
