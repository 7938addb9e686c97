"""The reverse chain of a batch replayed as a CUDA graph.

A chain of 1000 steps is 1000 UNet passes and scheduler steps, each a few hundred kernels launched from Python. With
counter-based noise (`pipe(seeds=...)`) no step needs the host: the step's numbers (√ᾱ_t, √(1-ᾱ_t), the posterior's
c0 and ct, the log-variances, σ_t) are gathered from a float64 table on the device by a step counter, and the noise is Philox of (seed,
counter). So one step is captured once and replayed for every step of the chain. It gives the eager chain's images bit
for bit: the same numbers meet the same kernels (a test runs it eagerly on a CPU against `denoise`).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Optional

import torch

from .counter_noise import SeedKeys, seeded_normal
from .cuda_graphs import Replayed

CHAIN_WARMUP_STEPS = 2  # eager steps before the capture


def network_output(unet, scheduler, x: torch.Tensor, t, keep_variance: bool) -> torch.Tensor:
    """The network's output at (x_t, t) in the chain's dtype: the network runs in its own dtype (bf16, fp16, ...); the
    variance channels of a 2C-channel output are dropped for a scheduler that does not use them."""
    net_dtype = getattr(unet, "dtype", None)
    model_input = scheduler.scale_model_input(x, t)
    output = unet(model_input if net_dtype in (None, x.dtype) else model_input.to(net_dtype), t).sample.to(x.dtype)
    if output.shape[1] == 2 * x.shape[1] and not keep_variance:
        output = output[:, : x.shape[1]]  # the variance channels are DDPM's alone
    return output


def chain_graph_refusal(scheduler, x: torch.Tensor, keys: Optional[SeedKeys], callback) -> Optional[str]:
    """Why this chain cannot be replayed as a CUDA graph (None: it can)."""
    if x.device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the chain is on {x.device.type})"
    return graph_form_refusal(scheduler, keys, callback)


def graph_form_refusal(scheduler, keys: Optional[SeedKeys], callback) -> Optional[str]:
    """What the replayed step itself cannot take, on any device."""
    if keys is None:
        return "a generator per image draws its noise on the host (pass seeds)"
    if not hasattr(scheduler, "step_coefficients"):
        return f"{type(scheduler).__name__} computes its step on the host"
    if scheduler.config.thresholding:
        return "dynamic thresholding"
    if callback is not None:
        return "a callback watches every step"
    return None


class _Chain:
    """A chain's static tensors (x_t, the seeds' keys, the step table, the timesteps, the step counter) and its
    Replayed step: a later chain of the same network and shape copies its inputs in and replays, with no new
    warm-up, capture or check."""

    def __init__(self, unet, scheduler, x: torch.Tensor, keys: SeedKeys, start: int, numbers: list,
                 keep_variance: bool, capture: bool, cuda):
        self.x = torch.empty_like(x)  # the chain's state, read and written in place by every step
        self.keys = SeedKeys(torch.empty_like(keys.low), torch.empty_like(keys.high))
        self.table = torch.empty((len(numbers), len(numbers[0])), dtype=torch.float64, device=x.device)
        self.timesteps = torch.empty(len(numbers), dtype=torch.int64, device=x.device)
        self.position = torch.zeros(1, dtype=torch.int64, device=x.device)  # the step within this chain
        coefficients = type(numbers[0])
        network = weakref.ref(unet)  # weakly: the chain is kept in _CHAINS under the network, which must stay freeable

        def one_step():
            # gathered on the device: indexing with a 0-d tensor (table[position]) would be an .item(), a host sync
            k = coefficients(*self.table.index_select(0, self.position)[0].unbind())
            t = self.timesteps.index_select(0, self.position)
            output = network_output(network(), scheduler, self.x, t, keep_variance)
            noise = seeded_normal(self.keys, self.x.shape[1:], self.position[0] + start, "step", dtype=self.x.dtype)
            self.x.copy_(scheduler.reverse_step(k, output, self.x, noise)[0])  # k.noise = 0 on the step to x_0

        def failed(why: str) -> None:
            warnings.warn(f"The reverse step is not replayed as a CUDA graph: {why}; the chain runs eagerly (pass "
                          "cuda_graph=False to say so from the start).")

        self.replayed = Replayed(one_step, CHAIN_WARMUP_STEPS, capture, failed, state=lambda: (self.x,), cuda=cuda)

    def run(self, x: torch.Tensor, keys: SeedKeys, numbers: list, host_timesteps: list, progress) -> torch.Tensor:
        self.x.copy_(x)
        self.keys.low.copy_(keys.low)
        self.keys.high.copy_(keys.high)
        # note: two small copies from the host per chain, not per step
        self.table.copy_(torch.tensor([list(k) for k in numbers], dtype=torch.float64))
        self.timesteps.copy_(torch.tensor(host_timesteps, dtype=torch.int64))
        for j, _ in enumerate(progress(host_timesteps)):
            self.position.fill_(j)
            self.replayed()
        return self.x.clone()


# network -> (what the chain was made for, _Chain): the one chain of each network kept for its next call on CUDA, so
# that a network and a shape are captured once, not once per call (training draws its grid with the same shape each
# time; a new shape replaces the old, whose graph memory goes with it)
_CHAINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def replayed_chain(unet, scheduler, x: torch.Tensor, keys: SeedKeys, start: int = 0, progress: Callable = lambda it: it,
                   capture: Optional[bool] = None, keep_variance: bool = False, cuda=None) -> torch.Tensor:
    """x_0 from x_t at chain step `start` (scheduler.set_timesteps done), image k's step noise from keys[k]: on CUDA the
    first CHAIN_WARMUP_STEPS steps eagerly, then one step captured, checked and replayed (cuda_graphs.py), and a later
    chain of the same network, scheduler settings and shape replays that graph from its first step; with capture=False
    (a CPU) every step runs eagerly through the same tables and counter. keep_variance: the scheduler reads a learned
    variance (the network's second C channels). cuda: torch.cuda, or a test's stand-in."""
    capture = x.device.type == "cuda" if capture is None else capture
    host_timesteps = scheduler.timesteps[start:].tolist()  # note: one copy to the host, not one int(t) per step
    numbers = [scheduler.step_coefficients(t) for t in host_timesteps]
    made_for = (tuple(x.shape), x.dtype, x.device, start, len(host_timesteps), keep_variance, id(cuda),
                repr(sorted(scheduler.config.items())), tuple(p.data_ptr() for p in unet.parameters()))
    kept = _CHAINS.get(unet) if capture else None
    if kept is not None and kept[0] == made_for:
        chain = kept[1]
    else:
        chain = _Chain(unet, scheduler, x, keys, start, numbers, keep_variance, capture, cuda)
        if capture:
            _CHAINS[unet] = (made_for, chain)
    replayed_chain.last = chain.replayed  # what the last chain did (captured? checked?), for tests and benchmarks
    return chain.run(x, keys, numbers, host_timesteps, progress)


replayed_chain.last = None
