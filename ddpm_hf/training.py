"""The training loop (Algorithm 1 of the paper) on Accelerate: one process or many, CPU or GPUs.

`train(config)` runs four stages, each a function below:

1. `setup`: the accelerator, the Hub check (first: a bad token fails in seconds), the data, the model,
   the diffusion, the loss, the optimizer, the LR schedule and the EMA (a `Run`);
2. `resume`: the checkpoint asked for, if any, into a `TrainState` (the one object a checkpoint saves);
3. `run_loop`: for each step, `run_step` (Algorithm 1 over the micro-batches: `forward_backward`, then
   clipping, the optimizer, the EMA) and `periodic_work` (log, checkpoint, grid, evaluation, push);
4. `finish`: the pipeline with the EMA weights, the summary, the model card, the final push.

Determinism: everything random in step k (the batch, flips, noise, timesteps, dropout) is drawn from
generators seeded by (seed, k, rank), and the data order of epoch e is a permutation seeded by
(seed, e). A run resumed from checkpoint k therefore continues exactly as the uninterrupted run.

Batch size: `batch_size` images per optimizer step in total, split evenly over processes and
gradient-accumulation micro-batches; steps count optimizer steps.

No host synchronisation in a step: the per-timestep tables live on the device, a step whose gradient is not
finite is skipped by the optimizer itself (fused Adam's `found_inf`: the gradient norm is taken after the
all-reduce, so every process agrees), and the loss sums and non-finite counters are device tensors that
are read on logging and checkpoint steps only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from accelerate.logging import get_logger

from .choices import LEARNED_VARIANCE_TYPES
from .config import TrainingConfig, config_changes
from .data import BatchSource, to_model_range
from .ema import EMA
from .losses import DiffusionLoss
from .model_card import write_model_card
from .outputs import (
    CHECKPOINT_PREFIX,
    NonFiniteWeightsError,
    atomic_save_image,
    atomic_write_json,
    image_grid,
    list_checkpoints,
    load_checkpoint,
    plot_loss_curve,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
    save_pipeline,
    tmp_sibling,
    weights_are_finite,
)
from .sampling import draw_share
from .scheduler import DDPMScheduler
from .seeding import DROPOUT_SEED_TAG, EVAL_SEED_TAG, GRID_SEED_TAG, mix_seed
from .timestep_samplers import UniformSampler, make_timestep_sampler

logger = get_logger(__name__)  # Accelerate's: logs on the main process only


class NonFiniteLossError(RuntimeError):
    pass


def make_scheduler(config: TrainingConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
        variance_type=config.variance_type,
        clip_sample=True,
    )


def run_unet_config(config: TrainingConfig, checkpoint: Optional[Path] = None) -> Dict[str, Any]:
    """The UNet2DModel config of a run: a resumed run's own (saved in its checkpoint, so the source is not needed
    any more), else --unet_config's (checked against the run: C input channels, C output channels or 2C with a
    learned variance, the resolution), else the preset's."""
    import json

    from .unets import check_unet_config, resolve_unet_config, unet_config

    if checkpoint is not None and (checkpoint / "unet_config.json").is_file():
        return json.loads((checkpoint / "unet_config.json").read_text())
    extra = {} if config.dropout is None else {"dropout": config.dropout}
    out = 2 * config.channels if config.variance_type in LEARNED_VARIANCE_TYPES else config.channels
    if config.unet_config:
        read = resolve_unet_config(config.unet_config, config.unet_subfolder)
        return {**check_unet_config(read, config.channels, out, config.resolution, config.unet_config), **extra}
    return unet_config(config.unet_preset, sample_size=config.resolution, in_channels=config.channels, out_channels=out, **extra)


