"""The parts a training run is built from, each from the run's config: the diffusion (our DDPMScheduler), the UNet
(its config: a resumed run's own, --unet_config's or the preset's; --init_from's weights), the optimizer, and
`build_model`, all of them put together as a Run holds them (the optimizer's own parts: optimizer.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ddpm_hf.choices import LEARNED_VARIANCE_TYPES
from ddpm_hf.diffusion.ema import EMA, PowerEMA
from ddpm_hf.diffusion.phema import sigma_rels_of
from ddpm_hf.diffusion.losses import DiffusionLoss
from ddpm_hf.diffusion.scheduler import DDPMScheduler
from ddpm_hf.diffusion.timestep_samplers import make_timestep_sampler
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.run_folder import CHECKPOINT_UNET_CONFIG
from ddpm_hf.recipes.config import TrainingConfig
from ddpm_hf.training.optimizer import make_lr_schedule, make_optimizer
from ddpm_hf.training.state import StepMeters


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


def resolve_classes(config: TrainingConfig) -> TrainingConfig:
    """With --class_conditional, `config` with the class names of its data (every label checked: one line before any
    work); else `config` itself."""
    from ddpm_hf.training.batches import training_classes

    return dataclasses.replace(config, class_names=training_classes(config)) if config.class_conditional else config


def class_embedding(config: TrainingConfig, found: Dict[str, Any], source: str) -> Dict[str, Any]:
    """`found` with the class embedding a run needs: K + 1 rows (the last "no class") for --class_conditional's K
    classes, none otherwise; a config of its own that says otherwise is refused, naming `source`."""
    rows = found.get("num_class_embeds")
    if not config.class_conditional:
        if rows is not None or found.get("class_embed_type") is not None:
            raise UsageError(f"{source}: its UNet has a class embedding; add --class_conditional to train it with the "
                             "dataset's labels, or give an unconditional UNet.")
        return found
    wanted = len(config.class_names) + 1
    if found.get("class_embed_type") is not None or rows not in (None, wanted):
        raise UsageError(f"{source}: its class embedding (num_class_embeds {rows}, class_embed_type "
                         f"{found.get('class_embed_type')}) does not fit the data's {wanted - 1} classes plus \"no class\"; "
                         f"give num_class_embeds {wanted} and no class_embed_type, or leave it out.")
    return {**found, "num_class_embeds": wanted}


def run_unet_config(config: TrainingConfig, checkpoint: Optional[Path] = None) -> Dict[str, Any]:
    """The UNet2DModel config of a run: a resumed run's own (saved in its checkpoint, so the source is not needed
    any more), else --unet_config's (checked against the run: C input channels, C output channels or 2C with a
    learned variance, the resolution), else the preset's. One that cannot be built (`unet_config_problem`) is refused
    here, in one line naming where it came from: before the data, and before --dry_run builds it."""
    from ddpm_hf.sizes import sample_size
    from ddpm_hf.diffusion.unets import check_unet_config, resolve_unet_config, unet_config, unet_config_problem

    if checkpoint is not None and (checkpoint / CHECKPOINT_UNET_CONFIG).is_file():
        found, source = json.loads((checkpoint / CHECKPOINT_UNET_CONFIG).read_text()), checkpoint / CHECKPOINT_UNET_CONFIG
    else:
        extra = {} if config.dropout is None else {"dropout": config.dropout}
        out = 2 * config.channels if config.variance_type in LEARNED_VARIANCE_TYPES else config.channels
        if config.unet_config:
            read = resolve_unet_config(config.unet_config, config.unet_subfolder)
            problem = unet_config_problem(read)  # before the checks against the run, which read its block lists
            if problem:
                raise UsageError(f"--unet_config {config.unet_config}: {problem}; correct it in the config.")
            found = {**check_unet_config(read, config.channels, out, config.resolution, config.unet_config), **extra}
            source = f"--unet_config {config.unet_config}"
        else:
            found = unet_config(config.unet_preset, sample_size=sample_size(config.resolution), in_channels=config.channels,
                                out_channels=out, **extra)
            source = f"--unet_preset {config.unet_preset}"
    found = class_embedding(config, found, source)
    problem = unet_config_problem(found)
    if problem:
        raise UsageError(f"{source}: {problem}; correct it in the config.")
    return found


def unet_config_json(unet) -> str:
    """A UNet's own config as a checkpoint keeps it (CHECKPOINT_UNET_CONFIG): without diffusers' private keys."""
    return json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, indent=2)


def make_unet(config: TrainingConfig, checkpoint: Optional[Path] = None):
    """A freshly initialised UNet2DModel of the run's config (`run_unet_config`)."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(run_unet_config(config, checkpoint))


CLASS_EMBEDDING = "class_embedding."  # the class-conditional UNet's embedding, in its state dict


