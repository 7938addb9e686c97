"""The pixel convention: images as the model sees them, in [-1, 1] (Ho et al. 2020, Sec. 3.3: pixels k = 0..255 at
-1 + 2k/255), flipped where training asks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch


if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


def to_model_range(batch: torch.Tensor, random_flip: bool = False, generator: Optional[torch.Generator] = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [B, C, H, W] -> `dtype` in [-1, 1] (pixel k at -1 + 2k/255), with `random_flip` each image flipped
    left-right with probability 1/2."""
    x = batch.to(dtype).div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else "cpu") < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x