def make_unet(config: TrainingConfig, checkpoint: Optional[Path] = None):
    """A freshly initialised UNet2DModel of the run's config (`run_unet_config`)."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(run_unet_config(config, checkpoint))


def load_starting_weights(unet, source: str) -> None:
    """--init_from: the UNet weights of the pipeline `source` (a folder, a google/ddpm-* root layout, or a Hub repo
    id; cached ones work offline), into `unet`."""
    from .pipelines.pipeline_ddpm import DDPMPipeline

    weights = DDPMPipeline.from_pretrained(source).unet.state_dict()
    try:
        unet.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"--init_from {source}: its UNet weights do not fit this run's UNet ({str(e).splitlines()[1][:160]}); "
                         "leave --unet_config/--unet_preset and --channels to the starting pipeline.") from None


def make_optimizer(config: TrainingConfig, parameters) -> tuple:
    """(Adam or AdamW, skips_on_device). Fused where torch has a fused kernel for the device (CUDA, CPU, ...): it then
    skips a step whose gradient is not finite on the device itself (`found_inf`). Elsewhere foreach Adam, and
    the host decides the skip."""
    parameters = list(parameters)
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    try:
        return torch.optim.Adam(parameters, fused=True, **kwargs), True
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return torch.optim.Adam(parameters, foreach=True, **kwargs), False


def accelerator_available() -> bool:
    """Whether torch sees a GPU or other accelerator. Without one, Accelerate must be told `cpu=True`,
    or several processes (torchrun / `accelerate launch --multi_gpu`) do not form a gloo group."""
    return torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a non-oneDNN build: assume it has
        return True


@dataclass
class TrainState:
    """What a checkpoint saves besides weights and optimizer moments (its trainer_state.json) and a resume
    restores: the step, the logged history, evaluations (FID; bits/dim), the best FID, the non-finite step
    counters, and the states of the LR schedule, the EMA and the timestep sampler."""

    step: int = 0
    history: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    nll: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    lr_scheduler: Dict[str, Any] = field(default_factory=dict)
    ema: Dict[str, Any] = field(default_factory=dict)
    timestep_sampler: Optional[Dict[str, Any]] = None
    config_history: List[dict] = field(default_factory=list)  # settings changed on resume: {"step", "changes"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


class StepMeters:
    """Device-side sums between two reads: the loss overall and by timestep quartile, and the non-finite step
    counters (total, in a row now, longest run since the last read). Adding never waits for the device;
    reading is a host synchronisation, done on logging and checkpoint steps."""

    def __init__(self, device, num_train_timesteps: int, nonfinite_total: int = 0, nonfinite_in_a_row: int = 0):
        self.T = num_train_timesteps
        self.loss_sum = torch.zeros(5, device=device)
        self.loss_count = torch.zeros(5, device=device)
        self.counters = torch.tensor([nonfinite_total, nonfinite_in_a_row, nonfinite_in_a_row], device=device)

    def add_losses(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        quartile = 1 + (t * 4 // self.T)
        self.loss_sum[0] += per_sample.sum()
        self.loss_count[0] += per_sample.numel()
        self.loss_sum.scatter_add_(0, quartile, per_sample)
        self.loss_count.scatter_add_(0, quartile, torch.ones_like(per_sample))

    def add_step(self, skipped: torch.Tensor) -> None:
        c, s = self.counters, skipped.long()
        c[0] += s
        c[1] = (c[1] + 1) * s
        c[2] = torch.maximum(c[2], c[1])

    def read_counters(self) -> tuple:
        total, in_a_row, longest = self.counters.tolist()
        self.counters[2] = self.counters[1]
        return total, in_a_row, longest

    def read_losses(self, accelerator) -> tuple:
        """(mean loss, count) overall and per quartile, summed over all processes; then start again."""
        sums = accelerator.reduce(self.loss_sum, reduction="sum")
        counts = accelerator.reduce(self.loss_count, reduction="sum")
        means = (sums / counts.clamp(min=1)).tolist()
        self.loss_sum.zero_()
        self.loss_count.zero_()
        return means, counts.tolist()


class Clock:
    """Training time between logging steps, without the pauses for periodic work (grids, checkpoints)."""

    def __init__(self, step: int = 0):
        self.start, self.paused, self.step = time.perf_counter(), 0.0, step

    @contextlib.contextmanager
    def pause(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - start

    def lap(self, step: int) -> tuple:
        """(seconds of training, steps) since the last lap."""
        now = time.perf_counter()
        seconds, steps = now - self.start - self.paused, step - self.step
        self.start, self.paused, self.step = now, 0.0, step
        return seconds, steps


@dataclass
class Run:
    """What `setup` builds and every later stage uses."""

    config: TrainingConfig
    accelerator: Any
    source: BatchSource
    total_steps: int
    unet: torch.nn.Module  # as Accelerate prepared it (DDP-wrapped with several processes)
    raw_unet: torch.nn.Module  # the UNet itself
    forward: Callable  # the training forward pass: the UNet, or its torch.compile
    scheduler: DDPMScheduler
    loss: DiffusionLoss
    timesteps: UniformSampler  # draws t (and importance weights)
    optimizer: Any
    lr_scheduler: Any
    ema: EMA
    skips_on_device: bool  # the optimizer takes found_inf (fused Adam)
    meters: StepMeters
    clock: Clock = field(default_factory=Clock)
    pusher: Optional[Any] = None
    feature_network: Optional[Any] = None
    reference: Optional[tuple] = None  # the evaluation reference statistics (mean, covariance)
    nll_images: Optional[torch.Tensor] = None  # uint8 held-out images for --eval_nll_every
    checkpoint: Optional[Path] = None  # the verified checkpoint to resume from
    config_changes: Dict[str, list] = field(default_factory=dict)  # settings that differ from the checkpoint's

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def model(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training forward pass under Accelerate's autocast: the UNet's output tensor."""
        with self.accelerator.autocast():
            return self.forward(x_t, t).sample


