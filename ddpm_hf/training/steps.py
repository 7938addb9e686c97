"""A training step's work on the device (Algorithm 1): what `loop.run_step` launches, what `step_graph.py` captures
and what the precision probe times. Nothing here waits for the device."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional

import torch

from ddpm_hf.diffusion.pixels import to_model_range
from ddpm_hf.seeding import DROPOUT_SEED_TAG, mix_seed
from ddpm_hf.training.optimizer import optimizer_step
from ddpm_hf.training.state import Run


def seed_step(run: Run, step: int) -> None:
    """The generators of step `step` on this process: flips, ε and t from run.generator, dropout from torch's own.
    Reseeding (rather than a new generator) is what a CUDA graph's replay reads."""
    rank = run.accelerator.process_index
    run.generator.manual_seed(mix_seed(run.config.seed, step, rank))
    torch.manual_seed(mix_seed(run.config.seed, step, rank, DROPOUT_SEED_TAG))


def device_step(run: Run, batches: list, ema_weight: Optional[torch.Tensor] = None,
                labels: Optional[list] = None, power_weights: Optional[torch.Tensor] = None) -> None:
    """The device's work of a step on its uint8 micro-batches (what step_graph.py captures): forward and backward of
    each (with its class labels in a class-conditional run), clipping, Adam, the EMA (its weight in `ema_weight`
    inside a graph, else from the host), --ema_posthoc's power EMAs (their weights in `power_weights`, which the host
    filled for this step) and the meters."""
    accum = len(batches)
    for j, batch in enumerate(batches):
        with run.accelerator.no_sync(run.unet) if j < accum - 1 else contextlib.nullcontext():
            forward_backward(run, batch, None if labels is None else labels[j])
    # the norm of the all-reduced gradient: the same on every process, so all agree on a skip
    norm = run.accelerator.clip_grad_norm_(run.unet.parameters(), run.config.max_grad_norm or math.inf)
    skipped = ~torch.isfinite(norm)
    optimizer_step(run, skipped)
    if ema_weight is None:
        run.ema.update(run.raw_unet.parameters())
    else:
        run.ema.apply(run.raw_unet.parameters(), ema_weight)
    if run.posthoc is not None:
        run.posthoc.apply(run.raw_unet.parameters(), power_weights)
    run.meters.add_step(skipped)


def forward_backward(run: Run, batch: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
    """One uint8 micro-batch: x_0 from it, ε ~ N(0, I) and t ~ U{0..T-1} (Algorithm 1, lines 2-4), the per-sample
    loss (line 5), its backward pass, and the loss into the meters. With class labels, each is replaced by "no class"
    with probability --label_dropout (drawn after t, from the step's generator), so that the one network learns both
    ε(x_t, c) and ε(x_t, ∅) (Ho & Salimans 2021, Algorithm 1)."""
    config = run.config
    x0 = to_model_range(batch, config.random_flip, run.generator)
    if config.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    noise = torch.randn(x0.shape, generator=run.generator, device=run.device)
    t, weights = run.t_sampler.sample(x0.shape[0], run.generator, run.device)
    model = run.model
    if labels is not None:
        dropped = torch.rand(labels.shape, generator=run.generator, device=labels.device) < config.label_dropout
        labels = torch.where(dropped, len(config.class_names), labels)  # the last embedding row: "no class"
        model = functools.partial(run.model, labels=labels)
    per_sample = run.loss(model, x0, noise, t)
    if run.t_sampler.needs_losses:  # every process applies every process's (t, loss), so all keep one history
        run.t_sampler.update(run.accelerator.gather(t), run.accelerator.gather(per_sample.detach()))
    if weights is not None:  # importance sampling: 1/(T p(t)) keeps the mean an unbiased estimate
        per_sample = per_sample * weights
    run.accelerator.backward(per_sample.mean() / config.gradient_accumulation_steps)
    run.meters.add_losses(per_sample.detach(), t)
