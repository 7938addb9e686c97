"""How the training timestep t of each sample is drawn: `sampler.sample(batch, generator, device)` returns
(t, weights), where weights (None for uniform draws) are the per-sample 1/(T·p(t)) that keep the weighted
loss an unbiased estimate of the objective.

`LossSecondMomentSampler` is improved DDPM's importance sampling for L_vlb (Nichol & Dhariwal 2021, Sec. 3.3):
p(t) ∝ sqrt(E[L_t²]) over the last 10 losses seen at each t, mixed with 0.1% of the uniform distribution, and
uniform until every t has 10 losses. It lives on the device (a ring buffer of 10 losses per t; no host
synchronisation), every process applies the same all-gathered (t, loss) pairs so all hold the same history,
and its state goes into checkpoints, so that a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ddpm_hf.choices import TIMESTEP_SAMPLERS
from ddpm_hf.errors import UsageError


class UniformSampler:
    """t ~ U{0..T-1}, as in Algorithm 1."""

    needs_losses = False

    def __init__(self, num_train_timesteps: int, device=None):
        self.T = num_train_timesteps

    def sample(self, batch: int, generator: torch.Generator, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return torch.randint(0, self.T, (batch,), generator=generator, device=device), None

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> Optional[dict]:
        return None

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling of t by the second moment of its recent losses (improved DDPM)."""

    needs_losses = True
    history_per_term = 10
    uniform_prob = 0.001

    def __init__(self, num_train_timesteps: int, device=None):
        super().__init__(num_train_timesteps)
        # row T is scratch: it takes the writes of losses beyond the last 10 of one t in one update
        self.history = torch.zeros(self.T + 1, self.history_per_term, device=device)
        self.seen = torch.zeros(self.T, dtype=torch.long, device=device)  # losses ever written per t

    def probabilities(self) -> torch.Tensor:
        """p(t) [T] on the device: uniform until every t has a full history."""
        weights = self.history[: self.T].pow(2).mean(1).sqrt()
        weights = weights / weights.sum().clamp_min(1e-30)
        weights = weights * (1 - self.uniform_prob) + self.uniform_prob / self.T
        warmed_up = (self.seen >= self.history_per_term).all()
        return torch.where(warmed_up, weights, torch.full_like(weights, 1.0 / self.T))

    def sample(self, batch: int, generator: torch.Generator, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        p = self.probabilities().to(device)
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        return t, 1.0 / (self.T * p[t])

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Write the losses (in order: per t, the newest 10 are kept) into the ring buffers."""
        t = t.to(self.seen.device).long()
        losses = losses.to(self.history.device, self.history.dtype)
        order = torch.argsort(t, stable=True)
        t, losses = t[order], losses[order]
        counts = torch.zeros_like(self.seen).scatter_add_(0, t, torch.ones_like(t))
        first = torch.cumsum(counts, 0) - counts  # where each t's group starts in the sorted batch
        rank = torch.arange(len(t), device=t.device) - first[t]  # arrival order within the group
        keep = rank >= counts[t] - self.history_per_term  # a ring of 10 holds only the newest 10
        slot = (self.seen[t] + rank) % self.history_per_term
        self.history.index_put_((torch.where(keep, t, self.T), slot), losses)
        self.seen += counts

    def state_dict(self) -> dict:
        return {"history": self.history[: self.T].tolist(), "seen": self.seen.tolist()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            raise UsageError("the checkpoint holds no loss history for --timestep_sampler loss-second-moment.")
        self.history[: self.T] = torch.tensor(state["history"], dtype=self.history.dtype)
        self.seen.copy_(torch.tensor(state["seen"], dtype=torch.long))


def make_timestep_sampler(name: str, num_train_timesteps: int, device=None) -> UniformSampler:
    if name == "uniform":
        return UniformSampler(num_train_timesteps, device)
    elif name == "loss-second-moment":
        return LossSecondMomentSampler(num_train_timesteps, device)
    else:
        raise UsageError(f"--timestep_sampler {name!r} is not one of {', '.join(TIMESTEP_SAMPLERS)}.")