def train(config: TrainingConfig, feature_network=None, hub_token: Optional[str] = None) -> Path:
    """Train as `config` says; return the output folder (pipeline with EMA weights, grids, loss curve,
    training_config.json, checkpoints, model card). `feature_network` replaces Inception-v3 for
    --eval_every. With --push_to_hub, `hub_token` (else HF_TOKEN or the login) is checked before anything
    else, and the folder's allow-listed files are pushed at the end (and every --hub_push_every steps)."""
    run = setup(config, feature_network, hub_token)
    state = resume(run)
    run_loop(run, state)
    finish(run, state)
    return run.output_dir


# ---------------------------------------------------------------- 1. setup


def setup(config: TrainingConfig, feature_network=None, hub_token: Optional[str] = None) -> Run:
    """The accelerator; the Hub credentials and the Inception weights (checked before the data and the
    model, so that they fail in seconds); the data; then the model and everything that trains it."""
    from accelerate import Accelerator

    config.validate()
    if config.mixed_precision == "fp16" and not accelerator_available():
        raise ValueError("--mixed_precision fp16 needs a GPU; on a CPU use --mixed_precision bf16 (on a CPU with AVX512-BF16 "
                         "or AMX) or no.")
    accelerator = Accelerator(
        cpu=not accelerator_available(),
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_dir=config.output_dir,
    )
    if config.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not _cpu_has_bf16():
        logger.warning("This CPU has no native bf16 (AVX512-BF16 or AMX): --mixed_precision bf16 is emulated here and "
                       "slower than fp32; pass --mixed_precision no.")
    world, accum = accelerator.num_processes, config.gradient_accumulation_steps
    if config.batch_size % (world * accum):
        raise ValueError(
            f"--batch_size={config.batch_size} does not split evenly over {world} processes x {accum} accumulation steps; "
            f"use a multiple of {world * accum}."
        )
    checkpoint, changes = find_checkpoint(config)
    pusher = None
    if config.push_to_hub and accelerator.is_main_process:
        from .hub import HubPusher

        pusher = HubPusher(config.hub_model_id or Path(config.output_dir).resolve().name, hub_token,
                           config.hub_private_repo, config.output_dir)
        logger.info("Will push to %s.", pusher.url)
    if config.eval_every and feature_network is None:
        from .evaluation import feature_network as load_feature_network

        feature_network = load_feature_network(config.eval_feature_network, accelerator.device, config.inception_weights,
                                               config.eval_dinov2_model, config.eval_cache_dir)
    nll_images = load_held_out_images(config) if config.eval_nll_every else None
    micro = config.batch_size // (world * accum)
    source = BatchSource(config, micro, accelerator.process_index, world,
                         progress=accelerator.is_local_main_process, device=accelerator.device)
    if source.skipped:
        logger.warning("Skipped %d undecodable images (--on_bad_image skip).", source.skipped)
    config = epochs_to_steps(config, source.steps_per_epoch)
    if config.max_train_steps is not None:
        total_steps = config.max_train_steps
    elif source.steps_per_epoch is None:
        raise ValueError("--num_epochs needs the dataset size; with --streaming give --max_train_steps.")
    else:
        total_steps = config.num_epochs * source.steps_per_epoch
    return Run(config=config, accelerator=accelerator, source=source, total_steps=total_steps, pusher=pusher,
               feature_network=feature_network, nll_images=nll_images, checkpoint=checkpoint, config_changes=changes,
               **build_model(config, accelerator, total_steps, checkpoint))


def epochs_to_steps(config: TrainingConfig, steps_per_epoch: Optional[int]) -> TrainingConfig:
    """--save_images_epochs / --save_model_epochs as the step intervals they are for this data and batch."""
    if not (config.save_images_epochs or config.save_model_epochs):
        return config
    if steps_per_epoch is None:
        raise ValueError("--save_images_epochs and --save_model_epochs need the dataset size; with --streaming give "
                         "--save_images_steps and --checkpointing_steps.")
    changes = {}
    if config.save_images_epochs:
        changes["save_images_steps"] = config.save_images_epochs * steps_per_epoch
    if config.save_model_epochs:
        changes["checkpointing_steps"] = config.save_model_epochs * steps_per_epoch
    logger.info("Epochs are %d steps: %s.", steps_per_epoch, ", ".join(f"--{k} {v}" for k, v in changes.items()))
    return dataclasses.replace(config, **changes)


def find_checkpoint(config: TrainingConfig) -> tuple:
    """(the checkpoint to resume from, verified against its hashes, or None; the settings that differ from its
    config). Refuses, before any data or model work, a fresh start over existing checkpoints and a resume with
    other settings (unless --allow_config_change)."""
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint is None:
        existing = sorted(f.name for f in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if f.is_dir())
        if existing and not config.overwrite_output_dir:
            raise ValueError(f"{output_dir} already holds a run ({', '.join(existing)}): pass --resume_from_checkpoint "
                             "latest to carry on, --overwrite_output_dir to start over there, or another --output_dir.")
        return None, {}
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint, warn=logger.warning)
    if checkpoint is None:
        return None, {}
    saved = next((p for p in (checkpoint / "training_config.json", output_dir / "training_config.json") if p.is_file()), None)
    changes = config_changes(TrainingConfig.load(saved), config) if saved else {}
    if changes and not config.allow_config_change:
        listed = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items())
        raise ValueError(f"{checkpoint.name} was trained with other settings ({listed}); resume with its settings, or add "
                         "--allow_config_change to train on with these (recorded in the run's config history).")
    return checkpoint, changes


