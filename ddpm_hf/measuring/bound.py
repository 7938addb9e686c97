"""The variational bound (Eq. 5) run over images with a network, in bits/dim: every term of the chain, each image
with its own counter-based noise, eagerly or replayed as a CUDA graph (the terms themselves are
`diffusion.likelihood`)."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch

from ddpm_hf.diffusion.pixels import to_model_range
from ddpm_hf.diffusion.likelihood import prior_bpd, vb_terms_bpd
from ddpm_hf.diffusion.scheduler import DDPMScheduler
from ddpm_hf.errors import UsageError
from ddpm_hf.pipelines.counter_noise import seed_keys, seeded_normal
from ddpm_hf.pipelines.cuda_graphs import Replayed


BOUND_WARMUP_TERMS = 2  # terms measured eagerly before the capture


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


def bits_per_dim_of_share(unet, scheduler: DDPMScheduler, images: torch.Tensor, ids: Sequence[int], seed: int,
                          batch_size: int, clip_denoised: bool = True, progress: Callable = lambda it: it,
                          labels: Optional[torch.Tensor] = None, term_done: Optional[Callable[[int], None]] = None):
    """The bound of images[k] for each k in `ids`, in batches: yields (ks, {term: float64 [len(ks)]}) with the
    terms of `bits_per_dim` and "terms" [len(ks), T] (per timestep). Image k's noise is counter-based from its seed
    (`image_seeds`), so its numbers do not depend on the batch, the process or the device. With `labels` (a
    class-conditional UNet), the bound of -log p(x_0 | c): image k given its class labels[k] (the conditional model,
    guidance scale 1). `term_done(n)` is called after each of a batch's T terms (n: the batch's images), so that a bar
    moves within a batch of 1000 network calls."""
    from ddpm_hf.pipelines.guidance import GuidedNetwork

    for i in progress(range(0, len(ids), batch_size)):
        ks = list(ids[i : i + batch_size])
        network = unet if labels is None else GuidedNetwork(unet, labels[ks], 1.0)

        def terms_shown(it, n=len(ks)):
            for t in it:
                yield t
                term_done(n)

        prior, terms = bound_terms(network, scheduler, images[ks], clip_denoised=clip_denoised, seeds=image_seeds(ks, seed),
                                   progress=terms_shown if term_done is not None else lambda it: it)
        kl, decoder = terms[:, 1:].sum(1), terms[:, 0]
        yield ks, {"total": prior + kl + decoder, "prior": prior, "kl": kl, "decoder": decoder, "terms": terms}
