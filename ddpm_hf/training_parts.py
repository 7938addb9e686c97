"""The parts a training run is built from, each from the run's config: the diffusion (our DDPMScheduler), the UNet
(its config: a resumed run's own, --unet_config's or the preset's; --init_from's weights) and the optimizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import math

import torch

from .choices import LEARNED_VARIANCE_TYPES, OPTIMIZERS
from .config import TrainingConfig
from .run_folder import CHECKPOINT_UNET_CONFIG
from .scheduler import DDPMScheduler


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
    from .unets import check_unet_config, resolve_unet_config, unet_config

    if checkpoint is not None and (checkpoint / CHECKPOINT_UNET_CONFIG).is_file():
        return json.loads((checkpoint / CHECKPOINT_UNET_CONFIG).read_text())
    extra = {} if config.dropout is None else {"dropout": config.dropout}
    out = 2 * config.channels if config.variance_type in LEARNED_VARIANCE_TYPES else config.channels
    if config.unet_config:
        read = resolve_unet_config(config.unet_config, config.unet_subfolder)
        return {**check_unet_config(read, config.channels, out, config.resolution, config.unet_config), **extra}
    return unet_config(config.unet_preset, sample_size=config.resolution, in_channels=config.channels, out_channels=out, **extra)


def unet_config_json(unet) -> str:
    """A UNet's own config as a checkpoint keeps it (CHECKPOINT_UNET_CONFIG): without diffusers' private keys."""
    return json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}, indent=2)


def make_unet(config: TrainingConfig, checkpoint: Optional[Path] = None):
    """A freshly initialised UNet2DModel of the run's config (`run_unet_config`)."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(run_unet_config(config, checkpoint))


def load_starting_weights(unet, source: str) -> None:
    """--init_from: the UNet weights of the pipeline `source` (a folder, a google/ddpm-* root layout, or a Hub repo
    id; cached ones work offline), into `unet`."""
    from .weights import load_pipeline

    weights = load_pipeline(source).unet.state_dict()
    try:
        unet.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"--init_from {source}: its UNet weights do not fit this run's UNet ({str(e).splitlines()[1][:160]}); "
                         "leave --unet_config/--unet_preset and --channels to the starting pipeline.") from None


# bf16 is taken on a CPU only when its step measured at least this much faster: the probe's few steps are noisy (±15%
# between processes on one 2-core machine), a smaller gain did not survive into the real loop there, and fp32 is the
# exact one of the two
BF16_MIN_GAIN = 1.10


def step_rates(config: TrainingConfig, precisions, batch: int, rounds: int = 10, warmup: int = 5) -> dict:
    """{precision: images/s} of this run's training step on the CPU in each of `precisions` (no, bf16): a fresh UNet
    of its config and a micro-batch of `batch` random images through what a step of the loop does (the run's loss,
    backward, clipping, Adam, the EMA), with the forward pass under autocast as Accelerate runs it. After `warmup`
    steps of each, `rounds` steps of each in turn (so that a busy moment of the machine hits both alike); the
    median. The step's parts outside the network matter: on one machine a bare forward and backward timed bf16 1.2x
    faster, and the loop was not faster at all."""
    import statistics
    import time

    from .ema import EMA
    from .losses import DiffusionLoss

    unet = make_unet(config)
    optimizer, _ = make_optimizer(config, unet.parameters())
    ema = EMA(unet, decay=config.ema_decay)
    scheduler = make_scheduler(config)
    loss = DiffusionLoss(scheduler, config.loss, config.snr_gamma, config.vlb_weight)
    x0 = torch.rand(batch, config.channels, config.resolution, config.resolution) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.randint(0, config.num_train_timesteps, (batch,))

    def step(precision: str) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            per_sample = loss(lambda x_t, t_: unet(x_t, t_).sample.float(), x0, noise, t)
        per_sample.mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(unet.parameters())
        return time.perf_counter() - start

    # fp32 last: on one 2-core machine fp32 measured after bf16 ran as fast as in a loop of its own, while measured
    # first (however long the warm-up) it ran 15% slower than that, which made bf16 look faster than it was
    order = sorted(precisions, key=lambda precision: precision == "no")
    for _ in range(warmup):
        for precision in order:
            step(precision)
    seconds = {precision: [] for precision in order}
    for _ in range(rounds):
        for precision in order:
            seconds[precision].append(step(precision))
    return {precision: batch / statistics.median(seconds[precision]) for precision in precisions}


def rates_text(rates: dict) -> str:
    """`fp32 N images/s, bf16 M images/s`: what --mixed_precision auto measured, for the log and the card."""
    return ", ".join(f"{'fp32' if precision == 'no' else precision} {rate:.0f} images/s" for precision, rate in rates.items())


def choose_mixed_precision(config: TrainingConfig, device: torch.device, processes: int = 1, rate=None) -> tuple:
    """(the precision --mixed_precision auto means here, what it was chosen from). On a GPU: bf16 where supported,
    else no. On a CPU: bf16 where its step (`rate`: images/s of the run's own step) is at least BF16_MIN_GAIN times
    as fast as fp32's, else no; bf16 is not timed where oneDNN has no native bf16 at all."""
    from .devices import cpu_has_bf16

    if device.type == "cuda":
        return ("bf16" if torch.cuda.is_bf16_supported() else "no"), {"device": "cuda"}
    if device.type != "cpu":
        return "no", {"device": device.type}
    rate = rate or step_rates
    micro = max(1, config.batch_size // (processes * config.gradient_accumulation_steps))
    rates = rate(config, ("no", "bf16") if cpu_has_bf16() else ("no",), micro)
    chosen = "bf16" if rates.get("bf16", 0.0) >= BF16_MIN_GAIN * rates["no"] else "no"
    return chosen, {"device": "cpu", "images_per_s": rates}


def optimizer_class(name: str):
    """--optimizer: Adam (the paper; weight decay added to the gradient, as L2) or AdamW (decoupled weight decay)."""
    if name == "adam":
        return torch.optim.Adam
    elif name == "adamw":
        return torch.optim.AdamW
    else:
        raise ValueError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(config: TrainingConfig, parameters) -> tuple:
    """(Adam or AdamW, skips_on_device). Fused where torch has a fused kernel for the device (CUDA, CPU, ...): it then
    skips a step whose gradient is not finite on the device itself (`found_inf`). Elsewhere foreach, and the host
    decides the skip."""
    parameters = list(parameters)
    cls = optimizer_class(config.optimizer)
    kwargs = dict(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                  weight_decay=config.weight_decay)
    try:
        return cls(parameters, fused=True, **kwargs), True
    except (RuntimeError, ValueError):  # no fused kernel for this device
        return cls(parameters, foreach=True, **kwargs), False
