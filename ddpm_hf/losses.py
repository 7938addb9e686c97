"""The DDPM training objective: one value per sample (the loop reduces).

`DiffusionLoss(scheduler, ...)(model, x0, noise, t)` draws x_t from q(x_t | x_0) (Eq. 4), runs the model and
returns the per-sample loss: L_simple (Eq. 14: the MSE on the scheduler's prediction target), optionally with
min-SNR-γ weights.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .scheduler import DDPMScheduler, parameterization


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output at x_t, per the scheduler's prediction_type."""
    a, s = scheduler.coefficients(timesteps, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    return parameterization(scheduler.config.prediction_type).target(x0, noise, a, s)


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t), shaped [B] in float32 on like's device."""
    (out,) = scheduler.coefficients(timesteps, like.new_empty(len(timesteps), dtype=torch.float32), "snr")
    return out


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, Eq. 9), expressed for each parameterisation: the x_0-space
    weight min(SNR, γ) divided by what the parameterisation's MSE already carries (SNR for ε, SNR + 1 for v)."""
    return torch.clamp(snr_t, max=gamma) / parameterization(prediction_type).snr_factor(snr_t)


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean squared error (optionally weighted), shape [B]. Computed in float32."""
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample if weight is None else per_sample * weight


class DiffusionLoss:
    """The training loss of one batch, per sample: `loss(model, x0, noise, t) -> [B]` (float32), where
    `model(x_t, t)` returns the network's output tensor.

    snr_gamma: min-SNR-γ weighting of L_simple (None: the paper's unweighted L_simple)."""

    def __init__(self, scheduler: DDPMScheduler, snr_gamma: Optional[float] = None):
        self.scheduler, self.snr_gamma = scheduler, snr_gamma
        self.prediction_type = scheduler.config.prediction_type

    def __call__(self, model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = self.scheduler.add_noise(x0, noise, t)  # q(x_t | x_0), Eq. 4
        output = model(x_t, t)
        weight = None
        if self.snr_gamma is not None:
            weight = min_snr_weight(snr(self.scheduler, t, x0), self.snr_gamma, self.prediction_type)
        return diffusion_loss(output, training_target(self.scheduler, x0, noise, t), weight)
