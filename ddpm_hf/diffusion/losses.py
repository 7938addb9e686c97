"""The DDPM training objectives: one value per sample (the loop reduces).

`DiffusionLoss(scheduler, kind, ...)(model, x0, noise, t)` draws x_t from q(x_t | x_0) (Eq. 4), runs the model
and returns the per-sample loss of `kind`:

* `simple`: L_simple (Eq. 14), the MSE on the scheduler's prediction target, optionally min-SNR-γ weighted;
* `vlb`: T·L_t, the bound's term at t (bits/dim; `ddpm_hf.diffusion.likelihood`) scaled so that its mean over uniform t
  is the bound itself less the constant prior term (improved DDPM's rescaled KL);
* `hybrid`: L_simple + λ·T·L_t (improved DDPM's L_hybrid, λ = `vlb_weight`, 0.001 in the paper), with the
  stop-gradient on the mean in the bound's term, so that it trains only the variance.

With a learned variance the model outputs 2C channels: the MSE reads the first C, the bound both halves.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ddpm_hf.choices import LEARNED_VARIANCE_TYPES, LOSSES
from ddpm_hf.diffusion.scheduler import DDPMScheduler, parameterization
from ddpm_hf.errors import UsageError


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
    `model(x_t, t)` returns the network's output tensor and x0 holds 256-level images in [-1, 1].

    kind: `simple`, `vlb` or `hybrid` (module docstring). snr_gamma: min-SNR-γ weighting of the MSE (None: the
    paper's unweighted L_simple). vlb_weight: λ of `hybrid`."""

    def __init__(self, scheduler: DDPMScheduler, kind: str = "simple", snr_gamma: Optional[float] = None,
                 vlb_weight: float = 0.001):
        if kind not in LOSSES:
            raise UsageError(f"loss={kind!r} is not one of {', '.join(map(repr, LOSSES))}.")
        self.scheduler, self.kind, self.snr_gamma, self.vlb_weight = scheduler, kind, snr_gamma, vlb_weight
        self.prediction_type = scheduler.config.prediction_type
        self.learned_variance = scheduler.config.variance_type in LEARNED_VARIANCE_TYPES

    def __call__(self, model: Callable, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = self.scheduler.add_noise(x0, noise, t)  # q(x_t | x_0), Eq. 4
        output = model(x_t, t)
        if self.kind == "vlb":
            return self.bound_term(output, x0, x_t, t)
        weight = None
        if self.snr_gamma is not None:
            weight = min_snr_weight(snr(self.scheduler, t, x0), self.snr_gamma, self.prediction_type)
        prediction = output[:, : x0.shape[1]] if self.learned_variance else output
        mse = diffusion_loss(prediction, training_target(self.scheduler, x0, noise, t), weight)
        if self.kind == "simple":
            return mse
        elif self.kind == "hybrid":  # the bound trains the variance only: the mean's channels are detached
            frozen = torch.cat([prediction.detach(), output[:, x0.shape[1] :]], dim=1)
            return mse + self.vlb_weight * self.bound_term(frozen, x0, x_t, t)
        else:
            raise UsageError(f"loss={self.kind!r} is not one of {', '.join(map(repr, LOSSES))}.")

    def bound_term(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """T·L_t per sample, bits/dim (x̂_0 unclipped, as improved DDPM trains)."""
        from ddpm_hf.diffusion.likelihood import vb_terms_bpd

        T = self.scheduler.config.num_train_timesteps
        return T * vb_terms_bpd(self.scheduler, output.float(), x0.float(), x_t.float(), t, clip_denoised=False)
