"""The paper's pictures of a pipeline: progressive generation (Ho et al. 2020, Fig. 6), the reverse chain as an
animation, the forward process q(x_t | x_0) on real images, and interpolation in the diffused space (Fig. 8, 9).

The sampler-aware figures watch the pipeline's own reverse chain through the `callback` of
`pipelines.pipeline_ddpm.denoise`, so they hold for any scheduler the pipeline has (ours, DDIM, DPM-Solver) and the
last frame is exactly what the pipeline returns for the same seed. Seed s is drawn as `ddpm-sample` draws image s
(a generator seeded by s). Every file is written atomically; figures.json beside them records how each was made.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ddpm_hf.choices import ANIMATION_FORMATS, FIGURES
from ddpm_hf.diffusion.pixels import to_model_range
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import atomic_save_image, atomic_write_bytes, atomic_write_json
from ddpm_hf.outputs.plots import image_grid, labelled_grid
from ddpm_hf.outputs.run_folder import DENOISING_STEM, FIGURES_RECORD, FORWARD, FORWARD_STEM, INTERPOLATION, PROGRESSIVE
from ddpm_hf.saved.weights import state_dict_sha256
from ddpm_hf.pipelines.guidance import GuidedNetwork, null_label, num_classes
from ddpm_hf.pipelines.pipeline_ddpm import denoise, epsilon_from_clipped_x0, to_output
from ddpm_hf.sampling.samplers import cast_network

FRAME_MS = 80  # each animation frame; the last one is held for HOLD_MS
HOLD_MS = 2000
PROGRESSIVE_ROWS = ("x_t", "x_0 pred.")  # the two rows progressive.png draws per seed (Ho et al. 2020, Fig. 6)


@dataclass
class Chain:
    """A reverse chain as `denoise` went through it, at the kept steps: `indices[j]` is the kept step's index in
    the chain of `num_steps`, `timesteps[j]` its timestep, `samples[j]` the sample after it (x_{t-1}; `start` is x_T)
    and `predictions[j]` the x̂_0 the model predicted there, in [-1, 1]. `output` is the pipeline's result."""

    start: torch.Tensor
    num_steps: int
    indices: List[int]
    timesteps: List[int]
    samples: List[torch.Tensor]
    predictions: List[torch.Tensor]
    output: torch.Tensor

    def pick(self, count: int) -> List[int]:
        """Positions j of `count` kept steps spread evenly over the chain, the last step among them."""
        wanted = set(kept_steps(self.num_steps, count))
        return [j for j, index in enumerate(self.indices) if index in wanted]


def predicted_x0(scheduler, step) -> torch.Tensor:
    """x̂_0 at a step: the scheduler's own when its step returns one (DDPM, DDIM), else from the model output
    through the prediction type (`ddpm_hf.diffusion.scheduler.parameterization`, Eq. 15 for ε), clipped to [-1, 1]."""
    if step.pred_original_sample is not None:
        return step.pred_original_sample.clamp(-1, 1)
    from ddpm_hf.diffusion.scheduler import parameterization

    alpha_bar = float(scheduler.alphas_cumprod[int(step.timestep)])
    output = step.model_output[:, : step.sample.shape[1]]
    x0 = parameterization(scheduler.config.prediction_type).x0(output, step.sample, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5)
    return x0.clamp(-1, 1)


def kept_steps(num_steps: int, count: int) -> List[int]:
    """`count` step indices of 0..num_steps-1, evenly spread, the last one always among them."""
    return sorted({int(round(i)) for i in np.linspace(num_steps - 1, 0, max(1, min(count, num_steps)))})


