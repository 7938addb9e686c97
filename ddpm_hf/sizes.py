"""Image sizes: `--resolution 32` (square) or `32x64` (H x W), and the UNet's `sample_size` they become (an int for a
square, [H, W] otherwise, as diffusers' UNet2DModel and DDPMPipeline take it). No heavy imports: flags parse with it.

A resolution is held in one canonical form, `canonical`: an int for a square (so that every square run's files read as
before), the text "HxW" otherwise.
"""

from __future__ import annotations

import argparse

import re
from typing import Optional, Sequence, Tuple, Union

Resolution = Union[int, str]
_HXW = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
# a pixel-space UNet's activations at this side are tens of GB a batch: a larger side is a typo (99999x99999)
MAX_SIDE = 4096


def size_of(resolution) -> Tuple[int, int]:
    """(H, W) of a resolution in any form: 32, "32", "32x64", [32, 64] or (32, 64)."""
    if isinstance(resolution, bool):
        raise ValueError(f"{resolution!r} is not an image size")
    if isinstance(resolution, int):
        return resolution, resolution
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        return int(resolution[0]), int(resolution[1])
    if isinstance(resolution, str):
        if resolution.strip().isdigit():
            return int(resolution), int(resolution)
        match = _HXW.match(resolution)
        if match:
            return int(match.group(1)), int(match.group(2))
    raise ValueError(f"{resolution!r} is not an image size: give N (square) or HxW, e.g. 32x64")


def canonical(resolution) -> Resolution:
    """The one form a resolution is kept in: an int for a square, "HxW" otherwise."""
    h, w = size_of(resolution)
    return h if h == w else f"{h}x{w}"


def sample_size(resolution) -> Union[int, list]:
    """The UNet config's `sample_size`: an int for a square, [H, W] otherwise."""
    h, w = size_of(resolution)
    return h if h == w else [h, w]


class NotASize(argparse.ArgumentTypeError, ValueError):
    """A size that does not read: argparse shows its line as it is, and a caller outside argparse catches a
    ValueError."""


def resolution(text: str) -> Resolution:
    """argparse's type for --resolution: the size, or the line saying what is wrong with it."""
    try:
        value = canonical(text)
    except ValueError as e:
        raise NotASize(str(e)) from None
    if min(size_of(value)) < 1:
        raise NotASize(f"{text!r}: each side must be at least 1 (e.g. 32, or 32x64: 32 high, 64 wide)")
    return value


def size_problem(resolution, factor: int, flag: str = "--resolution", where: str = "") -> Optional[str]:
    """What is wrong with an image size for a UNet that downsamples by `factor` (both sides must be multiples of it),
    naming the valid sizes nearest to it; None where it fits."""
    h, w = size_of(resolution)
    if min(h, w) < 1:
        return f"{flag} {canonical(resolution)}: each side must be at least 1"
    if max(h, w) > MAX_SIDE:
        return (f"{flag} {canonical(resolution)}: a side of more than {MAX_SIDE} pixels is beyond what a pixel-space "
                f"DDPM trains or samples (the paper's largest is 256); give sides up to {MAX_SIDE}")
    if h % factor == 0 and w % factor == 0:
        return None

    def near(n: int) -> Sequence[int]:
        low = max(factor, n // factor * factor)
        return sorted({low, low + factor} if n % factor else {n})

    options = near(h) if h == w else [canonical((a, b)) for a in near(h) for b in near(w)]
    return (f"{flag} {canonical(resolution)}{where}: the UNet downsamples by {factor}, so each side must be a multiple of "
            f"{factor}; the valid sizes nearest to it are {', '.join(map(str, options))}")