def load_held_out_images(config: TrainingConfig) -> torch.Tensor:
    """The first --eval_nll_images images of the held-out set, uint8 at the training resolution and channels.
    Refuses a set that is the training data itself."""
    from .data import BUILTIN_DATASETS, build_image_bank, find_image_column, load_image_dataset

    name = config.eval_nll_dataset or config.dataset
    local = name in BUILTIN_DATASETS or Path(name).expanduser().exists()
    if config.eval_nll_dataset is None and (local or config.eval_nll_split == config.split):
        raise ValueError(
            f"--eval_nll_every needs held-out images, and --dataset {config.dataset} (split {config.eval_nll_split}) is "
            "the training data: give --eval_nll_dataset (images not trained on), or --eval_nll_split of a Hub dataset.")
    ds = load_image_dataset(name, config.dataset_config if name == config.dataset else None, config.eval_nll_split)
    ds = ds.select(range(min(config.eval_nll_images, len(ds))))
    bank = build_image_bank(ds, find_image_column(ds.features, config.image_column if name == config.dataset else None),
                            config.channels, config.resolution, config.center_crop, config.on_bad_image, progress=False)
    return bank.images


def build_model(config: TrainingConfig, accelerator, total_steps: int, checkpoint: Optional[Path] = None) -> dict:
    """The UNet (prepared by Accelerate; from --init_from's weights on a fresh start), its forward pass, the
    diffusion and loss, Adam, the LR schedule, the EMA (from the same weights) and the step meters."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    set_seed(config.seed)
    unet = make_unet(config, checkpoint)
    if config.init_from and checkpoint is None:
        load_starting_weights(unet, config.init_from)
    scheduler = make_scheduler(config)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    optimizer, skips_on_device = make_optimizer(config, unet.parameters())
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=total_steps)
    ema = EMA(unet, decay=config.ema_decay, warmup=config.ema_warmup, inv_gamma=config.ema_inv_gamma,
              power=config.ema_power, update_after_step=config.ema_update_after_step)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.model.to(accelerator.device)
    return dict(
        unet=unet, raw_unet=accelerator.unwrap_model(unet), forward=torch.compile(unet) if config.compile else unet,
        scheduler=scheduler, loss=DiffusionLoss(scheduler, config.loss, config.snr_gamma, config.vlb_weight),
        timesteps=make_timestep_sampler(config.timestep_sampler, config.num_train_timesteps, accelerator.device),
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, ema=ema, skips_on_device=skips_on_device,
        meters=StepMeters(accelerator.device, config.num_train_timesteps),
    )


# ---------------------------------------------------------------- 2. resume


def resume(run: Run) -> TrainState:
    """Clean the output folder of half-written files, restore the checkpoint asked for (if any) into the
    model, optimizer, LR schedule and EMA, and return its TrainState; then save the config, compute the
    evaluation reference and start the trackers."""
    config, accelerator = run.config, run.accelerator
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run.output_dir)
        clear_earlier_run(run)
    accelerator.wait_for_everyone()
    state = TrainState()
    if run.checkpoint is not None:
        state = TrainState.from_dict(load_checkpoint(run.checkpoint, run.raw_unet, run.ema.model, run.optimizer))
        run.lr_scheduler.load_state_dict(state.lr_scheduler)
        run.ema.load_state(state.ema)
        if run.timesteps.needs_losses:
            run.timesteps.load_state_dict(state.timestep_sampler)
        state.nonfinite_in_a_row = 0  # a resume is a new attempt: only this session's skipped steps count toward the stop
        if run.config_changes:
            state.config_history.append({"step": state.step, "changes": run.config_changes})
            logger.warning("Resuming with changed settings (--allow_config_change): %s.", run.config_changes)
        logger.info("Resumed from %s at step %d.", run.checkpoint, state.step)
    elif config.resume_from_checkpoint == "latest":
        logger.info("No checkpoint in %s yet: starting from scratch.", run.output_dir)
    run.meters = StepMeters(run.device, config.num_train_timesteps, state.nonfinite_total, state.nonfinite_in_a_row)
    run.source.fast_forward(state.step)
    if run.is_main:
        config.save(run.output_dir)
        (run.output_dir / "samples").mkdir(exist_ok=True)
    if config.eval_every:
        run.reference = evaluation_reference(run)
    if config.report_to != "none":
        accelerator.init_trackers("logs", config=_tracker_config(config))
    logger.info(
        "Training %d steps of %d images (%d per process x %d processes x %d accumulation) on %s; %s images.",
        run.total_steps, config.batch_size, run.source.micro, accelerator.num_processes,
        config.gradient_accumulation_steps, run.device, run.source.num_images or "streamed",
    )
    return state


def clear_earlier_run(run: Run) -> None:
    """With --overwrite_output_dir, remove an earlier run's checkpoints, grids and logs (each renamed to a
    temporary first); without it, say that an earlier run's logs stay beside the new ones."""
    leftovers = [p for p in run.output_dir.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) or p.name in
                 ("best_checkpoint", "samples", "samples.png", "logs", "train_summary.json", "loss_curve.png",
                  "progressive.png", "denoising.gif", "denoising.webp", "figures.json")]
    if run.config.overwrite_output_dir and leftovers:
        for path in leftovers:
            path.replace(tmp_sibling(path))
        remove_stale_temporaries(run.output_dir)
        logger.warning("Removed the earlier run's %s from %s (--overwrite_output_dir).",
                       ", ".join(sorted(p.name for p in leftovers)), run.output_dir)
    elif run.checkpoint is None and (run.output_dir / "logs").is_dir():
        logger.warning("%s holds the tracker logs of an earlier run; this run's go beside them (--overwrite_output_dir "
                       "removes them).", run.output_dir / "logs")


