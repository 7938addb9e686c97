"""Exponential moving averages of model weights: the paper's (it samples from an EMA with decay 0.9999), and the
power-function EMAs that post-hoc EMA reconstructs other averages from (phema.py)."""

from __future__ import annotations

import copy
from typing import Iterable, List, Sequence, Tuple

import torch

from ddpm_hf.diffusion.phema import gamma_of, power_beta
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
        """The device's half of an update: θ_ema <- lerp(θ_ema, θ, w) with the weight w = 1 - d in a 0-d tensor
        (`lerp_`)."""
        lerp_(self._params, self._matched(parameters), weight)

    def _matched(self, parameters: Iterable[torch.nn.Parameter]) -> list:
        params = [p.detach() for p in parameters]
        if len(params) != len(self._params):
            raise UsageError(f"EMA tracks {len(self._params)} parameters but got {len(params)}.")
        return [p.to(e.dtype) if p.dtype != e.dtype else p for p, e in zip(params, self._params)]

    def state(self) -> dict:
        return {"num_updates": self.num_updates}

    def load_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])


@torch.no_grad()
def lerp_(averaged: list, params: list, weight: torch.Tensor) -> None:
    """averaged <- lerp(averaged, params, w), w a 0-d tensor on their device, by torch.lerp's two forms (a + w·δ for
    w < 0.5, else θ - (1 - w)·δ, δ = θ - a: exact at w = 1, a copy), in ten foreach launches whatever the number of
    tensors. (torch's _foreach_lerp_ takes a tensor weight only as one per tensor, on its slow path: a kernel per
    tensor, 328 per step of the paper's UNet.) Both forms are computed and the one w selects is kept, since choosing on
    the host would be a sync in a CUDA graph."""
    delta = torch._foreach_sub(params, averaged)
    near = torch._foreach_mul(delta, weight)
    torch._foreach_add_(near, averaged)
    torch._foreach_mul_(delta, 1 - weight)
    far = torch._foreach_sub(params, delta)
    small = (weight < 0.5).to(weight.dtype)
    torch._foreach_mul_(near, small)  # x·1 + y·0 = x exactly (y finite)
    torch._foreach_mul_(far, 1 - small)
    torch._foreach_add_(near, far)
    torch._foreach_copy_(averaged, near)


class PowerEMA:
    """Power-function EMAs of a model, one per σ_rel, on the model's device, updated after every optimizer step as
    `EMA` is: the host works out each update's weights 1 - β (`advance`) and the device lerps (`apply`), so that a
    step replayed as a CUDA graph runs `apply` with the weights the host filled in, and no update waits for the device.
    `t` is the training time after the last update, in steps."""

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels: Tuple[float, ...] = tuple(float(s) for s in sigma_rels)
        self.gammas = [gamma_of(s) for s in self.sigma_rels]
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]
        self.t = 0
        self._params = [list(m.parameters()) for m in self.models]
        self._weights = None

    def advance(self, t: int) -> List[float]:
        """Count an update at time `t` (the step just taken; Δt is the real time since the last update, whatever the
        interval) and return its weight 1 - β per σ_rel (1 at the first: a copy)."""
        if t <= self.t:
            raise ValueError(f"a power EMA's update at t = {t} comes after its last, at t = {self.t}")
        dt, self.t = t - self.t, t
        return [1.0 - power_beta(t, dt, g) for g in self.gammas]

    def weights_tensor(self) -> torch.Tensor:
        """The device tensor the weights of an update are filled into (one per σ_rel, in the averages' dtype): the
        same tensor for the whole run, which a CUDA graph's replay reads."""
        first = self._params[0][0]
        if self._weights is None or self._weights.device != first.device:
            self._weights = torch.ones(len(self.models), dtype=first.dtype, device=first.device)
        return self._weights

    def fill(self, t: int) -> torch.Tensor:
        """The host's half of an update at time `t`: `advance`, and its weights filled into `weights_tensor`, one
        fill per σ_rel (a fill from a host number is a kernel argument; a copy from host memory would wait for the
        device)."""
        weights = self.weights_tensor()
        for i, weight in enumerate(self.advance(t)):
            weights[i].fill_(weight)
        return weights

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter], t: int) -> None:
        """An eager update at time `t`: `apply` with its weights."""
        self.apply(parameters, self.fill(t))

    @torch.no_grad()
    def apply(self, parameters: Iterable[torch.nn.Parameter], weights: torch.Tensor) -> None:
        """The device's half: θ̂_i <- lerp(θ̂_i, θ, w_i) for each σ_rel, with w_i = weights[i] (a 0-d view each)."""
        params = [p.detach() for p in parameters]
        params = [p.to(a.dtype) if p.dtype != a.dtype else p for p, a in zip(params, self._params[0])]
        for i, averaged in enumerate(self._params):
            lerp_(averaged, params, weights[i])

    def state(self) -> dict:
        return {"t": self.t, "sigma_rels": list(self.sigma_rels)}

    def load_state(self, state: dict) -> None:
        self.t = int(state["t"])
