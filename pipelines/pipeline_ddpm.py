"""`DDPMPipeline`: unconditional image generation with a UNet and any diffusers scheduler.

This file is the pipeline code that also goes to the Hub: it needs only torch and diffusers, and `chain_graph.py`
and `counter_noise.py` beside it. With
`ddpm_hf` installed, loading swaps diffusers' `DDPMScheduler` for ours (same config, float64 math);
what it saves names only diffusers classes, so plain diffusers loads it too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from typing import Callable, List, NamedTuple, Optional, Sequence, Union

import diffusers
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from .chain_graph import chain_graph_refusal, network_output, replayed_chain
from .guidance import GuidedNetwork, check_labels

OUTPUT_TYPES = ("pil", "np", "pt")
# the reverse chain's x_t and the scheduler's arithmetic, whatever the network's dtype: a bf16 or fp16 UNet speeds up
# the network, while x_t accumulates 1000 small steps that half precision would round away (diffusers runs the chain
# in the UNet's dtype)
CHAIN_DTYPE = torch.float32
logger = diffusers.utils.logging.get_logger(__name__)
# as ddpm_hf.choices.LEARNED_VARIANCE_TYPES (a test checks): this file also runs on the Hub, without ddpm_hf
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# the entries of model_index.json that are settings of the pipeline, not its components ([library, class] pairs)
PIPELINE_SETTINGS = ("class_names",)


def uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether `scheduler.step` reads a model's variance channels: DDPM's scheduler with a learned variance type.
    Other samplers (DDIM, DPM-Solver, ...) are given the first C channels only."""
    variance_type = getattr(scheduler.config, "variance_type", None)
    return isinstance(scheduler, diffusers.DDPMScheduler) and variance_type in LEARNED_VARIANCE_TYPES


def _diffusers_equivalent(library: str, class_name: str) -> Optional[str]:
    """The diffusers class that `library.class_name` is a drop-in subclass of (same name), if any."""
    if library in (None, "diffusers") or class_name is None:
        return None
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None
    base = getattr(diffusers, class_name, None)
    if isinstance(base, type) and isinstance(cls, type) and issubclass(cls, base):
        return class_name
    return None


def our_scheduler_class() -> Optional[type]:
    """ddpm_hf's DDPMScheduler, or None only where ddpm_hf is not installed (this file running as Hub pipeline code).
    An installed ddpm_hf whose scheduler cannot be imported is an error here, never a quiet switch to diffusers'."""
    if importlib.util.find_spec("ddpm_hf") is None:
        return None
    from ddpm_hf.diffusion.scheduler import DDPMScheduler

    return DDPMScheduler


class DenoiseStep(NamedTuple):
    """One step of the reverse chain, as `denoise` gives it to a callback: the step's index in the scheduler's
    timesteps, its timestep t, the sample x_t it started from, the model output the scheduler was given, x_{t-1},
    and the scheduler's predicted x_0 when its step returns one (DDPM and DDIM do; DPM-Solver does not)."""

    index: int
    timestep: torch.Tensor
    sample: torch.Tensor
    model_output: torch.Tensor
    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor]


def takes_timesteps(scheduler) -> bool:
    """Whether `scheduler.set_timesteps` takes an explicit chain (ours, DPM-Solver, ddpm_hf's DDIM; diffusers' DDIM
    steps by one fixed stride)."""
    return "timesteps" in inspect.signature(scheduler.set_timesteps).parameters


