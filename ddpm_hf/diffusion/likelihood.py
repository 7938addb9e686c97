"""The variational bound of Ho et al. 2020 (Eq. 5), per image, in bits per dimension.

    L = L_T + Σ_{t>1} L_{t-1} + L_0,  L_T = KL(q(x_T|x_0) || N(0, I)),
    L_{t-1} = KL(q(x_{t-1}|x_t, x_0) || p_θ(x_{t-1}|x_t)),  L_0 = -log p_θ(x_0|x_1)  (Eq. 13)

Conventions are improved DDPM's `calc_bpd_loop` (Nichol & Dhariwal 2021): the training index t runs over
0..T-1 (the paper's t - 1); the term at t = 0 is the decoder L_0, the discretized Gaussian of Eq. 13 (256 bins
of width 2/255 on [-1, 1], the outer bins extended to ±inf), here with the exact normal CDF in log space (not
the tanh approximation); at t >= 1 the KL term. x̂_0 is clipped to [-1, 1] (`clip_denoised`). The model's
log-variance follows `variance_type`: fixed_small: log β̃_t with β̃ at t = 0 replaced by β̃ at t = 1;
fixed_large: log β_t with the same replacement at t = 0; learned_range: frac·log β_t + (1 - frac)·(fixed_small's),
frac = (v + 1)/2 with v the model's second C channels; learned: those channels are log σ² themselves. Every
term is a mean over the image's dimensions divided by ln 2: bits per dimension. Computed in float64 after the
network (whose input is cast to its own dtype).
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from ddpm_hf.diffusion.scheduler import DDPMScheduler, FixedLogVariances, parameterization, variance

LN2 = math.log(2.0)
BIN_HALF_WIDTH = 1.0 / 255.0  # pixels k = 0..255 sit at -1 + 2k/255


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Φ(upper) - Φ(lower)) for finite standardized edges lower < upper, without cancellation: a bin in the
    upper half is reflected into the lower one (the normal is symmetric), where
    log(Φ(u) - Φ(l)) = log Φ(u) + log(1 - exp(log Φ(l) - log Φ(u))) holds all its digits."""
    reflect = (lower + upper) > 0
    lo, up = torch.where(reflect, -upper, lower), torch.where(reflect, -lower, upper)
    log_up = torch.special.log_ndtr(up)
    return log_up + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - log_up))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) (nats, elementwise) of pixels x in [-1, 1] on the 256-level grid under N(means, exp(log_scales)²)
    discretized to 256 bins of width 2/255 whose outer bins extend to -inf and +inf (Eq. 13)."""
    inv_std = torch.exp(-log_scales)
    lower = (x - means - BIN_HALF_WIDTH) * inv_std
    upper = (x - means + BIN_HALF_WIDTH) * inv_std
    first_bin = torch.special.log_ndtr(upper)  # (-inf, -1 + 1/255]
    last_bin = torch.special.log_ndtr(-lower)  # [1 - 1/255, +inf)
    inner = _log_normal_mass(lower, upper)
    return torch.where(x < -1 + BIN_HALF_WIDTH, first_bin, torch.where(x > 1 - BIN_HALF_WIDTH, last_bin, inner))


def mean_over_dimensions(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def prior_bpd(scheduler: DDPMScheduler, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image, bits/dim: the part of the bound no network can change."""
    T = scheduler.config.num_train_timesteps
    a, s = scheduler.coefficients(T - 1, x0, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
    kl = normal_kl(a * x0, torch.log(s * s).expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
    return mean_over_dimensions(kl) / LN2


def model_mean_log_variance(scheduler: DDPMScheduler, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                            clip_denoised: bool = True):
    """p_θ(x_{t-1} | x_t) at training indices t: (mean, log-variance, x̂_0), each shaped like x_t. The mean is the
    posterior mean (Eq. 7) at x̂_0 from the model's output (per prediction_type, clipped to [-1, 1] if
    clip_denoised); the log-variance per variance_type with improved DDPM's conventions at t = 0."""
    config = scheduler.config
    kind, v = variance(config.variance_type), None
    if kind.learned:
        model_output, v = model_output.split(x_t.shape[1], dim=1)
    a, s, small, beta, fixed_large = scheduler.coefficients(
        t, x_t, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_log_variance_clipped", "betas",
        "log_betas_clipped")
    log_variance = kind.log_variance(FixedLogVariances(small, fixed_large, torch.log(beta)), v).expand_as(x_t)
    x0_hat = parameterization(config.prediction_type).x0(model_output, x_t, a, s)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
    c1, c2 = scheduler.coefficients(t, x_t, "posterior_mean_coef1", "posterior_mean_coef2")
    return c1 * x0_hat + c2 * x_t, log_variance, x0_hat


def vb_terms_bpd(scheduler: DDPMScheduler, model_output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor,
                 t: torch.Tensor, clip_denoised: bool = True) -> torch.Tensor:
    """The bound's term at training index t of each image, bits/dim: L_0 (the decoder) where t = 0, else the KL
    between the posterior q(x_{t-1} | x_t, x_0) and p_θ(x_{t-1} | x_t). Differentiable in model_output."""
    mean, log_variance, _ = model_mean_log_variance(scheduler, model_output, x_t, t, clip_denoised)
    c1, c2, true_log_variance = scheduler.coefficients(t, x_t, "posterior_mean_coef1", "posterior_mean_coef2",
                                                       "posterior_log_variance_clipped")
    kl = normal_kl(c1 * x0 + c2 * x_t, true_log_variance, mean, log_variance)
    decoder = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)
    return torch.where(t == 0, mean_over_dimensions(decoder), mean_over_dimensions(kl)) / LN2


TERMS = ("total", "prior", "kl", "decoder")


# what a bound with `labels` is conditioned on, as its records say it (ddpm-nll's protocol, --eval_nll_every's entries)
GIVEN_CLASS = "each image's class label (the conditional model, guidance scale 1)"


def summarize(per_image: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Mean and standard error of the mean of each term over the images."""
    out = {}
    for term in TERMS:
        values = per_image[term].double()
        sem = values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        out[term] = {"mean": values.mean().item(), "sem": sem}
    return out
