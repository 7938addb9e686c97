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
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ddpm_hf.data.datasets import to_model_range
from ddpm_hf.diffusion.scheduler import DDPMScheduler, FixedLogVariances, parameterization, variance
from ddpm_hf.errors import UsageError
from ddpm_hf.pipelines.counter_noise import seed_keys, seeded_normal
from ddpm_hf.pipelines.cuda_graphs import Replayed

LN2 = math.log(2.0)
BOUND_WARMUP_TERMS = 2  # terms measured eagerly before the capture
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


def _network_dtype_and_device(unet, fallback_device):
    parameter = next(iter(unet.parameters()), None)
    if parameter is None:  # a module without parameters (an oracle): float64 in, on the images' device
        return torch.float64, fallback_device
    return parameter.dtype, parameter.device


@torch.no_grad()
def bound_terms(unet: Callable, scheduler: DDPMScheduler, images: torch.Tensor, noise: Optional[torch.Tensor] = None,
                generator=None, clip_denoised: bool = True, progress: Callable = lambda it: it,
                seeds: Optional[Sequence[int]] = None, capture: Optional[bool] = None, cuda=None) -> tuple:
    """(prior [N], terms [N, T]) in bits/dim, float64: the bound's term at every training index t of each image
    (t = 0: the decoder). `bits_per_dim` sums them; arguments as there. With seeds, one term is replayed as a CUDA
    graph on a GPU (capture: None, on CUDA only; cuda: torch.cuda or a test's stand-in, pipelines/cuda_graphs.py)."""
    dtype, device = _network_dtype_and_device(unet, images.device)
    if images.dtype != torch.uint8:
        raise UsageError(f"bits_per_dim takes uint8 images (the 256-level data the bound is defined on), got {images.dtype}.")
    x0 = to_model_range(images.to(device), dtype=torch.float64)  # pixel k at -1 + 2k/255
    T = scheduler.config.num_train_timesteps
    if noise is not None and tuple(noise.shape) != (T, *x0.shape):
        raise UsageError(f"noise has shape {tuple(noise.shape)}; bits_per_dim needs [T, N, C, H, W] = {(T, *x0.shape)}.")
    terms = torch.zeros(x0.shape[0], T, dtype=torch.float64, device=device)
    keys = seed_keys(seeds, device) if seeds is not None and noise is None else None  # once, not once per term
    position = torch.zeros((), dtype=torch.long, device=device)  # the term's t on the device, where a replay reads it
    tt = position.expand(x0.shape[0])

    def measure(eps: torch.Tensor) -> None:
        x_t = scheduler.add_noise(x0, eps, tt)  # q(x_t | x_0), Eq. 4
        output = unet(x_t.to(dtype), tt).sample.double()
        terms.index_copy_(1, position.view(1), vb_terms_bpd(scheduler, output, x0, x_t, tt, clip_denoised)[:, None])

    def failed(why: str) -> None:
        warnings.warn(f"The bound's term is not replayed as a CUDA graph: {why}; it is measured eagerly.")

    # counter-based noise (float32 as a generator's, then float64) needs nothing from the host: on a GPU one term is
    # captured as a CUDA graph and replayed for every t
    counter_term = None if keys is None else Replayed(
        lambda: measure(seeded_normal(keys, x0.shape[1:], position, "bound").double()), BOUND_WARMUP_TERMS,
        device.type == "cuda" if capture is None else capture, failed, state=lambda: (terms,), cuda=cuda)
    for t in progress(range(T - 1, -1, -1)):
        position.fill_(t)
        if counter_term is not None:
            counter_term()
        elif noise is not None:
            measure(noise[t].to(device=device, dtype=torch.float64))
        else:
            from diffusers.utils.torch_utils import randn_tensor

            measure(randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float32).double())
    return prior_bpd(scheduler, x0), terms


def bits_per_dim(
    unet: Callable,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    *,
    noise: Optional[torch.Tensor] = None,
    generator: Union[torch.Generator, List[torch.Generator], None] = None,
    clip_denoised: bool = True,
    progress: Callable = lambda it: it,
    seeds: Optional[Sequence[int]] = None,
) -> Dict[str, torch.Tensor]:
    """The bound on -log p(x_0) of each image, in bits/dim: {"total", "prior", "kl", "decoder"}, float64 [N] with
    total = prior + kl + decoder (kl sums the terms t = 1..T-1, decoder is the term at t = 0).

    images: uint8 [N, C, H, W]. noise: [T, N, C, H, W]; noise[t] draws the x_t of the term at index t (so a result
    can be reproduced exactly); or counter-based from `seeds` (one per image: `seeded_normal(seeds, ..., step=t,
    stream="bound")`, the same on every device); otherwise drawn from `generator` (one per image makes image k's noise
    independent of the batch), for t = T-1 down to 0. unet: any module whose output `.sample` the scheduler reads."""
    prior, terms = bound_terms(unet, scheduler, images, noise, generator, clip_denoised, progress, seeds)
    kl, decoder = terms[:, 1:].sum(1), terms[:, 0]
    return {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder}


def image_seeds(ids: Sequence[int], seed: int) -> List[int]:
    """Image k's seed, from (seed, k): image k gets the same noise in any batch, process or device."""
    from ddpm_hf.seeding import NLL_SEED_TAG, mix_seed

    return [mix_seed(seed, k, NLL_SEED_TAG) for k in ids]


TERMS = ("total", "prior", "kl", "decoder")


# what a bound with `labels` is conditioned on, as its records say it (ddpm-nll's protocol, --eval_nll_every's entries)
GIVEN_CLASS = "each image's class label (the conditional model, guidance scale 1)"


def bits_per_dim_of_share(unet, scheduler: DDPMScheduler, images: torch.Tensor, ids: Sequence[int], seed: int,
                          batch_size: int, clip_denoised: bool = True, progress: Callable = lambda it: it,
                          labels: Optional[torch.Tensor] = None):
    """The bound of images[k] for each k in `ids`, in batches: yields (ks, {term: float64 [len(ks)]}) with the
    terms of `bits_per_dim` and "terms" [len(ks), T] (per timestep). Image k's noise is counter-based from its seed
    (`image_seeds`), so its numbers do not depend on the batch, the process or the device. With `labels` (a
    class-conditional UNet), the bound of -log p(x_0 | c): image k given its class labels[k] (the conditional model,
    guidance scale 1)."""
    from ddpm_hf.pipelines.guidance import GuidedNetwork

    for i in progress(range(0, len(ids), batch_size)):
        ks = list(ids[i : i + batch_size])
        network = unet if labels is None else GuidedNetwork(unet, labels[ks], 1.0)
        prior, terms = bound_terms(network, scheduler, images[ks], clip_denoised=clip_denoised, seeds=image_seeds(ks, seed))
        kl, decoder = terms[:, 1:].sum(1), terms[:, 0]
        yield ks, {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder, "terms": terms}


def summarize(per_image: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Mean and standard error of the mean of each term over the images."""
    out = {}
    for term in TERMS:
        values = per_image[term].double()
        sem = values.std(unbiased=True).item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
        out[term] = {"mean": values.mean().item(), "sem": sem}
    return out