def evaluation_reference(run: Run) -> tuple:
    """(mean, covariance) of the training set's features, for --eval_every: the main process computes and
    caches them, then the others read the cache."""
    from .evaluation import default_cache_dir, reference_features
    from .metrics import feature_statistics

    config, network = run.config, run.feature_network
    cache = Path(config.eval_cache_dir or default_cache_dir())
    with run.accelerator.main_process_first():
        features, _ = reference_features(config.dataset, network, "clean", cache, config.split, config.resolution,
                                         config.channels)
    return feature_statistics(features[:, : network.num_features])


def _tracker_config(config: TrainingConfig) -> Dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in dataclasses.asdict(config).items()}


# ---------------------------------------------------------------- 3. the loop


def run_loop(run: Run, state: TrainState) -> None:
    """The steps from state.step to the last, each followed by its periodic work."""
    from tqdm.auto import tqdm

    if run.config.eval_every and state.step % run.config.eval_every == 0 and state.step > 0:
        if not any(e["step"] == state.step for e in state.evals):  # the checkpoint was written before its evaluation
            evaluate(run, state)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="Training",
               disable=not run.accelerator.is_local_main_process)
    run.clock = Clock(state.step)
    try:
        for step in range(state.step, run.total_steps):
            run_step(run, step)
            state.step = step + 1
            bar.update(1)
            periodic_work(run, state, bar)
    finally:
        bar.close()


def run_step(run: Run, step: int) -> None:
    """One optimizer step of Algorithm 1 over `gradient_accumulation_steps` micro-batches, then gradient
    clipping, Adam (skipped on the device if the gradient is not finite), the LR schedule and the EMA. It only
    queues work on the device: nothing here waits for it."""
    config, accelerator = run.config, run.accelerator
    generator = torch.Generator(run.device).manual_seed(mix_seed(config.seed, step, accelerator.process_index))
    torch.manual_seed(mix_seed(config.seed, step, accelerator.process_index, DROPOUT_SEED_TAG))  # dropout
    accum = config.gradient_accumulation_steps
    for j in range(accum):
        with accelerator.no_sync(run.unet) if j < accum - 1 else contextlib.nullcontext():
            forward_backward(run, step, j, generator)
    # the norm of the all-reduced gradient: the same on every process, so all agree on a skip
    norm = accelerator.clip_grad_norm_(run.unet.parameters(), config.max_grad_norm or math.inf)
    skipped = ~torch.isfinite(norm)
    optimizer_step(run, skipped)
    run.optimizer.zero_grad(set_to_none=True)
    run.lr_scheduler.step()
    run.ema.update(run.raw_unet.parameters())
    run.meters.add_step(skipped)


def forward_backward(run: Run, step: int, j: int, generator: torch.Generator) -> None:
    """Micro-batch j of step `step`: x_0 from the data, ε ~ N(0, I) and t ~ U{0..T-1} (Algorithm 1, lines
    2-4), the per-sample loss (line 5), its backward pass, and the loss into the meters."""
    config = run.config
    x0 = to_model_range(run.source.get(step, j).to(run.device, non_blocking=True), config.random_flip, generator)
    if config.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(x0.shape, generator=generator, device=run.device)
    t, weights = run.timesteps.sample(x0.shape[0], generator, run.device)
    per_sample = run.loss(run.model, x0, noise, t)
    if run.timesteps.needs_losses:  # every process applies every process's (t, loss), so all keep one history
        run.timesteps.update(run.accelerator.gather(t), run.accelerator.gather(per_sample.detach()))
    if weights is not None:  # importance sampling: 1/(T p(t)) keeps the mean an unbiased estimate
        per_sample = per_sample * weights
    run.accelerator.backward(per_sample.mean() / config.gradient_accumulation_steps)
    run.meters.add_losses(per_sample.detach(), t)


