"""Exponential moving average of model weights (the paper samples from an EMA with decay 0.9999)."""

from __future__ import annotations

import copy
from typing import Iterable

import torch

from ddpm_hf.errors import UsageError


class EMA:
    """A frozen copy of a model whose parameters track θ_ema <- d·θ_ema + (1 - d)·θ after every optimizer step.

    decay: the (maximum) decay d. With `warmup`, d grows as 1 - (1 + n/inv_gamma)^-power (n updates
    counted after `update_after_step`), capped at `decay`; without it d is constant, as in the paper.
    Before `update_after_step` updates the EMA simply copies the weights (d = 0).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False,
                 inv_gamma: float = 1.0, power: float = 0.75, update_after_step: int = 0):
        if not 0.0 <= decay < 1.0:
            raise UsageError(f"ema decay={decay} must be in [0, 1), e.g. 0.9999.")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.update_after_step = update_after_step
        self.num_updates = 0
        self._params = list(self.model.parameters())
        self._weight = None  # update's weight, a 0-d tensor on the EMA's device

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates + 1 - self.update_after_step
        if n <= 0:
            return 0.0
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1.0 - (1.0 + n / self.inv_gamma) ** -self.power))

    def advance(self) -> float:
        """Count one update and return its weight 1 - d (1: a copy). The host's half of an update: a step replayed
        as a CUDA graph (step_graph.py) holds `apply`'s work, and the host calls this before each replay."""
        weight = 1.0 - self.current_decay()
        self.num_updates += 1
        return weight

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """An eager update: `apply` with this update's weight, so that an eager step and a replayed one (which runs
        `apply` with the weight the host filled in) give the same EMA bit for bit."""
        weight = self.advance()
        if self._weight is None or self._weight.device != self._params[0].device:
            self._weight = torch.empty((), dtype=torch.float32, device=self._params[0].device)
        self.apply(parameters, self._weight.fill_(weight))

    @torch.no_grad()
    def apply(self, parameters: Iterable[torch.nn.Parameter], weight: torch.Tensor) -> None:
        """The device's half of an update: θ_ema <- lerp(θ_ema, θ, w) with the weight w = 1 - d in a 0-d tensor,
        by torch.lerp's two forms (θ_ema + w·δ for w < 0.5, else θ - (1 - w)·δ, δ = θ - θ_ema: exact at w = 1, a copy),
        in ten foreach launches whatever the number of tensors. (torch's _foreach_lerp_ takes a tensor weight only as
        one per tensor, on its slow path: a kernel per tensor, 328 per step of the paper's UNet.) Both forms are
        computed and the one w selects is kept, since choosing on the host would be a sync in a CUDA graph."""
        params = self._matched(parameters)
        delta = torch._foreach_sub(params, self._params)
        near = torch._foreach_mul(delta, weight)
        torch._foreach_add_(near, self._params)
        torch._foreach_mul_(delta, 1 - weight)
        far = torch._foreach_sub(params, delta)
        small = (weight < 0.5).to(weight.dtype)
        torch._foreach_mul_(near, small)  # x·1 + y·0 = x exactly (y finite)
        torch._foreach_mul_(far, 1 - small)
        torch._foreach_add_(near, far)
        torch._foreach_copy_(self._params, near)

    def _matched(self, parameters: Iterable[torch.nn.Parameter]) -> list:
        params = [p.detach() for p in parameters]
        if len(params) != len(self._params):
            raise UsageError(f"EMA tracks {len(self._params)} parameters but got {len(params)}.")
        return [p.to(e.dtype) if p.dtype != e.dtype else p for p, e in zip(params, self._params)]

    def state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
