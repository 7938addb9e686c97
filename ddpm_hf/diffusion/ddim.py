"""DDIM (Song et al. 2021) on any chain of timesteps: diffusers' `DDIMScheduler`, which also takes `timesteps=`.

diffusers' DDIM step always goes t -> t - T // N, whatever its chain says; a chain that does not step by exactly that
(the DDIM paper's quadratic one, App. D.2; `linspace` spacing; `trailing` where N does not divide T) would land between
its timesteps at every step. This subclass (same name and config, so a folder's provenance and a saved pipeline read as
diffusers') keeps diffusers' own step on the chains it spaces evenly by T // N, and on any other chain, explicit or
spaced, takes Eq. 12 from each timestep τ_i to the next one of the chain.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import diffusers
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from ddpm_hf.diffusion.scheduler import PARAMETERIZATIONS


class DDIMScheduler(diffusers.DDIMScheduler):
    """diffusers' DDIMScheduler; on a chain diffusers' step would not follow (`set_timesteps(timesteps=[...])`,
    descending, or a spacing not evenly T // N) each step goes to the chain's next timestep (x_0 after the last), and
    `chain` holds it."""

    chain: Optional[List[int]] = None  # the chain followed by Eq. 12; None: diffusers' own step


    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[Sequence[int]] = None) -> None:
        if timesteps is None:
            self.chain = None
            super().set_timesteps(num_inference_steps, device)
            spaced, stride = self.timesteps.tolist(), self.config.num_train_timesteps // num_inference_steps
            if all(t - following == stride for t, following in zip(spaced, spaced[1:])):
                return  # diffusers' own step follows this chain
            timesteps = spaced  # a spacing diffusers' step would leave: followed as an explicit chain
        chain = [int(t) for t in timesteps]
        T = self.config.num_train_timesteps
        if not chain or any(a <= b for a, b in zip(chain, chain[1:])) or chain[0] >= T or chain[-1] < 0:
            raise ValueError(f"timesteps must be distinct, descending and in [0, {T}); got {chain[:4]}...")
        self.chain, self.num_inference_steps = chain, len(chain)
        self.timesteps = torch.tensor(chain, dtype=torch.long, device=device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator=None, variance_noise: Optional[torch.Tensor] = None,
             return_dict: bool = True):
        if self.chain is None:
            return super().step(model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                variance_noise, return_dict)
        t = int(timestep)
        i = self.chain.index(t)
        s = self.chain[i + 1] if i + 1 < len(self.chain) else -1
        # 1. ᾱ_τi and ᾱ_τi-1 of the chain (ᾱ after the last step: final_alpha_cumprod)
        ab_t = self.alphas_cumprod[t]
        ab_s = self.alphas_cumprod[s] if s >= 0 else self.final_alpha_cumprod
        a, sd = ab_t ** 0.5, (1 - ab_t) ** 0.5
        # 2. x̂_0 from what the network predicts (the one table of prediction types), and ε̂ from the same output
        x0 = PARAMETERIZATIONS[self.config.prediction_type].x0(model_output, sample, a, sd)
        eps = model_output if self.config.prediction_type == "epsilon" else (sample - a * x0) / sd
        if self.config.thresholding:  # as diffusers' step: its dynamic thresholding, else clipping
            x0 = self._threshold_sample(x0)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        if use_clipped_model_output:
            eps = (sample - a * x0) / sd
        # 3. σ_τi(η) of Eq. 16, between the chain's two timesteps
        sigma = eta * self._get_variance(t, s) ** 0.5
        # 4. Eq. 12: x_τi-1 = √ᾱ_τi-1 x̂_0 + √(1 - ᾱ_τi-1 - σ²) ε̂ + σ z
        prev = ab_s ** 0.5 * x0 + (1 - ab_s - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Pass generator or variance_noise, not both.")
            if variance_noise is None:
                from diffusers.utils.torch_utils import randn_tensor

                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev = prev + sigma * variance_noise
        if not return_dict:
            return prev, x0
        return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


def followed_chain(scheduler, num_inference_steps: int) -> Optional[List[int]]:
    """The chain ddpm_hf's DDIMScheduler follows by Eq. 12 at `num_inference_steps` as its config spaces them (what
    a protocol records), or None: diffusers' own step, or another sampler."""
    if not isinstance(scheduler, DDIMScheduler):
        return None
    probe = DDIMScheduler.from_config(scheduler.config)
    probe.set_timesteps(num_inference_steps)
    return probe.chain