def optimizer_step(run: Run, skipped: torch.Tensor) -> None:
    """Adam's step, unless `skipped` (a 0-d bool tensor on the device). With fp16, Accelerate's GradScaler
    finds the non-finite gradients and skips by itself."""
    inner = run.optimizer.optimizer
    if run.accelerator.scaler is not None:
        run.optimizer.step()
    elif run.skips_on_device:
        inner.found_inf = skipped.float()  # fused Adam leaves parameters and moments as they are where it is 1
        try:
            run.optimizer.step()
        finally:
            del inner.found_inf
    elif not bool(skipped):  # a host synchronisation, only for optimizers without a fused kernel here
        run.optimizer.step()


# ---------------------------------------------------------------- periodic work


def periodic_work(run: Run, state: TrainState, bar) -> None:
    """After step state.step: read the counters and log; then, outside the training clock, the checkpoint
    (before the grid and the evaluation: a kill during them loses no training), the grid, the evaluation,
    and a push of the pipeline so far."""
    config, done = run.config, state.step

    def due(every: Optional[int]) -> bool:
        return bool(every) and (done % every == 0 or done == run.total_steps)

    log_now = due(config.logging_steps) or done == 1  # the first step too: a short run's curve has two points
    if log_now or due(config.checkpointing_steps):
        check_nonfinite(run, state)
    if log_now:
        log_progress(run, state, bar)
    push_now = bool(run.pusher and config.hub_push_every and done % config.hub_push_every == 0 and done < run.total_steps)
    with run.clock.pause():
        if run.is_main and state.history and (due(config.checkpointing_steps) or push_now):
            plot_loss_curve(state.history, run.output_dir / "loss_curve.png")
        if due(config.checkpointing_steps):
            write_checkpoint(run, state)
        if due(config.save_images_steps):
            save_grid(run, done)
        if due(config.eval_every):
            evaluate(run, state)
        if due(config.eval_nll_every):
            evaluate_nll(run, state)
        if push_now:  # the EMA pipeline and card so far; the upload runs in the background
            save_ema_pipeline(run)
            write_model_card(run.output_dir, run.pusher.repo_id, progress=(done, run.total_steps))
            run.pusher.push_in_background(run.output_dir, f"Training step {done} of {run.total_steps}")


def check_nonfinite(run: Run, state: TrainState) -> None:
    """Read the non-finite step counters into the state (a host synchronisation); stop the run once
    --max_nonfinite_in_a_row steps in a row were skipped."""
    total, in_a_row, longest = run.meters.read_counters()
    if total > state.nonfinite_total:
        logger.warning("%d step(s) up to step %d had a non-finite loss or gradient and were skipped (%d in a row now).",
                       total - state.nonfinite_total, state.step, in_a_row)
    state.nonfinite_total, state.nonfinite_in_a_row = total, in_a_row
    if longest >= run.config.max_nonfinite_in_a_row:
        raise NonFiniteLossError(
            f"The loss was non-finite for {longest} steps in a row (up to step {state.step}). "
            "Lower --learning_rate, keep --max_grad_norm on, try --mixed_precision bf16 or no, or check the data; "
            "resume with --resume_from_checkpoint latest."
        )


def log_progress(run: Run, state: TrainState, bar) -> None:
    """Append the mean losses since the last log (overall and by timestep quartile, over all processes), the
    LR, EMA decay and throughput to the history; send them to the trackers and the progress bar."""
    means, counts = run.meters.read_losses(run.accelerator)
    seconds, steps = run.clock.lap(state.step)
    entry = {"step": state.step, "loss": means[0], "lr": run.lr_scheduler.get_last_lr()[0],
             "ema_decay": run.ema.current_decay(), "seconds": seconds,
             "images_per_s": steps * run.config.batch_size / seconds}
    entry.update({f"loss_t_q{q}": means[q] for q in range(1, 5) if counts[q] > 0})
    state.history.append(entry)
    metrics = {k: v for k, v in entry.items() if k not in ("step", "seconds")}
    run.accelerator.log({**metrics, "nonfinite_total": state.nonfinite_total}, step=state.step)
    bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", ema=f"{entry['ema_decay']:.4f}")