def load_starting_weights(unet, source: str) -> None:
    """--init_from: the UNet weights of the pipeline `source` (a folder, a google/ddpm-* root layout, or a Hub repo
    id; cached ones work offline), into `unet`."""
    from ddpm_hf.saved.weights import load_pipeline

    weights = load_pipeline(source).unet.state_dict()
    try:
        missing, unexpected = unet.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise UsageError(f"--init_from {source}: its UNet weights do not fit this run's UNet ({str(e).splitlines()[1][:160]}); "
                         "leave --unet_config/--unet_preset and --channels to the starting pipeline.") from None
    # a class-conditional run may start from an unconditional pipeline: everything but the class embedding, which
    # starts as the run's own (the other way round is refused with the UNet's config, before the data)
    others = [k for k in missing if not k.startswith(CLASS_EMBEDDING)] + list(unexpected)
    if others:
        raise UsageError(f"--init_from {source}: its UNet weights do not fit this run's UNet (keys {', '.join(others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}); leave --unet_config/--unet_preset and --channels to the "
                         "starting pipeline.")
    if missing:
        logging.getLogger(__name__).warning("--init_from %s is unconditional: the class embedding of this "
                                            "class-conditional run starts from its own initialisation.", source)


def build_model(config: TrainingConfig, accelerator, total_steps: int, checkpoint: Optional[Path] = None) -> dict:
    """The UNet (prepared by Accelerate; from --init_from's weights on a fresh start), its forward pass, the
    diffusion and loss, Adam, the LR schedule, the EMA (from the same weights) and the step meters."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    unet = make_unet(config, checkpoint)
    if config.init_from and checkpoint is None:
        load_starting_weights(unet, config.init_from)
    scheduler = make_scheduler(config)
    if config.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if config.gradient_checkpointing:  # a training forward only: the EMA's and the grids' run without gradients
        unet.enable_gradient_checkpointing()
    optimizer, skips_on_device = make_optimizer(config, unet.parameters())
    lr_scheduler = make_lr_schedule(config, optimizer, total_steps)
    ema = EMA(unet, decay=config.ema_decay, warmup=config.ema_warmup, inv_gamma=config.ema_inv_gamma,
              power=config.ema_power, update_after_step=config.ema_update_after_step)
    posthoc = PowerEMA(unet, sigma_rels_of(config.ema_posthoc_sigma_rels)) if config.ema_posthoc else None
    unet, optimizer = accelerator.prepare(unet, optimizer)
    ema.model.to(accelerator.device)
    for model in posthoc.models if posthoc else ():
        model.to(accelerator.device)
    if config.distill_teacher:  # a distillation round: the teacher's target, on the student's grid of N steps
        loss, t_sampler = distillation_objective(config, scheduler, accelerator.device)
    else:
        loss = DiffusionLoss(scheduler, config.loss, config.snr_gamma, config.vlb_weight)
        t_sampler = make_timestep_sampler(config.timestep_sampler, config.num_train_timesteps, accelerator.device)
    return dict(
        unet=unet, raw_unet=accelerator.unwrap_model(unet), forward=torch.compile(unet) if config.compile else unet,
        scheduler=scheduler, loss=loss, t_sampler=t_sampler,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler, ema=ema, posthoc=posthoc, skips_on_device=skips_on_device,
        meters=StepMeters(accelerator.device, config.num_train_timesteps), generator=torch.Generator(accelerator.device),
    )


def distillation_objective(config: TrainingConfig, scheduler: DDPMScheduler, device) -> tuple:
    """(the loss, the t-sampler) of a distillation round: `DistillationLoss` of the frozen teacher --distill_teacher
    (its own prediction type, its x̂ clipped as its scheduler clips; a learned variance's channels unused; a
    class-conditional one guided at --distill_guidance_scale), on the run's float64 ᾱ, with the student's step j
    drawn uniformly from its N."""
    from ddpm_hf.diffusion.distillation import DistillationLoss, network_x0, teacher_clip
    from ddpm_hf.saved.weights import load_pipeline

    teacher = load_pipeline(config.distill_teacher)
    theirs, ours = teacher.scheduler.config, scheduler.config
    differ = [k for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
              if k in theirs and theirs[k] != ours[k]]
    if differ:
        raise UsageError(f"--distill_teacher {config.distill_teacher}: its noise schedule differs from this run's "
                         f"({', '.join(differ)}); a student learns on its teacher's schedule: give the teacher's.")
    unet = teacher.unet.to(device).eval().requires_grad_(False)
    forward = None
    if config.class_conditional:  # the teacher guided at w, as its pipeline samples (Ho & Salimans 2021, Eq. 6)
        from ddpm_hf.pipelines.guidance import GuidedNetwork

        def forward(z, tau, labels):
            return GuidedNetwork(unet, labels, config.distill_guidance_scale)(z, tau).sample
    x0_hat = network_x0(unet, theirs["prediction_type"], config.channels, forward, teacher_clip(theirs))
    loss = DistillationLoss(x0_hat, scheduler.tables().alphas_cumprod, config.distill_steps, config.prediction_type,
                            config.distill_weighting)
    return loss, make_timestep_sampler("uniform", config.distill_steps, device)