def denoise(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: Union[torch.Generator, List[torch.Generator], None] = None,
    eta: Optional[float] = None,
    progress=lambda it: it,
    callback: Optional[Callable[["DenoiseStep"], None]] = None,
    start: int = 0,
    seeds: Optional[Sequence[int]] = None,
    cuda_graph: bool = True,
    timesteps: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """The reverse process: from x_T = `noise` (scaled by the scheduler's init_noise_sigma) down to x_0
    in `num_inference_steps` scheduler steps. Returns x_0 in the model's range ([-1, 1]). The chain (x_t and the
    scheduler's arithmetic) stays in `noise`'s dtype; a UNet in half precision gets its input in its own dtype. A UNet with a learned
    variance (2C output channels) gives all of them to a scheduler that uses the variance, the first C to others.

    `callback(DenoiseStep)` is called after each step (figures watch the chain through it). With `start` > 0 the
    chain begins at step `start` (timestep `scheduler.timesteps[start]`) and `noise` is that x_t itself.

    With `seeds` (one per image, instead of `generator`) the noise of step i of image k is counter-based:
    `seeded_normal([seeds[k]], ..., step=i, stream="step")`, the same on every device and in every batch.

    With `cuda_graph` (the default) a chain on a CUDA device with `seeds`, our DDPMScheduler and no callback is replayed
    as a CUDA graph (chain_graph.py): the same images, fewer launches.

    `timesteps` (descending) is the chain itself instead of `num_inference_steps` spaced ones, for a scheduler whose
    `set_timesteps` takes them (ours, DPM-Solver, ddpm_hf's DDIM; diffusers' DDIM steps by one fixed stride)."""
    if timesteps is None:
        scheduler.set_timesteps(num_inference_steps, device=noise.device)
    elif takes_timesteps(scheduler):
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=noise.device)
    else:
        raise ValueError(f"{type(scheduler).__name__} takes no explicit timesteps (it steps by one fixed stride); "
                         "sample them with ddpm_hf's DDPMScheduler or DDIMScheduler, or DPMSolverMultistepScheduler.")
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    extra = {}
    step_params = inspect.signature(scheduler.step).parameters
    step_noise = keys = None
    if seeds is not None:
        if generator is not None:
            raise ValueError("Pass seeds or generator, not both: with seeds, each image's noise comes from its seed.")
        if len(seeds) != noise.shape[0]:
            raise ValueError(f"Got {len(seeds)} seeds for {noise.shape[0]} images; pass one seed per image.")
        if "variance_noise" in step_params:
            from .counter_noise import seed_keys, seeded_normal

            keys = seed_keys(seeds, noise.device)  # once per chain, not once per step
            step_noise = lambda i: seeded_normal(keys, noise.shape[1:], i, "step", dtype=noise.dtype)  # noqa: E731
        elif "generator" in step_params:
            raise ValueError(f"{type(scheduler).__name__}.step draws its noise from a generator only; sample with "
                             "generator= instead of seeds=.")
    elif "generator" in step_params:
        extra["generator"] = generator
    if epsilon_from_clipped_x0(scheduler):
        # note: guidance amplifies ε while the step clips only x̂_0; a step that keeps the unclipped ε walks its
        # direction term away from its x̂_0 and draws scribbles at w = 3. ε re-derived from the clipped x̂_0 keeps
        # the two in agreement, as GLIDE and improved-diffusion always do (diffusers' default is False)
        extra["use_clipped_model_output"] = True
    if eta is not None:
        if "eta" not in step_params:
            raise ValueError(f"eta={eta} was given but {type(scheduler).__name__}.step takes no eta; use DDIMScheduler.")
        extra["eta"] = eta
    keep_variance = uses_learned_variance(scheduler)
    x = noise * scheduler.init_noise_sigma if start == 0 else noise
    if cuda_graph and chain_graph_refusal(scheduler, x, keys, callback) is None:
        return replayed_chain(unet, scheduler, x, keys, start, progress, keep_variance=keep_variance)
    for i, t in enumerate(progress(scheduler.timesteps[start:]), start):
        # 1. predict ε (or x_0, or v): the network in its own dtype (bf16, fp16, ...), the chain in x's
        model_output = network_output(unet, scheduler, x, t, keep_variance)
        if step_noise is not None:
            extra["variance_noise"] = step_noise(i)
        out = scheduler.step(model_output, t, x, **extra)  # 2. x_t -> x_{t-1}
        if callback is not None:
            callback(DenoiseStep(i, t, x, model_output, out.prev_sample, getattr(out, "pred_original_sample", None)))
        x = out.prev_sample
    return x


def sdedit_steps(strength: float, num_inference_steps: int) -> int:
    """The steps of an N-step chain that SDEdit at `strength` runs (its last round(strength·N))."""
    return int(round(strength * num_inference_steps))


