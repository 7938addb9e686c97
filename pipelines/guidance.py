"""Class labels and classifier-free guidance (Ho & Salimans 2021) as a network: `GuidedNetwork(unet, labels, w)` is
called as the UNet is, `net(x_t, t).sample`, so that the reverse chain, its CUDA graph and the figures run it
unchanged.

A class-conditional UNet2DModel of ours has `num_class_embeds` = K + 1: classes 0..K-1 and, last, "no class", the index
that training's label dropout puts in (`null_label`). With guidance scale w the network's output is

    ε̂(x_t, c) = ε(x_t, ∅) + w · (ε(x_t, c) − ε(x_t, ∅))        (Ho & Salimans 2021, Eq. 6, with w = 1 + their w)

so w = 0 is the unconditional model, w = 1 the conditional one, w > 1 guided. For w ∉ {0, 1} both halves come from one
forward pass of the batch doubled (the conditional half first); w = 0 and w = 1 need one half only, and run it alone.
The same combination is taken of x̂_0 or v where the network predicts those.

With a learned variance (2C output channels) only the mean's channels are guided; the variance channels are the
conditional half's, as GLIDE (Nichol et al. 2022) and DiT (Peebles & Xie 2023) sample: the variance is an
interpolation between β̃_t and β_t, and extrapolating it with w > 1 would leave that range. At w = 0 they are the
unconditional half's (the unconditional model, exactly).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput


def num_classes(unet) -> Optional[int]:
    """K, the classes of a class-conditional UNet of ours (its class embedding holds K + 1 rows, the last "no class");
    None for an unconditional UNet."""
    rows = getattr(unet.config, "num_class_embeds", None)
    return None if rows is None else rows - 1


def null_label(unet) -> int:
    """The class embedding's row for "no class": the last."""
    return unet.config.num_class_embeds - 1


def check_labels(unet, class_labels, batch_size: int, guidance_scale: float) -> Optional[torch.Tensor]:
    """The labels as an int64 tensor of `batch_size` (one label for all, or one per image), or None for an
    unconditional UNet; a ValueError naming what is wrong otherwise."""
    classes = num_classes(unet)
    if classes is None:
        if class_labels is not None or guidance_scale != 1.0:
            raise ValueError("This pipeline's UNet is unconditional (no class embedding): it takes no class_labels or "
                             "guidance_scale.")
        return None
    if class_labels is None:
        raise ValueError(f"This pipeline's UNet is class-conditional ({classes} classes): pass class_labels (one label, "
                         "or one per image) and optionally guidance_scale (0 unconditional, 1 conditional, >1 guided).")
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be integers 0..{classes - 1}, not {labels.dtype}.")
    labels = labels.to(torch.int64)
    if labels.numel() == 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"Got {labels.numel()} class_labels for {batch_size} images; pass one label, or one per image.")
    outside = labels[(labels < 0) | (labels >= classes)]
    if outside.numel():
        raise ValueError(f"class label {int(outside[0])} is outside this pipeline's classes 0..{classes - 1}.")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale={guidance_scale} must be at least 0 (0 unconditional, 1 conditional).")
    return labels.clone()


class GuidedNetwork(torch.nn.Module):
    """A class-conditional UNet bound to one label per image and a guidance scale, called as an unconditional one:
    `net(x_t, t).sample` is ε̂ of the module docstring (or x̂_0, or v)."""

    def __init__(self, unet, labels: torch.Tensor, guidance_scale: float = 1.0):
        super().__init__()
        self.unet, self.guidance_scale = unet, float(guidance_scale)
        # held in the module: a captured chain reads this tensor at every replay
        self.register_buffer("labels", labels.to(unet.device), persistent=False)
        self.register_buffer("null", torch.full_like(self.labels, null_label(unet)), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def config(self):
        return self.unet.config

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        w, n = self.guidance_scale, sample.shape[0]
        if w == 0.0:
            out = self.unet(sample, timestep, class_labels=self.null).sample
        elif w == 1.0:
            out = self.unet(sample, timestep, class_labels=self.labels).sample
        else:
            both = self.unet(torch.cat([sample, sample]), _doubled(timestep, n),
                             class_labels=torch.cat([self.labels, self.null])).sample
            conditional, unconditional = both[:n], both[n:]
            c = sample.shape[1]
            guided = unconditional[:, :c] + w * (conditional[:, :c] - unconditional[:, :c])  # Eq. 6
            out = torch.cat([guided, conditional[:, c:]], dim=1)  # a learned variance: the conditional half's
        return UNet2DOutput(sample=out) if return_dict else (out,)


def _doubled(timestep, n: int):
    """The timestep(s) of the doubled batch: one for all stays one, one per image is repeated."""
    if isinstance(timestep, torch.Tensor) and timestep.ndim == 1 and timestep.shape[0] == n:
        return torch.cat([timestep, timestep])
    return timestep

