"""Counter-based Gaussian noise: image k's noise is a function of (its seed, the chain's step, the pixel) and of
nothing else: not the batch, the batch position, the process count or the device.

A torch.Generator per image (diffusers' way to make image k independent of its batch) costs one `randn` launch per
image per step, and a CPU generator and a CUDA one give different numbers for the same seed. Here the numbers come
from Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"), a counter-based generator:
block j of an image is the 10-round Philox bijection of the counter (j, stream, step, 0) under the key (its seed),
computed for the whole batch at once with int64 tensor operations, so the same integers come out on any device.

Stages:
1. Philox4x32-10 on uint32 words held in int64 (32x32-bit products split into 16-bit halves: no int64 overflow).
2. Uniforms from the words: u1 = (a + 1) / 2^32 in (0, 1], u2 = b / 2^32 in [0, 1).
3. Box-Muller in float64: (sqrt(-2 ln u1) cos 2πu2, sqrt(-2 ln u1) sin 2πu2), rounded to the dtype. The integers are
   identical everywhere; the float64 transcendentals of two devices may differ in the last bits, which rounding to
   float32 removes (a difference survives only where a float64 result lies within ~1e-16 of a float32 rounding
   boundary).

The file depends on torch alone: it is part of the pipeline code.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Tuple, Union

import torch

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key schedule's increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

# how images drawn with `seeds=` get their noise: recorded with what they made (sampling.json, figures.json), so that
# images of another generator are never mixed with these
NOISE = "counter-based: Philox4x32-10 keyed by the image's seed, Box-Muller in float64"

# what a draw is for: the counter's second word, so that x_T and the noise of the reverse steps never share numbers
STREAMS = {"initial": 0, "step": 1, "bound": 2}  # bound: the x_t of the variational bound's term t (ddpm-nll)


def _mulhilo(multiplier: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of multiplier * x for uint32 values in int64: x is split into 16-bit halves so
    that every product stays below 2^48 (int64 would overflow on the full 64-bit product)."""
    low_part = (x & 0xFFFF) * multiplier  # < 2^48
    high_part = (x >> 16) * multiplier  # < 2^48
    middle = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    return (high_part >> 16) + (middle >> 32), middle & MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """1. Philox4x32-10: four uint32 counter words and two key words (int64 tensors that broadcast) to four uint32
    words (int64). Random123's known-answer vectors are its test."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(PHILOX_ROUNDS):
        if round_:
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M[0], c0)
        hi1, lo1 = _mulhilo(PHILOX_M[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


class SeedKeys(NamedTuple):
    """The Philox keys of a batch's seeds on a device: the low and high 32 bits of each seed, int64 [N, 1]."""

    low: torch.Tensor
    high: torch.Tensor


def seed_keys(seeds: Union[Sequence[int], torch.Tensor], device: Union[str, torch.device, None] = None) -> SeedKeys:
    """The keys of `seeds` (integers in [0, 2^64)) on `device`, made once per chain: building them copies from the host,
    which on a GPU would wait for the device at every step."""
    seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
    if any(not 0 <= s < 2**64 for s in seeds):
        raise ValueError("Seeds must be integers in [0, 2^64).")
    device = torch.device(device) if device is not None else torch.device("cpu")
    return SeedKeys(torch.tensor([s & MASK32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(1),
                    torch.tensor([s >> 32 for s in seeds], dtype=torch.int64, device=device).unsqueeze(1))


def seeded_normal(
    seeds: Union[Sequence[int], torch.Tensor, SeedKeys],
    shape: Sequence[int],
    step: Union[int, torch.Tensor] = 0,
    stream: str = "initial",
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise of shape (len(seeds), *shape): row k from seed seeds[k] alone, at chain step `step`, for
    the purpose `stream` (STREAMS). Seeds are integers in [0, 2^64), or their `seed_keys` (then on their device)."""
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r} is not one of {', '.join(STREAMS)}.")
    if not isinstance(step, torch.Tensor) and not 0 <= step <= MASK32:  # a 0-d tensor: a CUDA graph's step counter
        raise ValueError(f"step={step} must be in [0, 2^32).")
    key_low, key_high = seeds if isinstance(seeds, SeedKeys) else seed_keys(seeds, device)
    device = key_low.device
    per_image = math.prod(shape)
    blocks = -(-per_image // 4)  # each Philox call gives four words: four normals
    block = torch.arange(blocks, dtype=torch.int64, device=device).unsqueeze(0)
    at_step = block * 0 + step if isinstance(step, torch.Tensor) else torch.full_like(block, step)
    words = philox4x32((block, torch.full_like(block, STREAMS[stream]), at_step,
                        torch.zeros_like(block)), (key_low, key_high))
    # 2. uniforms: u1 in (0, 1] (its log is finite), u2 in [0, 1)
    scale = 2.0**-32
    u1 = [(w.to(torch.float64) + 1.0) * scale for w in words[0::2]]
    u2 = [w.to(torch.float64) * scale for w in words[1::2]]
    # 3. Box-Muller, in float64
    normals = []
    for a, b in zip(u1, u2):
        radius, angle = torch.sqrt(-2.0 * torch.log(a)), (2.0 * math.pi) * b
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    flat = torch.stack(normals, dim=-1).reshape(len(key_low), blocks * 4)[:, :per_image]
    return flat.reshape(len(key_low), *shape).to(dtype)