def clips_x0(scheduler) -> bool:
    """Whether the scheduler's step clips (or thresholds) its x̂_0: then `denoise` steps with the ε of the clipped
    x̂_0 where the step can (DDIM's `use_clipped_model_output`), and a protocol records it."""
    return bool(scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"))


def epsilon_from_clipped_x0(scheduler) -> bool:
    """Whether `denoise` steps this scheduler with ε re-derived from its clipped x̂_0 (recorded in protocols)."""
    return "use_clipped_model_output" in inspect.signature(scheduler.step).parameters and clips_x0(scheduler)


def repaint_moves(num_inference_steps: int, jump_length: int, jump_n_sample: int) -> List[int]:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Sec. 4.2 and Fig. 10: after each `jump_length` steps down,
    `jump_length` steps back up, `jump_n_sample` - 1 times) as moves over a chain of `num_inference_steps` steps:
    k >= 0 is the reverse step k of the chain (its timesteps[k] -> timesteps[k + 1], x_0 after the last), ~k (< 0)
    undoes it (timesteps[k + 1] -> timesteps[k], with q). The order is diffusers' RePaintScheduler's own."""
    from diffusers import RePaintScheduler

    if num_inference_steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps}, jump_length={jump_length} and "
                         f"jump_n_sample={jump_n_sample} must each be at least 1 (jump_n_sample=1: no resampling).")
    schedule = RePaintScheduler(num_train_timesteps=num_inference_steps)
    schedule.set_timesteps(num_inference_steps, jump_length, jump_n_sample)
    # RePaint's index i down is the chain's step N-1-i (from its timestep i to i-1); up, the undo that ends at its i-1
    moves, last = [], num_inference_steps
    for i in schedule.timesteps.tolist():
        moves.append(num_inference_steps - 1 - i if i < last else ~(num_inference_steps - i))
        last = i
    return moves


def repaint(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    images: torch.Tensor,
    known: torch.Tensor,
    seeds: Sequence[int],
    num_inference_steps: int,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    progress=lambda it: it,
) -> torch.Tensor:
    """Inpainting with an unconditional model: RePaint (Lugmayr et al. 2022, Algorithm 1). `images` are x_0 in the
    model's range, `known` 1 where a pixel is kept and 0 where it is filled (N1HW or NCHW). Returns x_0.

    At each reverse step t -> s of the chain: the unknown pixels take the scheduler's own step (any variance type our
    DDPM scheduler runs, learned included, where diffusers' RePaintScheduler has DDIM's fixed one), the known pixels
    are the input diffused to s with q(x_s | x_0) (Eq. 8a), with the step's own noise (as diffusers' RePaintScheduler
    reuses it); after the last step the known pixels are the input itself. Resampling (`repaint_moves`) undoes a step
    with q(x_t | x_s) = N(√(ᾱ_t/ᾱ_s) x_s, (1 - ᾱ_t/ᾱ_s) I), which harmonises the filled region with the kept one.

    Move m's noise is `seeded_normal(seeds, ..., step=m, stream="step")`: image k's result depends on seeds[k] alone,
    and without resampling (`jump_n_sample` 1) and with nothing known it is `denoise`'s chain for the same seeds."""
    from .counter_noise import seed_keys, seeded_normal

    if not isinstance(scheduler, diffusers.DDPMScheduler):  # its step is the posterior RePaint's Eq. 8b samples
        raise ValueError(f"RePaint needs a DDPM scheduler, and {type(scheduler).__name__} is not one: inpaint with "
                         "ddpm_hf's DDPMScheduler (the pipeline's own).")
    if len(seeds) != images.shape[0]:
        raise ValueError(f"Got {len(seeds)} seeds for {images.shape[0]} images; pass one seed per image.")
    moves = repaint_moves(num_inference_steps, jump_length, jump_n_sample)
    scheduler.set_timesteps(num_inference_steps, device=images.device)
    timesteps = scheduler.timesteps
    alphas_cumprod = scheduler.alphas_cumprod.to(device=images.device, dtype=torch.float64)
    keep_variance = uses_learned_variance(scheduler)
    keys = seed_keys(seeds, images.device)
    known = known.to(images.dtype)
    x = seeded_normal(keys, images.shape[1:], 0, "initial", dtype=images.dtype) * scheduler.init_noise_sigma
    for m, move in enumerate(progress(moves)):
        noise = seeded_normal(keys, images.shape[1:], m, "step", dtype=images.dtype)
        if move >= 0:  # 1. the reverse step t -> s: the model's for the unknown pixels, q(x_s | x_0) for the known
            t = timesteps[move]
            unknown = scheduler.step(network_output(unet, scheduler, x, t, keep_variance), t, x,
                                     variance_noise=noise).prev_sample
            kept = images if move == len(timesteps) - 1 else scheduler.add_noise(
                images, noise, timesteps[move + 1 : move + 2].repeat(len(images)))
            x = known * kept + (1 - known) * unknown
        else:  # 2. resampling: undo the step timesteps[k] -> timesteps[k + 1] with q(x_t | x_s)
            k = ~move  # after the chain's last step x is x_0 itself: ᾱ = 1
            below = alphas_cumprod[timesteps[k + 1]] if k + 1 < len(timesteps) else alphas_cumprod.new_ones(())
            ratio = alphas_cumprod[timesteps[k]] / below
            x = ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * noise
    return x


