"""Samplers and drawing images: which scheduler a pipeline samples with, the pipeline of a network, and a process's
share of images drawn one seed per image."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Collection, Iterator, List, Optional, Tuple

from ddpm_hf.choices import SAMPLERS, SAMPLING_DTYPES, SAMPLING_TIMESTEPS
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.folder_jobs import process_share

if TYPE_CHECKING:
    import torch


def use_scheduler(pipe, name: str):
    """Swap in the sampler `name` (of SAMPLERS), built from the pipeline's scheduler config; `ddpm` keeps it."""
    from diffusers import DPMSolverMultistepScheduler

    from ddpm_hf.diffusion.ddim import DDIMScheduler  # diffusers', also on an explicit chain

    if name == "ddpm":
        return pipe
    elif name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif name == "dpm-solver":
        config = pipe.scheduler.config
        # DPM-Solver++ steps with its x̂_0 (data prediction): clipped where the pipeline clips (its dynamic threshold
        # with a ceiling of the clip range is the clip), else guidance drives x̂_0 out of range and the class is lost
        clip = ({"thresholding": True, "sample_max_value": config.get("clip_sample_range", 1.0)}
                if config.get("clip_sample") and not config.get("thresholding") else {})
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", **clip)
    else:
        raise UsageError(f"--scheduler {name!r} is not one of {', '.join(SAMPLERS)}.")
    return pipe


def quadratic_timesteps(num_inference_steps: int, num_train_timesteps: int) -> List[int]:
    """The DDIM paper's quadratic chain (Song et al. 2021, App. D.2, its CIFAR-10 choice): τ_i = ⌊(i·√(0.8T)/(N-1))²⌋
    for i = 0..N-1, as its code computes it, descending. Where rounding gives a timestep twice (many steps at small
    i), each is lifted to one past the one before, so that the chain has N distinct steps."""
    import numpy as np

    n, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= int(T * 0.8) + 1:
        raise UsageError(f"--timesteps quadratic takes 1 to {int(T * 0.8) + 1} steps for T = {T} (its chain ends at "
                         f"0.8·T); got --num_inference_steps {n}.")
    chain = [int(t) for t in np.linspace(0, np.sqrt(T * 0.8), n) ** 2]
    for i in range(1, n):
        chain[i] = max(chain[i], chain[i - 1] + 1)
    return chain[::-1]


def chain_timesteps(kind: str, num_inference_steps: int, scheduler) -> Optional[List[int]]:
    """The explicit chain `kind` (SAMPLING_TIMESTEPS) of `num_inference_steps` for `scheduler`; None for `uniform`,
    which the scheduler spaces itself (its timestep_spacing)."""
    if kind == "uniform":
        return None
    if kind == "quadratic":
        return quadratic_timesteps(num_inference_steps, scheduler.config.num_train_timesteps)
    raise UsageError(f"--timesteps {kind!r} is not one of {', '.join(SAMPLING_TIMESTEPS)}.")


def with_spacing(pipe, spacing: Optional[str]):
    """The pipeline's sampler with timestep_spacing `spacing` (None: as its config says)."""
    if spacing is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing=spacing)
    return pipe


def network_dtype(name: str, device, flag: str = "--dtype") -> "torch.dtype":
    """`flag` (SAMPLING_DTYPES) as a torch dtype for a network on `device`; fp16 is refused on a CPU."""
    import torch

    dtypes = dict(zip(SAMPLING_DTYPES, (torch.float32, torch.bfloat16, torch.float16)))
    if name not in dtypes:
        raise UsageError(f"{flag} {name!r} is not one of {', '.join(SAMPLING_DTYPES)}.")
    if name == "fp16" and torch.device(device).type == "cpu":
        raise UsageError(f"{flag} fp16 needs a GPU (a CPU has no fast fp16 kernels); on a CPU use {flag} bf16 or fp32.")
    return dtypes[name]


def cast_network(unet, name: str) -> None:
    """The network in --dtype `name` (after its weights were hashed: the hash names the weights as saved)."""
    import torch

    # torch's Module.to: diffusers' own warns about modules to keep in float32 even when a UNet has none
    torch.nn.Module.to(unet, network_dtype(name, unet.device))


def pipeline_for(unet, scheduler_config, sampler: str = "ddpm", class_names: Optional[List[str]] = None):
    """A DDPMPipeline of `unet` (class-conditional: `class_names`) with our DDPM scheduler of `scheduler_config`, then
    the sampler `sampler`."""
    from ddpm_hf.diffusion.scheduler import DDPMScheduler
    from ddpm_hf.pipelines.pipeline_ddpm import DDPMPipeline

    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config), class_names=class_names)
    return use_scheduler(pipe, sampler)


def draw_share(pipe, num_images: int, seed_of: Callable[[int], int], rank: int = 0, world_size: int = 1,
               batch_size: int = 64, skip: Collection[int] = (), label_of: Optional[Callable[[int], int]] = None,
               step_progress: Optional[Callable[[int], None]] = None, **call: Any) -> Iterator[Tuple[List[int], Any]]:
    """This process's share of images 0..num_images-1 (`process_share`), image k drawn with the counter-based noise
    of seed `seed_of(k)` (`pipe(seeds=...)`) and, for a class-conditional pipeline, the class `label_of(k)`, in
    batches of `batch_size`: yields (ks, images). Image k is the same whatever the batch size, the number of processes
    or the device. `call` goes to the pipeline (num_inference_steps, output_type, eta, guidance_scale);
    `step_progress(n)` is called after each chain step of a batch of n images."""
    from ddpm_hf import cpu_threads

    todo = process_share(num_images, rank, world_size, skip)
    threads = cpu_threads.governor(pipe.device, "chain step")
    for i in range(0, len(todo), batch_size):
        ks = todo[i : i + batch_size]
        labels = {} if label_of is None else {"class_labels": [label_of(k) for k in ks]}
        ticks = [f for f in (threads and threads.tick, step_progress and (lambda n=len(ks): step_progress(n))) if f]
        with chain_steps_shown(pipe, (lambda: [f() for f in ticks]) if ticks else None):
            images = pipe(batch_size=len(ks), seeds=[seed_of(k) for k in ks], **labels, **call).images
        yield ks, images


@contextmanager
def chain_steps_shown(pipe, tick: Optional[Callable[[], None]]):
    """While inside, `tick()` after every step of the pipeline's reverse chain (through the pipeline's own
    `progress_bar` hook, which the chain and its CUDA-graph replay both run through): a bar over the chain's steps
    moves while one batch of 1000 steps runs, where a bar over images would sit at 0 for minutes; and the CPU's thread
    count follows the load (`cpu_threads.ThreadGovernor`) step by step."""
    if tick is None:
        yield
        return

    def ticking(iterable):
        for item in iterable:
            yield item
            tick()

    pipe.progress_bar = ticking  # the instance's, shadowing diffusers' method for this call only
    try:
        yield
    finally:
        del pipe.progress_bar
