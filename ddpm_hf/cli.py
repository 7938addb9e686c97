"""Command-line entry points (thin: parse, then call the library)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from .config import parse_args
    from .data import BadImageError, DatasetUnavailableError

    try:
        config, dry_run = parse_args(argv)
    except ValueError as e:
        return _fail(str(e))
    if dry_run:
        from .training import make_unet

        n = sum(p.numel() for p in make_unet(config).parameters())
        print(config.to_json())
        print(f"UNet parameters: {n:,}")
        return 0
    from .training import NonFiniteLossError, train

    try:
        train(config)
    except (DatasetUnavailableError, BadImageError, NonFiniteLossError) as e:
        return _fail(str(e), 1)
    return 0


def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-sample` / `python -m ddpm_hf.sample`: draw N images from a pipeline into a folder (resumable;
    under `accelerate launch` the processes share the work)."""
    import argparse

    from .sampling import SCHEDULERS, sample_to_folder, use_scheduler

    parser = argparse.ArgumentParser(description=sample_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the PNGs go ({k:06d}-seed{seed+k}.png)")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k")
    args = parser.parse_args(argv)

    import torch
    from accelerate import PartialState

    from .pipelines.pipeline_ddpm import DDPMPipeline

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    state = PartialState(cpu=not has_accelerator)
    try:
        pipe = use_scheduler(DDPMPipeline.from_pretrained(args.pipeline), args.scheduler).to(state.device)
        result = sample_to_folder(pipe, args.output_dir, args.num_images, args.batch_size, args.num_inference_steps,
                                  args.seed, args.eta, state.process_index, state.num_processes,
                                  progress=state.is_local_main_process)
    except (OSError, ValueError) as e:
        return _fail(str(e), 1)
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing to draw"
    print(f"process {state.process_index}: wrote {result['written']}, kept {result['kept']} already complete; {rate}")
    state.wait_for_everyone()
    return 0
