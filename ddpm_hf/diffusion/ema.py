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
        weight = self.advance()
        params = self._matched(parameters)
        if weight == 1.0:
            torch._foreach_copy_(self._params, params)
        else:
            torch._foreach_lerp_(self._params, params, weight)  # θ_ema += (1 - d)(θ - θ_ema)

    @torch.no_grad()
    def apply(self, parameters: Iterable[torch.nn.Parameter], weight: torch.Tensor) -> None:
        """The device's half of an update, with the weight 1 - d in a 0-d tensor (filled from `advance` before each
        replay of a CUDA graph). A lerp with weight 1 is a copy, and a tensor weight rounds as the number does, so this
        gives `update`'s results bit for bit."""
        params = self._matched(parameters)
        torch._foreach_lerp_(self._params, params, [weight] * len(params))

    def _matched(self, parameters: Iterable[torch.nn.Parameter]) -> list:
        params = [p.detach() for p in parameters]
        if len(params) != len(self._params):
            raise UsageError(f"EMA tracks {len(self._params)} parameters but got {len(params)}.")
        return [p.to(e.dtype) if p.dtype != e.dtype else p for p, e in zip(params, self._params)]

    def state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