def to_output(images: torch.Tensor, output_type: str):
    """Model-range images [-1, 1] (NCHW) to [0, 1] as a tensor (`pt`, NCHW), an array (`np`, NHWC) or PIL images."""
    images = (images / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return images
    elif output_type in ("np", "pil"):
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else DiffusionPipeline.numpy_to_pil(array)
    else:
        raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")


def from_masks(masks, count: int, size: tuple) -> torch.Tensor:
    """Masks (PIL images, or a tensor in [0, 1], HW, 1HW or N1HW; one for every image or one each) as `known`
    (N1HW float32): white (>= 0.5) is the region to fill, black is kept, as diffusers' inpainting pipelines read them.
    One line where they do not fit."""
    if isinstance(masks, torch.Tensor):
        m = masks.detach().to(CHAIN_DTYPE)
        m = m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m
    else:
        import numpy as np

        masks = [masks] if not isinstance(masks, (list, tuple)) else masks
        m = torch.from_numpy(np.stack([np.asarray(mask.convert("L"), dtype=np.float32) / 255 for mask in masks]))[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[2:]) != tuple(size) or m.shape[0] not in (1, count):
        raise ValueError(f"The masks are {tuple(m.shape)}, but {count} image(s) of {size[0]}x{size[1]} take one mask "
                         f"of {size[0]}x{size[1]} for all or one each (white: fill, black: keep).")
    if m.min() < 0 or m.max() > 1:
        raise ValueError("Mask tensors are given in [0, 1] (1: fill, 0: keep).")
    return (m < 0.5).to(CHAIN_DTYPE).expand(count, -1, -1, -1)


def from_images(images, channels: int, size: tuple) -> torch.Tensor:
    """PIL images, or a tensor NCHW in [0, 1] (as output_type `pt` gives), as model-range images [-1, 1] (float32) of
    the UNet's `channels` and `size`; one line where they do not fit."""
    if isinstance(images, torch.Tensor):
        x = images.detach().to(CHAIN_DTYPE)
        if x.ndim == 3:
            x = x[None]
    else:
        import numpy as np

        mode = "L" if channels == 1 else "RGB"
        arrays = [np.asarray(image.convert(mode), dtype=np.float32) / 255 for image in images]
        x = torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])).permute(0, 3, 1, 2)
    if tuple(x.shape[1:]) != (channels, *size):
        raise ValueError(f"The images are {tuple(x.shape[1:])} (C, H, W), but the UNet takes {(channels, *size)}; "
                         f"resize them to {size[0]}x{size[1]} with {channels} channel(s) first.")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("Image tensors are given in [0, 1] (as output_type='pt' returns them), not the model's [-1, 1].")
    return x * 2 - 1


