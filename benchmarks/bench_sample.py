"""Sampling throughput per network dtype: our DDPMPipeline (our scheduler; one seed per image, its reverse step replayed
as a CUDA graph on a GPU and eagerly beside it; or one generator per image) against diffusers' DDPMPipeline
(diffusers' DDPMScheduler, one generator per image), same UNet weights, scheduler config and steps; the scheduler's
share of the time (on a CPU); and
the FID feature-extraction rate (clean-fid's folder path: PNG decode, clean resize to 299, network); and the cost of
classifier-free guidance: a class-conditional UNet of the same preset (10 classes) at guidance 0 and 1 (one half) and 3
(both halves in one forward pass of the doubled batch) against the unconditional UNet, same batch (goal: at most 2.1x).

    python benchmarks/bench_sample.py                       # cpu-small UNet, 32x32, batch 16, 50 steps, fp32 and bf16
    python benchmarks/bench_sample.py --preset ddpm-cifar10-32 --batch_size 512 --steps 20   # on a GPU: fp16 too
    python benchmarks/bench_sample.py --inception_weights inception-2015-12-05.pt
    python benchmarks/bench_sample.py --profile 15         # and where each dtype's time goes (torch.profiler)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import diffusers
import torch

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.sampling.samplers import network_dtype


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


def timed_variants(unet, ours, ref, args, device) -> list:
    """(name, dtype, images/s or an error) for each dtype: ours with one seed per image (counter-based noise, the way
    ddpm-sample draws), ours and diffusers with one torch.Generator per image (the way diffusers users draw
    per-image reproducible batches)."""
    n, rows = args.batch_size, []
    for name in args.dtypes.split(","):
        torch.nn.Module.to(unet, network_dtype(name, device))
        generators = lambda: [torch.Generator(device).manual_seed(k) for k in range(n)]
        variants = (
            ("ddpm_hf, seeds (counter noise)", lambda: ours(batch_size=n, seeds=list(range(n)), num_inference_steps=args.steps,
                                                          output_type="np")),
            ("ddpm_hf, a generator per image", lambda: ours(batch_size=n, generator=generators(),
                                                          num_inference_steps=args.steps, output_type="np")),
            ("diffusers, a generator per image", lambda: ref(batch_size=n, generator=generators(),
                                                           num_inference_steps=args.steps, output_type="np")),
        ) + ((("ddpm_hf, seeds, eager (cuda_graph=False)", lambda: ours(batch_size=n, seeds=list(range(n)),
              num_inference_steps=args.steps, output_type="np", cuda_graph=False)),) if device.type == "cuda" else ())
        for label, call in variants:
            try:
                call()  # warm up
                rows.append((label, name, n / best_of(call, args.repeats)))
            except Exception as e:  # diffusers cannot turn a bf16 tensor into numpy, for one
                rows.append((label, name, f"fails ({type(e).__name__}: {str(e).splitlines()[0][:60]})"))
    torch.nn.Module.to(unet, torch.float32)
    return rows


def guidance_cost(args, device) -> None:
    """images/s of a 10-class conditional UNet at guidance 0, 1 and 3 and of the unconditional UNet, fp32, same batch."""
    n, classes = args.batch_size, 10
    torch.manual_seed(0)
    plain = DDPMPipeline(build_unet(args.preset, sample_size=args.resolution).eval().to(device), DDPMScheduler())
    conditional = DDPMPipeline(build_unet(args.preset, sample_size=args.resolution, num_class_embeds=classes + 1)
                               .eval().to(device), DDPMScheduler(), class_names=[str(k) for k in range(classes)])
    labels = [k % classes for k in range(n)]
    calls = [("unconditional UNet", lambda: plain(batch_size=n, seeds=list(range(n)), num_inference_steps=args.steps,
                                                   output_type="np"))]
    for w in (0.0, 1.0, 3.0):
        calls.append((f"conditional UNet, guidance_scale {w:g}", lambda w=w: conditional(
            batch_size=n, seeds=list(range(n)), class_labels=labels, guidance_scale=w, num_inference_steps=args.steps,
            output_type="np")))
    for pipe in (plain, conditional):
        pipe.set_progress_bar_config(disable=True)
    for _, call in calls:
        call()  # warm up
    seconds = {label: [] for label, _ in calls}
    for _ in range(args.repeats):  # in turns: a busy moment of the machine hits every variant alike
        for label, call in calls:
            seconds[label].append(best_of(call, 1))
    rates = [(label, n / min(seconds[label])) for label, _ in calls]
    print(f"\nclassifier-free guidance, fp32, batch {n}, {args.steps} steps")
    print("| network | images/s | time vs unconditional | time vs guidance 0 |")
    print("|---|---|---|---|")
    for label, rate in rates:
        print(f"| {label} | {rate:.2f} | {rates[0][1] / rate:.2f}x | {rates[1][1] / rate:.2f}x |")


def profile_table(fn, device, top: int) -> str:
    """The `top` ops of `fn()` by their own time on the device (CUDA kernels), or on the CPU without one: where a
    dtype's time goes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default=None, help="network dtypes to time (default: fp32,bf16 on a CPU, "
                        "fp32,bf16,fp16 on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fid_images", type=int, default=256)
    parser.add_argument("--inception_weights", default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print the N ops that take the most time in one chain of ours (seeds) per dtype")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtypes = args.dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32,bf16")

    torch.manual_seed(0)
    unet = build_unet(args.preset, sample_size=args.resolution).eval().to(device)
    ours = DDPMPipeline(unet, DDPMScheduler())
    ref = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler.from_config(ours.scheduler.config))
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    n = args.batch_size
    print(f"UNet {args.preset} at {args.resolution}x{args.resolution}, batch {n}, {args.steps} steps, on {device} "
          f"(torch threads {torch.get_num_threads()}), best of {args.repeats}")
    rows = timed_variants(unet, ours, ref, args, device)
    reference = {dtype: rate for label, dtype, rate in rows if label.startswith("diffusers") and not isinstance(rate, str)}
    fp32 = {label: rate for label, dtype, rate in rows if dtype == "fp32"}
    print("| sampler | dtype | images/s | vs diffusers, same dtype | vs its fp32 |")
    print("|---|---|---|---|---|")
    for label, dtype, rate in rows:
        if isinstance(rate, str):
            print(f"| {label} | {dtype} | {rate} | | |")
            continue
        vs_ref = f"{rate / reference[dtype]:.2f}x" if dtype in reference else "diffusers fails"
        vs_fp32 = f"{rate / fp32[label]:.2f}x" if isinstance(fp32.get(label), float) else ""
        print(f"| {label} | {dtype} | {rate:.2f} | {vs_ref} | {vs_fp32} |")
    for name in args.dtypes.split(",") if args.profile else ():
        torch.nn.Module.to(unet, network_dtype(name, device))
        print(f"\nours, seeds, {name}: the {args.profile} ops that take the most time in one chain of {args.steps} steps")
        print(profile_table(lambda: ours(batch_size=n, seeds=list(range(n)), num_inference_steps=args.steps,
                                         output_type="np"), device, args.profile))
    torch.nn.Module.to(unet, torch.float32)
    guidance_cost(args, device)
    if device.type == "cpu":
        for name, sched in (("ddpm_hf", DDPMScheduler()), ("diffusers", diffusers.DDPMScheduler())):
            shares = [scheduler_share(unet, sched, n, args.steps, args.resolution) for _ in range(args.repeats)]
            u, s = min(x[0] for x in shares), min(x[1] for x in shares)
            print(f"{name:9s} scheduler.step: {1000 * s / args.steps:6.3f} ms/step = {100 * s / u:5.2f}% of the UNet time")

    from ddpm_hf.measuring.folder_metrics import FeatureNetwork, folder_features, inception_network
    from ddpm_hf.sampling.sample_folder import sample_to_folder

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
