"""Sampling throughput: our DDPMPipeline (our scheduler) against diffusers' DDPMPipeline (diffusers'
DDPMScheduler), same UNet weights, scheduler config and steps; the scheduler's share of the time; and
the FID feature-extraction rate (clean-fid's folder path: PNG decode, clean resize to 299, network).

    python benchmarks/bench_sample.py                       # cpu-small UNet, 32x32, batch 16, 50 steps
    python benchmarks/bench_sample.py --inception_weights inception-2015-12-05.pt
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def scheduler_share(unet, scheduler, batch: int, steps: int, size: int) -> tuple:
    """(UNet seconds, scheduler.step seconds) over one chain."""
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    t_unet = t_step = 0.0
    with torch.no_grad():
        for t in scheduler.timesteps:
            a = time.perf_counter()
            out = unet(x, t).sample
            b = time.perf_counter()
            x = scheduler.step(out, t, x, generator=g).prev_sample
            t_step += time.perf_counter() - b
            t_unet += b - a
    return t_unet, t_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fid_images", type=int, default=256)
    parser.add_argument("--inception_weights", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = build_unet(args.preset, sample_size=args.resolution).eval()
    ours = DDPMPipeline(unet, DDPMScheduler())
    ref = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler.from_config(ours.scheduler.config))
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    run = lambda pipe: pipe(batch_size=args.batch_size, generator=torch.Generator().manual_seed(0),
                            num_inference_steps=args.steps, output_type="np")
    run(ours), run(ref)  # warm up
    t_ours, t_ref = best_of(lambda: run(ours), args.repeats), best_of(lambda: run(ref), args.repeats)
    n = args.batch_size
    print(f"UNet {args.preset} at {args.resolution}x{args.resolution}, batch {n}, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"ddpm_hf DDPMPipeline  : {n / t_ours:7.2f} images/s")
    print(f"diffusers DDPMPipeline: {n / t_ref:7.2f} images/s   (ours / diffusers: {t_ref / t_ours:.2f}x)")
    for name, sched in (("ddpm_hf", DDPMScheduler()), ("diffusers", diffusers.DDPMScheduler())):
        shares = [scheduler_share(unet, sched, n, args.steps, args.resolution) for _ in range(args.repeats)]
        u, s = min(x[0] for x in shares), min(x[1] for x in shares)
        print(f"{name:9s} scheduler.step: {1000 * s / args.steps:6.3f} ms/step = {100 * s / u:5.2f}% of the UNet time")

    from ddpm_hf.evaluation import FeatureNetwork, folder_features, inception_network
    from ddpm_hf.sample_folder import sample_to_folder

    with tempfile.TemporaryDirectory() as tmp:
        sample_to_folder(ours, Path(tmp), args.fid_images, batch_size=64, num_inference_steps=1, progress=False)
        if args.inception_weights:
            net, label = inception_network(Path(args.inception_weights), "cpu"), "Inception-v3"
        else:
            proj = torch.randn(3 * 8 * 8, 2048) / 8
            net = FeatureNetwork(lambda x: torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1) @ proj,
                                 "stand-in", "0" * 64, 2048)
            label = "stand-in network (no Inception weights here: decode + clean resize only)"
        seconds = best_of(lambda: folder_features(tmp, net, batch_size=64), 1)
        print(f"FID feature extraction, {label}: {args.fid_images / seconds:7.1f} images/s")


if __name__ == "__main__":
    main()