class DDPMPipeline(DiffusionPipeline):
    """Pipeline for image generation (Ho et al. 2020): unconditional, or class-conditional with classifier-free
    guidance (Ho & Salimans 2021) where the UNet has a class embedding (guidance.py).

    Args:
        unet: a `UNet2DModel` that predicts the noise (or x_0, or v, per the scheduler config).
        scheduler: `ddpm_hf.DDPMScheduler` by default; any diffusers scheduler works (for example
            `DDIMScheduler.from_config(pipe.scheduler.config)` or `DPMSolverMultistepScheduler`).
        class_names: the names of a class-conditional UNet's classes, in label order (recorded in model_index.json).
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, class_names: Optional[List[str]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        if class_names is not None:  # only then: an unconditional pipeline's model_index.json stays diffusers' own
            self.register_to_config(class_names=list(class_names))

    @property
    def class_names(self) -> Optional[List[str]]:
        return getattr(self.config, "class_names", None)

    def register_to_config(self, **kwargs):
        # A drop-in subclass (ddpm_hf.DDPMScheduler) is recorded as the diffusers class it replaces,
        # so that model_index.json loads in plain diffusers; our from_pretrained swaps it back in.
        for name, value in kwargs.items():
            if name not in PIPELINE_SETTINGS and isinstance(value, (tuple, list)) and len(value) == 2:
                equivalent = _diffusers_equivalent(*value)
                if equivalent is not None:
                    kwargs[name] = ("diffusers", equivalent)
        super().register_to_config(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved pipeline: a folder, a Hub repo id, or a cached repo id with `HF_HUB_OFFLINE=1`.
        Repos laid out like `google/ddpm-cifar10-32` (weights and configs at the root) load too."""
        explicit_scheduler = "scheduler" in kwargs
        missing = not os.path.exists(os.path.expanduser(os.fspath(pretrained_model_name_or_path)))
        if missing and importlib.util.find_spec("ddpm_hf") is not None:  # on the Hub, without ddpm_hf, diffusers says it
            from ddpm_hf.paths import names_a_local_path

            missing = names_a_local_path(pretrained_model_name_or_path)
        else:
            missing = False
        if missing:
            raise OSError(f"{pretrained_model_name_or_path}: no such file or folder; give the folder a training run or "
                          "save_pretrained wrote (or a Hub repo id).")
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as e:
            if os.path.isdir(pretrained_model_name_or_path) or "cached" not in str(e):
                raise
            raise OSError(
                f"Cannot load {pretrained_model_name_or_path!r}: it is not a local folder, not in the Hugging Face "
                "cache, and the Hub cannot be reached (offline or HF_HUB_OFFLINE=1). Pass a folder written by "
                "save_pretrained, or download the repo where there is internet "
                f"(`hf download {pretrained_model_name_or_path}`) and copy the cache (HF_HOME)."
            ) from None
        if not explicit_scheduler and type(pipe.scheduler) is diffusers.DDPMScheduler:
            DDPMScheduler = our_scheduler_class()
            if DDPMScheduler is None:  # running as Hub pipeline code without ddpm_hf: keep diffusers' class
                return pipe
            try:
                pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            except (ValueError, TypeError) as e:
                problem = DDPMScheduler.chain_problem(pipe.scheduler.config)
                if problem:  # no scheduler can run it: diffusers' own would fail later, on an unrelated line
                    raise ValueError(f"Cannot load the pipeline {pretrained_model_name_or_path}: its scheduler config "
                                     f"(scheduler/scheduler_config.json) describes no diffusion that can run ({problem}); "
                                     "correct that value, or save the pipeline again.") from None
                # a value only ddpm_hf's refuses (one it does not use, or newer than ddpm_hf): diffusers' runs it
                logger.warning("Keeping diffusers' DDPMScheduler: ddpm_hf's does not take this config (%s).", e)
        return pipe

    def _sample_size(self) -> tuple:
        """(H, W) of the UNet's images."""
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _chain(self, labels: Optional[torch.Tensor], guidance_scale: float, x: torch.Tensor, *args, run=denoise,
               **kwargs):
        """`run(network, self.scheduler, x, *args, **kwargs)` (`denoise` or `repaint`) with the UNet in eval mode
        (sampling never uses dropout, also when called on a model that is training), guided where there are `labels`."""
        was_training = self.unet.training
        self.unet.eval()
        network = self.unet if labels is None else GuidedNetwork(self.unet, labels, guidance_scale)
        try:
            return run(network, self.scheduler, x, *args, **kwargs)
        finally:
            self.unet.train(was_training)

    def progress_bar(self, iterable=None, total=None):
        """diffusers' bar, labelled with what it counts unless the caller named it (a bar without a label, in a log of
        several, says nothing)."""
        config = getattr(self, "_progress_bar_config", {})
        if "desc" not in config:
            self._progress_bar_config = {**config, "desc": "Denoising steps"}
        try:
            return super().progress_bar(iterable, total)
        finally:
            self._progress_bar_config = config

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        eta: Optional[float] = None,
        callback: Optional[Callable[[DenoiseStep], None]] = None,
        seeds: Optional[Sequence[int]] = None,
        cuda_graph: bool = True,
        class_labels: Union[int, Sequence[int], torch.Tensor, None] = None,
        guidance_scale: float = 1.0,
        timesteps: Optional[Sequence[int]] = None,
    ):
        """Generate `batch_size` images.

        Args:
            batch_size: number of images.
            generator: a `torch.Generator`, or one per image (then image i depends only on generator i:
                the same image whatever the batch it is drawn in).
            num_inference_steps: scheduler steps (1000 is the paper's full chain; fewer is a strided chain).
            output_type: `pil` (list of PIL images), `np` (NHWC float array in [0, 1]) or `pt` (NCHW tensor in [0, 1]).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            eta: DDIM's eta, for schedulers whose `step` takes it.
            callback: called with a `DenoiseStep` after each step of the reverse chain (x_t, the model output,
                x_{t-1}, the predicted x_0 when the scheduler gives one).
            seeds: one integer per image, instead of `generator`: image i's noise (x_T and every step's) is
                counter-based (`counter_noise.seeded_normal`), a function of seeds[i] alone, drawn for the whole batch
                at once and the same on every device (a CPU and a GPU give the same noise for the same seed).
            cuda_graph: with seeds, our DDPMScheduler and no callback, on a CUDA device: replay
                the reverse step as a CUDA graph (the same images, fewer kernel launches); False runs it eagerly.
            class_labels: for a class-conditional UNet, one label for all images or one per image (0..K-1; the
                names are `pipe.class_names`).
            guidance_scale: classifier-free guidance w (guidance.py): 0 is the unconditional model, 1 the conditional
                one, above 1 guided (both halves in one forward pass of the doubled batch).
            timesteps: the chain's timesteps, descending (e.g. the DDIM paper's quadratic ones), instead of
                `num_inference_steps` spaced by the scheduler's `timestep_spacing`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        if seeds is not None and len(seeds) != batch_size:
            raise ValueError(f"Got {len(seeds)} seeds for batch_size={batch_size}; pass one seed per image.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got {len(generator)} generators for batch_size={batch_size}; pass one generator per image or a single one."
            )
        shape = (batch_size, self.unet.config.in_channels, *self._sample_size())
        labels = check_labels(self.unet, class_labels, batch_size, guidance_scale)
        device = self._execution_device
        if seeds is not None:  # with a generator too, denoise refuses the pair
            from .counter_noise import seeded_normal

            noise = seeded_normal(seeds, shape[1:], 0, "initial", device, CHAIN_DTYPE)
        else:
            noise = randn_tensor(shape, generator=generator, device=device, dtype=CHAIN_DTYPE)
        images = self._chain(labels, guidance_scale, noise, num_inference_steps, generator, eta, self.progress_bar,
                             callback, seeds=seeds, cuda_graph=cuda_graph, timesteps=timesteps)
        images = to_output(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @torch.no_grad()
    def edit(
        self,
        images,
        strength: float = 0.5,
        seeds: Optional[Sequence[int]] = None,
        num_inference_steps: int = 1000,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Union[int, Sequence[int], torch.Tensor, None] = None,
        guidance_scale: float = 1.0,
    ):
        """Image-to-image with SDEdit (Meng et al. 2022): diffuse each image to the chain's step at t ≈ strength·T
        with q(x_t | x_0) (Eq. 4), then run the reverse chain from there. 0 returns the images, 1 is `__call__`'s
        chain from x_T ~ N(0, I) itself (the prior p(x_T) the forward process ends at), so that at 1 the same seed
        gives the same image as sampling; in between, lower keeps more of the input.

        Args:
            images: PIL images, or a tensor NCHW in [0, 1], of the UNet's size and channels.
            strength: in [0, 1]: the share of the chain's `num_inference_steps` steps that is run.
            seeds: one per image (default 0..N-1): the noise of q(x_t | x_0) is the seed's x_T noise, and each
                step's noise is the seed's, as in `__call__(seeds=...)`.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength={strength} must be in [0, 1] (0 returns the images, 1 samples anew).")
        device = self._execution_device
        x0 = from_images(images, self.unet.config.in_channels, self._sample_size()).to(device)
        seeds = list(range(len(x0))) if seeds is None else list(seeds)
        if len(seeds) != len(x0):
            raise ValueError(f"Got {len(seeds)} seeds for {len(x0)} images; pass one seed per image.")
        labels = check_labels(self.unet, class_labels, len(x0), guidance_scale)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        run = sdedit_steps(strength, len(self.scheduler.timesteps))
        if run == 0:
            images = x0
        else:
            from .counter_noise import seeded_normal

            start = len(self.scheduler.timesteps) - run
            noise = seeded_normal(seeds, x0.shape[1:], 0, "initial", device, CHAIN_DTYPE)
            # 1. x_t ~ q(x_t | x_0) at the chain's step `start`; at strength 1 the prior's x_T, as sampling starts
            #    (denoise scales a chain from step 0 by init_noise_sigma itself)
            x = noise if start == 0 else self.scheduler.add_noise(
                x0, noise, self.scheduler.timesteps[start : start + 1].repeat(len(x0)))
            # 2. the reverse chain from there
            images = self._chain(labels, guidance_scale, x, num_inference_steps, None, None, self.progress_bar,
                                 seeds=seeds, start=start)
        images = to_output(images, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @torch.no_grad()
    def inpaint(
        self,
        images,
        masks,
        seeds: Optional[Sequence[int]] = None,
        num_inference_steps: int = 1000,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        output_type: str = "pil",
        return_dict: bool = True,
        class_labels: Union[int, Sequence[int], torch.Tensor, None] = None,
        guidance_scale: float = 1.0,
    ):
        """Inpainting with RePaint (Lugmayr et al. 2022): the white region of each mask is filled by the model, the
        black region is kept from the image (re-noised from it at every step; see `repaint`).

        Args:
            images: PIL images, or a tensor NCHW in [0, 1], of the UNet's size and channels.
            masks: one mask for all images or one each (PIL, or a tensor in [0, 1]): white (>= 0.5) is filled.
            seeds: one per image (default 0..N-1); image k depends on seeds[k] alone.
            jump_length, jump_n_sample: RePaint's resampling, j and r of its paper (10 and 10 there): every
                `jump_length` steps the chain goes back up `jump_length` steps, `jump_n_sample` - 1 times; 1 turns it off.
                It costs about 1 + 2(jump_n_sample - 1) times the network calls of the plain chain.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        device = self._execution_device
        x0 = from_images(images, self.unet.config.in_channels, self._sample_size()).to(device)
        known = from_masks(masks, len(x0), self._sample_size()).to(device)
        seeds = list(range(len(x0))) if seeds is None else list(seeds)
        labels = check_labels(self.unet, class_labels, len(x0), guidance_scale)
        images = self._chain(labels, guidance_scale, x0, known, seeds, num_inference_steps, jump_length, jump_n_sample,
                             self.progress_bar, run=repaint)
        images = to_output(images, output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