def record_chain(pipe, seeds: Sequence[int], num_inference_steps: int, counts: Sequence[int],
                 eta: Optional[float] = None, class_labels: Optional[Sequence[int]] = None,
                 guidance_scale: float = 1.0) -> Chain:
    """Draw one image per seed (of a class-conditional pipeline: per seed and class label) with the pipeline, keeping
    the steps that `Chain.pick(count)` gives for each count."""
    steps = set().union(*(kept_steps(num_inference_steps, count) for count in counts))
    recorded: Dict[str, list] = {"start": [], "indices": [], "timesteps": [], "samples": [], "predictions": []}

    def callback(step) -> None:
        if step.index == 0:
            recorded["start"].append(step.sample.float().cpu())
        if step.index in steps:
            recorded["indices"].append(step.index)
            recorded["timesteps"].append(int(step.timestep))
            recorded["samples"].append(step.prev_sample.float().cpu())
            recorded["predictions"].append(predicted_x0(pipe.scheduler, step).float().cpu())

    labels = {} if class_labels is None else {"class_labels": list(class_labels), "guidance_scale": guidance_scale}
    output = pipe(batch_size=len(seeds), seeds=[int(s) for s in seeds], num_inference_steps=num_inference_steps, eta=eta,
                  output_type="pt", callback=callback, **labels).images
    return Chain(recorded["start"][0], len(pipe.scheduler.timesteps), recorded["indices"], recorded["timesteps"],
                 recorded["samples"], recorded["predictions"], output.cpu())


def to01(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] to [0, 1], as the pipeline's output."""
    return to_output(x, "pt")


def rows_grid(rows: Sequence[torch.Tensor], min_size: int = 64):
    """A PIL grid with one row per tensor [K, C, H, W] in [0, 1] (all rows K images)."""
    stacked = torch.cat([r.cpu().float() for r in rows])
    return image_grid(stacked, cols=rows[0].shape[0], min_size=min_size)


