"""Pictures of numbers and of image batches: the sample grid, the training loss curve, the bound's terms per t.
Each is written atomically (`files`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ddpm_hf.outputs.files import atomic_save_figure


def image_grid(images: torch.Tensor, pad: int = 1, cols: Optional[int] = None, min_size: int = 256):
    """A PIL grid of images in [0, 1] (NCHW), near-square or `cols` wide, each framed by `pad` dark pixels; small
    images are enlarged (nearest neighbour) to at least ~`min_size` px each."""
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    n = images.shape[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pil = DiffusionPipeline.numpy_to_pil(images.permute(0, 2, 3, 1).float().cpu().numpy())
    pil += [pil[0].point(lambda _: 0)] * (rows * cols - n)
    pil = [ImageOps.expand(img, border=pad, fill=0) for img in pil]
    grid = make_image_grid(pil, rows=rows, cols=cols)
    scale = max(1, min_size // images.shape[-1])
    return grid.resize((grid.width * scale, grid.height * scale), resample=0) if scale > 1 else grid


# The margins a labelled grid adds: a column of row names on the left, a band of column names on top. Fixed (not
# measured from the text) so that a cell's place in the picture depends on the grid alone.
LABEL_LEFT, LABEL_TOP = 64, 18


def labelled_grid(grid, rows: Sequence[str], columns: Sequence[str], cell_size: Tuple[int, int]):
    """`grid` (a PIL image of len(rows) x len(columns) cells of `cell_size` = (width, height) px) with each row's name
    on its left and each column's name above it, dark on white; the grid itself starts at (LABEL_LEFT, LABEL_TOP)."""
    from PIL import Image, ImageDraw, ImageFont

    framed = Image.new("RGB", (LABEL_LEFT + grid.width, LABEL_TOP + grid.height), "white")
    framed.paste(grid.convert("RGB"), (LABEL_LEFT, LABEL_TOP))
    draw = ImageDraw.Draw(framed)
    font = ImageFont.load_default(size=11)
    width, height = cell_size
    for r, name in enumerate(rows):
        draw.text((LABEL_LEFT - 4, LABEL_TOP + r * height + height // 2), name, fill="black", font=font, anchor="rm")
    for c, name in enumerate(columns):
        draw.text((LABEL_LEFT + c * width + width // 2, LABEL_TOP // 2), name, fill="black", font=font, anchor="mm")
    return framed


def _axes():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7, 4), dpi=100)


def plot_loss_curve(history: List[dict], path: Path) -> None:
    """The training loss over steps, overall and by timestep quartile (log scale)."""
    fig, ax = _axes()
    steps = [h["step"] for h in history]
    for q in range(4):
        key = f"loss_t_q{q + 1}"
        if any(key in h for h in history):
            ax.plot(steps, [h.get(key, float("nan")) for h in history], lw=0.8, alpha=0.7, label=f"t in quartile {q + 1}")
    ax.plot(steps, [h["loss"] for h in history], color="black", lw=1.6, label="all t")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per-sample MSE)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Training loss")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_guidance(rows: list, mode: str, path: Path) -> None:
    """FID against Inception Score, one point per guidance scale (each row of ddpm-evaluate's report["guidance"]):
    the trade-off of Ho & Salimans 2021, Fig. 4."""
    fig, ax = _axes()
    points = [(row[f"inception_score_{mode}"]["mean"], row[f"fid_{mode}"], row["guidance_scale"]) for row in rows
              if f"inception_score_{mode}" in row]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", lw=1.2)
    for inception, fid, w in points:
        ax.annotate(f"w = {w:g}", (inception, fid), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"Inception Score ({mode})")
    ax.set_ylabel(f"FID ({mode})")
    ax.grid(True, alpha=0.3)
    ax.set_title("Classifier-free guidance: FID against IS over the guidance scale w", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_bound_terms(per_timestep: np.ndarray, path: Path, prior: float) -> None:
    """The mean bound term (bits/dim) at each training index t; t = 0 is the decoder; `prior` is the mean L_T."""
    fig, ax = _axes()
    ax.plot(np.arange(len(per_timestep)), per_timestep, lw=1.2)
    ax.set_xlabel("training index t (0: the decoder L_0)")
    ax.set_ylabel("bound term (bits/dim)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Terms of the bound per t: they sum to {per_timestep.sum():.4f} bits/dim; with L_T = {prior:.4f}, "
                 f"the bound is {per_timestep.sum() + prior:.4f}", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def plot_ema_sweep(rows: List[dict], metric: str, path: Path, fixed: Optional[dict] = None) -> None:
    """A metric (lower is better) against σ_rel for post-hoc EMA's sweep ({"sigma_rel", "value", "error"} rows), the
    best marked, and the run's fixed-decay EMA as a line where measured."""
    fig, ax = _axes()
    rows = sorted(rows, key=lambda r: r["sigma_rel"])
    x = [r["sigma_rel"] for r in rows]
    ax.errorbar(x, [r["value"] for r in rows], yerr=[r.get("error") or 0 for r in rows], marker="o", capsize=3,
                label="post-hoc EMA")
    best = min(rows, key=lambda r: r["value"])
    ax.scatter([best["sigma_rel"]], [best["value"]], s=160, facecolors="none", edgecolors="red", zorder=3,
               label=f"best: σ_rel {best['sigma_rel']:g}")
    if fixed is not None:
        ax.axhline(fixed["value"], color="gray", linestyle="--", label=fixed["label"])
    ax.set_xlabel("σ_rel (EMA length relative to training time)")
    ax.set_ylabel(metric)
    ax.set_title(f"Post-hoc EMA: {metric} against σ_rel (lower is better)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