def weights_problem(model: torch.nn.Module, config: TrainingConfig) -> Optional[str]:
    """Why weights must not be saved: they are not finite, or they give non-finite outputs on a fixed probe batch
    (weights so large that the network overflows); None when they are sound."""
    if not weights_are_finite(model):
        return "are not finite"
    device = next(model.parameters()).device
    probe = torch.randn(2, config.channels, config.resolution, config.resolution, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = model(probe.to(device), torch.tensor([0, config.num_train_timesteps - 1], device=device)).sample
    return None if bool(torch.isfinite(output).all()) else "give non-finite outputs"


def refuse_unsound_weights(run: Run, state: TrainState, what: str) -> None:
    """Raise NonFiniteWeightsError (on every process: each holds the same weights) rather than save unsound ones."""
    for label, model in (("UNet", run.raw_unet), ("EMA", run.ema.model)):
        problem = weights_problem(model, run.config)
        if problem:
            raise NonFiniteWeightsError(
                f"The {label} weights at step {state.step} {problem} ({state.nonfinite_total} of {state.step} steps were "
                f"skipped as non-finite), so {what} is not written; resume from the last checkpoint in {run.output_dir} "
                "with a lower --learning_rate.")


def write_checkpoint(run: Run, state: TrainState, name: Optional[str] = None) -> None:
    """checkpoint-<step>/ (rotated) or `name`/ (outside the rotation), written by the main process; never with
    unsound weights."""
    refuse_unsound_weights(run, state, name or f"{CHECKPOINT_PREFIX}{state.step}")
    if run.is_main:
        state.lr_scheduler, state.ema = run.lr_scheduler.state_dict(), run.ema.state()
        state.timestep_sampler = run.timesteps.state_dict()
        save_checkpoint(run.output_dir, state.step, run.raw_unet, run.ema.model, run.optimizer, state.to_dict(), name=name,
                        extra_files={"training_config.json": run.config.to_json(),
                                     "unet_config.json": json.dumps({k: v for k, v in run.raw_unet.config.items()
                                                                     if not k.startswith("_")}, indent=2)})
        if name is None:
            rotate_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
    run.accelerator.wait_for_everyone()


def save_grid(run: Run, step: int) -> None:
    images = sample_images(run.ema.model, run.scheduler.config, run.config, run.accelerator)
    if run.is_main:
        grid = image_grid(images)
        atomic_save_image(grid, run.output_dir / "samples" / f"step-{step:07d}.png")
        atomic_save_image(grid, run.output_dir / "samples.png")
        log_grid(run.accelerator, grid, step)


def evaluate(run: Run, state: TrainState) -> None:
    """FID (and IS) of the EMA model now; with --keep_best, best_checkpoint/ when it is the best so far."""
    config = run.config
    metrics = evaluate_during_training(run.ema.model, run.scheduler.config, config, run.accelerator,
                                       run.feature_network, run.reference)
    state.evals.append({"step": state.step, **metrics})
    run.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
    isc = f", IS {metrics['inception_score']:.3f}" if "inception_score" in metrics else ""
    key = run.feature_network.metric("fd")
    logger.info("Step %d: %s %.4f (%d samples, DDIM %d steps)%s", state.step, key.upper(), metrics[key],
                config.eval_samples, config.eval_steps, isc)
    if config.keep_best and (state.best is None or metrics[key] < state.best[key]):
        state.best = {"step": state.step, key: metrics[key]}
        write_checkpoint(run, state, name="best_checkpoint")


def evaluate_nll(run: Run, state: TrainState) -> None:
    """The EMA model's bound in bits/dim on the held-out images, each process its share (image k's noise from
    (seed, k)); mean and standard error of each term into the state, the trackers and the log."""
    from accelerate.utils import gather_object

    from .likelihood import TERMS, bits_per_dim_of_share, summarize
    from .sampling import process_share

    config, accelerator = run.config, run.accelerator
    ids = process_share(len(run.nll_images), accelerator.process_index, accelerator.num_processes)
    chunk = max(1, config.batch_size // (accelerator.num_processes * config.gradient_accumulation_steps))
    rows = [(k, {term: terms[term][i].item() for term in TERMS})
            for ks, terms in bits_per_dim_of_share(run.ema.model, run.scheduler, run.nll_images, ids, config.seed, chunk)
            for i, k in enumerate(ks)]
    rows = sorted(gather_object(rows), key=lambda row: row[0])
    summary = summarize({term: torch.tensor([r[term] for _, r in rows], dtype=torch.float64) for term in TERMS})
    state.nll.append({"step": state.step, "images": len(rows), **summary})
    accelerator.log({f"eval/bpd_{term}": summary[term]["mean"] for term in TERMS}, step=state.step)
    logger.info("Step %d: NLL bound %.4f ± %.4f bits/dim on %d held-out images (prior %.4f, KL %.4f, decoder %.4f)",
                state.step, summary["total"]["mean"], summary["total"]["sem"], len(rows), summary["prior"]["mean"],
                summary["kl"]["mean"], summary["decoder"]["mean"])


def ema_pipeline(run: Run):
    """The pipeline of the EMA weights with the run's scheduler."""
    from .pipelines.pipeline_ddpm import DDPMPipeline

    return DDPMPipeline(unet=run.ema.model, scheduler=DDPMScheduler.from_config(run.scheduler.config))


def save_ema_pipeline(run: Run) -> None:
    save_pipeline(ema_pipeline(run), run.output_dir)


def grid_seed(config: TrainingConfig, i: int) -> int:
    """The seed of grid image i (also the card figures' seeds)."""
    return mix_seed(config.seed, i, GRID_SEED_TAG)


def save_card_figures(run: Run) -> None:
    """The denoising animation and the progressive figure of the EMA pipeline (the grid's first 16 seeds and its
    sampler steps: the animation ends on the grid's first images), for the model card."""
    from .figures import chain_figures, record_figures

    config = run.config
    pipe = ema_pipeline(run)
    pipe.set_progress_bar_config(desc="Card figures", leave=False)
    seeds = [grid_seed(config, i) for i in range(min(16, config.num_sample_images))]
    record_figures(run.output_dir, chain_figures(pipe, run.output_dir, seeds, config.grid_steps,
                                                 about={"pipeline": "this run (EMA)"}))


def log_grid(accelerator, grid, step: int) -> None:
    """The sample grid (a PIL image) to the trackers that take images."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step)


def sample_images(unet, scheduler_config, config: TrainingConfig, accelerator) -> torch.Tensor:
    """The fixed-seed grid images (image i from seed (seed, i)), shared out over all processes and
    gathered; every process returns the full [N, C, H, W] batch in [0, 1]."""
    from accelerate.utils import gather_object

    from .pipelines.pipeline_ddpm import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=not accelerator.is_local_main_process, desc="Sampling grid", leave=False)
    drawn = draw_share(pipe, config.num_sample_images, lambda i: grid_seed(config, i),
                       accelerator.process_index, accelerator.num_processes, batch_size=config.num_sample_images,
                       num_inference_steps=config.grid_steps, output_type="pt")
    rows = [(i, image.cpu()) for ids, images in drawn for i, image in zip(ids, images)]
    return torch.stack([image for _, image in sorted(gather_object(rows), key=lambda row: row[0])])


def evaluate_during_training(unet, scheduler_config, config: TrainingConfig, accelerator, network, reference) -> dict:
    """FID and IS (or FD_DINOv2) of `eval_samples` images from `unet` drawn with DDIM in `eval_steps` steps, each process
    drawing its share (image i from seed (seed, i)); every process returns the same numbers."""
    from accelerate.utils import gather_object
    from diffusers import DDIMScheduler

    from .evaluation import features_of_images
    from .metrics import feature_statistics, frechet_distance, inception_score
    from .pipelines.pipeline_ddpm import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    chunk = max(1, config.batch_size // (accelerator.num_processes * config.gradient_accumulation_steps))
    drawn = draw_share(pipe, config.eval_samples, lambda i: mix_seed(config.seed, i, EVAL_SEED_TAG),
                       accelerator.process_index, accelerator.num_processes, batch_size=chunk,
                       num_inference_steps=config.eval_steps, output_type="pt", eta=0.0)
    rows = [row for ids, images in drawn for row in zip(ids, features_of_images(images, network, device=accelerator.device))]
    feats = torch.stack([f for _, f in sorted(gather_object(rows), key=lambda row: row[0])]).double().numpy()
    d = network.num_features
    result = {network.metric("fd"): frechet_distance(*feature_statistics(feats[:, :d]), *reference)}
    if feats.shape[1] > d and feats.shape[0] >= 10:
        result["inception_score"] = inception_score(feats[:, d:], splits=10)[0]
    return result


# ---------------------------------------------------------------- 4. finish


def finish(run: Run, state: TrainState) -> None:
    """The pipeline with the EMA weights, train_summary.json and the model card; then the final push. Unsound final
    weights end the run with one line saying so, and nothing is written over the last checkpoint and pipeline."""
    refuse_unsound_weights(run, state, "the pipeline")
    if run.is_main:
        save_ema_pipeline(run)
        if run.config.card_figures:
            save_card_figures(run)
        atomic_write_json(run.output_dir / "train_summary.json", {
            "steps": run.total_steps, "images_seen": run.total_steps * run.config.batch_size,
            "skipped_images": run.source.skipped, "nonfinite_steps": state.nonfinite_total,
            "final_loss": state.history[-1]["loss"] if state.history else None, "evals": state.evals, "best": state.best,
            "nll": state.nll, "config_history": state.config_history,
            "checkpoints": [str(f.name) for _, f in list_checkpoints(run.output_dir)],
        })
        write_model_card(run.output_dir, run.pusher.repo_id if run.pusher else None)
        logger.info("Saved the pipeline (EMA weights) and its model card to %s.", run.output_dir)
        if state.nonfinite_total:
            logger.warning("%d of %d steps had a non-finite loss or gradient and were skipped (see train_summary.json).",
                           state.nonfinite_total, run.total_steps)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    if run.pusher is not None:
        try:
            run.pusher.push(run.output_dir, f"End of training: step {run.total_steps}")
            logger.info("Pushed %s to %s.", run.output_dir, run.pusher.url)
        finally:
            run.pusher.close()