def progressive_figure(chain: Chain, columns: int, count: Optional[int] = None):
    """Fig. 6: for each of the first `count` images, a row of x_t and under it a row of the predicted x̂_0, at
    `columns` of the kept steps (evenly spread, the last one included: its x_t is the pipeline's output)."""
    picks = chain.pick(columns)
    rows = []
    for n in range(min(count or chain.output.shape[0], chain.output.shape[0])):
        rows.append(torch.stack([to01(chain.samples[j][n]) for j in picks]))
        rows.append(torch.stack([to01(chain.predictions[j][n]) for j in picks]))
    grid = rows_grid(rows)
    shown = [chain.timesteps[j] for j in picks]
    # a column is named by its step's timestep, as the record's "timesteps" names it
    cell = (grid.width // len(picks), grid.height // len(rows))
    return labelled_grid(grid, PROGRESSIVE_ROWS * (len(rows) // 2), [f"t={t}" for t in shown], cell), shown


def chain_frames(chain: Chain, frames: int, min_size: int = 64) -> tuple:
    """The denoising animation's frames: the grid of x_T, then the grid after `frames` evenly spread steps; and
    those steps' timesteps."""
    picks = chain.pick(frames)
    grids = [image_grid(to01(x), min_size=min_size) for x in [chain.start, *(chain.samples[j] for j in picks)]]
    return grids, [chain.timesteps[j] for j in picks]


def save_animation(frames: list, path_stem: Path, fmt: str = "auto", frame_ms: int = FRAME_MS,
                   hold_ms: int = HOLD_MS) -> Path:
    """An animation of PIL frames at `path_stem`.gif or .webp (`auto`: the smaller of the two), looping, the last frame
    held `hold_ms`; consecutive identical frames become one longer frame. Written atomically; the other format's
    file, left by an earlier run, is removed so that the folder holds one animation."""
    if fmt not in ANIMATION_FORMATS:
        raise UsageError(f"--animation_format {fmt!r} is not one of {', '.join(ANIMATION_FORMATS)}.")
    kept, durations = [], []
    for frame in frames:
        if kept and np.array_equal(np.asarray(kept[-1]), np.asarray(frame)):
            durations[-1] += frame_ms
        else:
            kept.append(frame)
            durations.append(frame_ms)
    durations[-1] = max(durations[-1], hold_ms)
    encoded = {}
    for name in (("gif", "webp") if fmt == "auto" else (fmt,)):
        buffer = io.BytesIO()
        options = {"lossless": True} if name == "webp" else {"disposal": 1}
        kept[0].save(buffer, format=name.upper(), save_all=True, append_images=kept[1:], duration=durations, loop=0,
                     **options)
        encoded[name] = buffer.getvalue()
    best = min(encoded, key=lambda name: len(encoded[name]))
    path = Path(path_stem).with_suffix("." + best)
    atomic_write_bytes(path, encoded[best])
    for other in ANIMATION_FORMATS[1:]:
        if other != best:
            Path(path_stem).with_suffix("." + other).unlink(missing_ok=True)
    return path


def forward_process(scheduler, images: torch.Tensor, timesteps: Sequence[int], seed: int = 0) -> List[torch.Tensor]:
    """q(x_t | x_0) (Eq. 4) of model-range `images` at each of `timesteps`, with one noise ε per image shared by all t
    (so that the frames show one image being destroyed): a list of [N, C, H, W] in [-1, 1]."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return [scheduler.add_noise(images.float(), noise, torch.full((images.shape[0],), int(t), dtype=torch.long))
            for t in timesteps]


def forward_figures(scheduler, images: torch.Tensor, folder: Path, columns: int = 10, frames: int = 50, seed: int = 0,
                    fmt: str = "auto", about: Optional[dict] = None) -> Dict[str, dict]:
    """forward.png (a row per image: x_0, then x_t at `columns - 1` evenly spread t up to T - 1) and the forward
    animation (the grid of x_t from x_0 to t = T - 1 in `frames` steps); returns their figures.json entries."""
    T = scheduler.config.num_train_timesteps
    strip_t = [int(round(t)) for t in np.linspace(0, T - 1, max(2, columns))[1:]]
    frame_t = [int(round(t)) for t in np.linspace(0, T - 1, max(2, frames))]
    strip = [images.float()] + forward_process(scheduler, images, strip_t, seed)
    rows = [torch.stack([to01(column[n]) for column in strip]) for n in range(images.shape[0])]
    figure = save_png(rows_grid(rows), Path(folder) / FORWARD)
    animation = save_animation([image_grid(to01(images.float()), min_size=64)] +
                               [image_grid(to01(x), min_size=64) for x in forward_process(scheduler, images, frame_t, seed)],
                               Path(folder) / FORWARD_STEM, fmt)
    common = {"noise_seed": seed, "num_train_timesteps": T, **(about or {})}
    return {figure.name: {**common, "figure": "forward process q(x_t | x_0): per image x_0, then x_t", "timesteps": strip_t},
            animation.name: {**common, "figure": "forward process animation: x_0, then x_t", "frames": 1 + len(frame_t),
                             "timesteps": frame_t}}


def interpolation_figure(rows: List[dict], image_a: torch.Tensor, image_b: torch.Tensor):
    """interpolate.png: per depth a row of the source image, the decoded mixes, and the other source image."""
    return rows_grid([torch.cat([to01(image_a)[None], to01(row["images"]), to01(image_b)[None]]) for row in rows])


def start_index(timesteps: torch.Tensor, t: int) -> int:
    """The first step of a chain whose timestep is at most t: the reverse chain from x_t starts there
    (len(timesteps) when t is below every step: nothing to denoise)."""
    below = (timesteps <= t).nonzero()
    return int(below[0]) if len(below) else len(timesteps)


def diffuse(scheduler, images: torch.Tensor, depth: float, num_inference_steps: int, seed: int = 0) -> tuple:
    """Model-range `images` [N, C, H, W] diffused by q (Eq. 4) to the first timestep t <= λ·(T - 1) of the
    `num_inference_steps` chain, all with the same ε (seeded): (x_t, the chain's start index, t). λ = 0, or a t
    below the whole chain, leaves the images as they are (t None)."""
    scheduler.set_timesteps(num_inference_steps)
    chain = scheduler.timesteps.cpu()
    begin = start_index(chain, int(round(depth * (scheduler.config.num_train_timesteps - 1))))
    if depth == 0 or begin == len(chain):
        return images.float(), len(chain), None
    t = int(chain[begin])
    noise = torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    timesteps = torch.full((images.shape[0],), t, dtype=torch.long)
    return scheduler.add_noise(images.float(), noise.expand_as(images).contiguous(), timesteps), begin, t


def decode(pipe, latents: torch.Tensor, begin: int, num_inference_steps: int, seed: int = 0,
           eta: Optional[float] = None, network=None) -> torch.Tensor:
    """The pipeline's reverse chain from step `begin` (x_t = `latents`) to x_0, each image's noise from its own
    generator seeded `seed` (the same noise for every image, as Fig. 8 fixes it); in [-1, 1]. `network`: what
    predicts the noise, where not the pipeline's UNet itself (a class-conditional one bound to labels)."""
    device = pipe._execution_device
    x = latents.to(device, torch.float32)  # the chain in float32, as the pipeline runs it
    if begin < num_inference_steps:
        generators = [torch.Generator(device).manual_seed(seed) for _ in range(x.shape[0])]
        with torch.no_grad():
            x = denoise(pipe.unet if network is None else network, pipe.scheduler, x, num_inference_steps, generators,
                        eta, start=begin)
    return x.float().cpu().clamp(-1, 1)


def interpolate(pipe, image_a: torch.Tensor, image_b: torch.Tensor, depths: Sequence[float], weights: Sequence[float],
                num_inference_steps: int, seed: int = 0, eta: Optional[float] = None, network=None) -> List[dict]:
    """Fig. 8 and 9: two model-range images [C, H, W] diffused to depth λ (`diffuse`: the same ε), their latents
    mixed as (1 - w)·x_t + w·x'_t for each w of `weights`, each mix decoded by the reverse chain from t (`decode`).
    One row per λ of `depths`: {"depth", "t", "images" [len(weights), C, H, W] in [-1, 1]}. λ = 0 mixes the
    images themselves; the columns at w = 0 and w = 1 are the reconstructions of the two images."""
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, 1, 1, 1)
    rows = []
    for depth in depths:
        latents, begin, t = diffuse(pipe.scheduler, torch.stack([image_a, image_b]), depth, num_inference_steps, seed)
        mixed = (1 - w) * latents[0] + w * latents[1]
        rows.append({"depth": float(depth), "t": t,
                     "images": decode(pipe, mixed, begin, num_inference_steps, seed, eta, network)})
    return rows


def reconstruct(pipe, image: torch.Tensor, depth: float, num_inference_steps: int, seed: int = 0,
                eta: Optional[float] = None) -> torch.Tensor:
    """One model-range image [C, H, W] diffused to depth λ and brought back by the reverse chain."""
    latents, begin, _ = diffuse(pipe.scheduler, image[None], depth, num_inference_steps, seed)
    return decode(pipe, latents, begin, num_inference_steps, seed, eta)[0]


def record_figures(folder: Path, entries: Dict[str, dict]) -> None:
    """figures.json: how each figure in `folder` was made; entries of files no longer there are dropped."""
    path = Path(folder) / FIGURES_RECORD
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update(entries)
    atomic_write_json(path, {name: entry for name, entry in sorted(known.items()) if (Path(folder) / name).is_file()})


def save_png(image, path: Path) -> Path:
    atomic_save_image(image, path)
    return path


def chain_figures(pipe, folder: Path, seeds: Sequence[int], num_inference_steps: int, which=("progressive", "denoise"),
                  frames: int = 50, columns: int = 10, progressive_seeds: int = 4, fmt: str = "auto",
                  eta: Optional[float] = None, about: Optional[dict] = None,
                  class_labels: Optional[Sequence[int]] = None, guidance_scale: float = 1.0) -> Dict[str, dict]:
    """progressive.png (the first `progressive_seeds` seeds) and the denoising animation (all `seeds`, with their
    `class_labels` for a class-conditional pipeline), as `which` asks, from one recorded chain; returns their
    figures.json entries."""
    chain = record_chain(pipe, seeds, num_inference_steps, [frames, columns], eta, class_labels, guidance_scale)
    common = {"scheduler": type(pipe.scheduler).__name__, "num_inference_steps": num_inference_steps, "eta": eta,
              **(about or {}), **({} if class_labels is None else {"guidance_scale": guidance_scale}),
              **({"epsilon_from_clipped_x0": True} if epsilon_from_clipped_x0(pipe.scheduler) else {})}
    entries = {}
    if "progressive" in which:
        figure, shown = progressive_figure(chain, columns, progressive_seeds)
        path = save_png(figure, Path(folder) / PROGRESSIVE)
        entries[path.name] = {**common, "figure": "progressive generation (Ho et al. 2020, Fig. 6): per seed a row of "
                              "x_t and a row of the predicted x_0", "seeds": list(seeds[:progressive_seeds]),
                              "rows": list(PROGRESSIVE_ROWS) * min(progressive_seeds, len(seeds)), "timesteps": shown, **_labels_entry(class_labels, progressive_seeds)}
    if "denoise" in which:
        grids, shown = chain_frames(chain, frames)
        path = save_animation(grids, Path(folder) / DENOISING_STEM, fmt)
        entries[path.name] = {**common, "figure": "denoising: the grid of x_t along the reverse chain, from x_T",
                              "seeds": list(seeds), "frames": len(grids), "timesteps": shown,
                              **_labels_entry(class_labels, len(seeds))}
    return entries


def _labels_entry(class_labels: Optional[Sequence[int]], count: int) -> dict:
    """The class labels of a figure's first `count` seeds, for its figures.json entry (none: an unconditional one)."""
    return {} if class_labels is None else {"class_labels": [int(k) for k in class_labels[:count]]}


def visualize(pipe, folder, *, figures: Sequence[str], seeds: Sequence[int], num_inference_steps: int,
              eta: Optional[float] = None, images: Optional[torch.Tensor] = None, depths: Sequence[float] = (0.0, 0.5),
              weights: Sequence[float] = (0.0, 0.5, 1.0), columns: int = 10, frames: int = 50, seed: int = 0,
              fmt: str = "auto", about: Optional[dict] = None, progressive_seeds: int = 4,
              dtype: str = "fp32", class_labels: Optional[Sequence[int]] = None,
              guidance_scale: float = 1.0) -> Dict[str, dict]:
    """Write `figures` (of FIGURES) into `folder` and record them in figures.json; `images` (uint8 [N, C, H, W], at
    least two for `interpolate`) are the real images of `forward` and `interpolate`. The network runs in `dtype`
    (SAMPLING_DTYPES). A class-conditional pipeline draws seed i of class `class_labels`[i] with guidance
    `guidance_scale` (progressive and denoise); its interpolation is decoded by its unconditional model (the "no class"
    label), as Fig. 8's model is unconditional: a mix of two images has no one class. Returns the new entries."""
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise UsageError(f"figure {unknown[0]!r} is not one of {', '.join(FIGURES)}.")
    if any(f in ("forward", "interpolate") for f in figures) and images is None:
        raise UsageError("the forward and interpolate figures need real images: pass --dataset (a dataset or a folder).")
    if "interpolate" in figures and images.shape[0] < 2:
        raise UsageError("interpolate needs two images; pass --num_images 2 or more.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record_figures(folder, {})  # before the first figure: a folder holding figures.json is ours (see ddpm-visualize)
    about = {"weights_sha256": state_dict_sha256(pipe.unet), **(about or {}), "dtype": dtype}
    cast_network(pipe.unet, dtype)  # after the hash, which names the weights as saved
    entries = {}
    sampled = [f for f in figures if f in ("progressive", "denoise")]
    if sampled:
        entries.update(chain_figures(pipe, folder, seeds, num_inference_steps, sampled, frames, columns, progressive_seeds,
                                     fmt, eta, about, class_labels, guidance_scale))
    real = to_model_range(images, random_flip=False) if images is not None else None
    if "forward" in figures:
        entries.update(forward_figures(pipe.scheduler, real, folder, columns, frames, seed, fmt, about))
    if "interpolate" in figures:
        w = [float(x) for x in np.linspace(0, 1, max(2, columns - 2))]
        network, decoded_by = None, {}
        if num_classes(pipe.unet) is not None:
            network = GuidedNetwork(pipe.unet, torch.full((len(w),), null_label(pipe.unet)), 0.0)
            decoded_by = {"decoded_by": "the unconditional model: the class label \"no class\" (guidance scale 0)"}
        rows = interpolate(pipe, real[0], real[1], depths, w, num_inference_steps, seed, eta, network)
        path = save_png(interpolation_figure(rows, real[0], real[1]), folder / INTERPOLATION)
        entries[path.name] = {**about, "figure": "interpolation in the diffused space (Ho et al. 2020, Fig. 8, 9): per "
                              "depth a row of image A, the decoded mixes (1 - w) x_t + w x'_t, image B",
                              "depths": [float(d) for d in depths], "timesteps": [row["t"] for row in rows],
                              "weights": w, "noise_seed": seed, "scheduler": type(pipe.scheduler).__name__,
                              "num_inference_steps": num_inference_steps, "eta": eta, **decoded_by}
    record_figures(folder, entries)
    return entries
