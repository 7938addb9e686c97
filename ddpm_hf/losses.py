"""The DDPM training objective, one value per sample (the loop reduces)."""

from __future__ import annotations

from typing import Optional

import torch

from .scheduler import DDPMScheduler, extract_into_tensor


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output at x_t, per the scheduler's prediction_type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise  # L_simple, Eq. 14
    elif prediction_type == "sample":
        return x0
    elif prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of 'epsilon', 'sample', 'v_prediction'.")


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t), shaped [B] in float32 on like's device."""
    ab = scheduler._alphas_cumprod64
    return extract_into_tensor(ab / (1 - ab), timesteps, (len(timesteps),), torch.float32, like.device)


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, Eq. 9), expressed for each parameterisation: the x_0-space
    weight min(SNR, γ) divided by what the parameterisation's MSE already carries (SNR for ε, SNR + 1 for v)."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    elif prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    elif prediction_type == "sample":
        return clipped
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of 'epsilon', 'sample', 'v_prediction'.")


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample mean squared error (optionally weighted), shape [B]. Computed in float32."""
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample if weight is None else per_sample * weight
