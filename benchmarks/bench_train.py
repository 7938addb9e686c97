"""Training throughput: ddpm_hf's loop against a reference loop built from stock diffusers parts the way
diffusers' train_unconditional example builds it (diffusers DDPMScheduler and EMAModel, per-sample
torchvision transforms in a DataLoader, AdamW, accelerate.accumulate), with the same UNet config, batch
and step count, on the same synthetic RGB PNG dataset.

Ours runs in five settings: fp32, `--mixed_precision bf16` (on some CPUs with AVX512-BF16 or AMX this is the
lever, on others it is slower), `--channels_last`, both, and `--mixed_precision auto` (bf16 where it times at least 10% faster than fp32,
timed before training, outside the timed steps); the reference runs as the diffusers example runs by default (fp32).
The CPU features torch sees are printed beside the table: which precision is faster depends on them.
Prints images/s, peak RSS and the loss statistics of each, and the ratio to the reference. Each loop runs
in its own process (so peak memory is its own). All are timed over the steps after the warmup: ours from
the per-step wall times `ddpm_hf.training.loop.train` records in its history (logging every step), the
reference directly.

    python benchmarks/bench_train.py                    # cpu-small UNet, 32x32 RGB, batch 32
    python benchmarks/bench_train.py --resolution 16 --channels 1 --batch_size 64   # the quick start's shape
    python benchmarks/bench_train.py --preset cpu-tiny --batch_size 64 --steps 40
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (mixed_precision, channels_last)
    "fp32": ("no", False),
    "bf16": ("bf16", False),
    "fp32 channels_last": ("no", True),
    "bf16 channels_last": ("bf16", True),
    "auto": ("auto", False),
}


def cpu_features() -> str:
    """What decides whether bf16 pays on this CPU: torch's capability level, oneDNN's native bf16, and the flags."""
    import torch

    from ddpm_hf.devices import cpu_has_bf16

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    return (f"CPU: torch capability {torch.backends.cpu.get_cpu_capability()}, oneDNN native bf16 {cpu_has_bf16()}, "
            f"avx512_bf16 {'avx512_bf16' in flags}, AMX {'amx_bf16' in flags}, cores {torch.get_num_threads()}")


def make_dataset(folder: Path, n: int, resolution: int) -> Path:
    """n random RGB PNG images (like CIFAR-10's layout: an Image column `img`) as a parquet file."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"bytes": buf.getvalue(), "path": None})
    path = folder / "images.parquet"
    datasets.Dataset.from_dict({"img": rows}, features=datasets.Features({"img": datasets.Image()})).to_parquet(str(path))
    return path


def run_reference(args) -> dict:
    import datasets
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torchvision import transforms

    from ddpm_hf import unet_config

    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=1)
    ds = datasets.load_dataset("parquet", data_files={"train": args.data}, split="train")
    augment = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    mode = "RGB" if args.channels == 3 else "L"
    ds.set_transform(lambda ex: {"input": [augment(im.convert(mode)) for im in ex["img"]]})
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
    model = UNet2DModel.from_config(unet_config(args.preset, sample_size=args.resolution, in_channels=args.channels))
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.warmup + args.steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                   model_cls=UNet2DModel, model_config=model.config)
    losses, step, start = [], 0, None
    while step < args.warmup + args.steps:
        for batch in loader:
            if step == args.warmup:
                start = time.perf_counter()
            clean = batch["input"]
            noise = torch.randn(clean.shape, device=clean.device)
            t = torch.randint(0, 1000, (clean.shape[0],), device=clean.device).long()
            noisy = noise_scheduler.add_noise(clean, noise, t)
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(noisy, t).sample.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema.step(model.parameters())
            if step >= args.warmup:
                losses.append(loss.item())
            step += 1
            if step == args.warmup + args.steps:
                break
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": losses}


def run_ours(args, steps: int, out: Path) -> dict:
    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.loop import train

    mixed_precision, channels_last = VARIANTS[args.variant]
    config = resolve_config(dict(
        dataset=args.data, channels=args.channels, resolution=args.resolution, unet_preset=args.preset, dropout=0.0,
        batch_size=args.batch_size, max_train_steps=steps, learning_rate=1e-4, lr_scheduler="cosine",
        lr_warmup_steps=0, random_flip=True, logging_steps=1, checkpointing_steps=10**9, save_images_steps=10**9,
        num_sample_images=1, sample_inference_steps=1, report_to="none", output_dir=str(out),
        mixed_precision=mixed_precision, channels_last=channels_last, compile=args.compile,
    ))
    train(config)
    if mixed_precision == "auto":
        print("CHOSEN " + json.loads((out / "train_summary.json").read_text())["mixed_precision"])
    history = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())["history"]
    timed = history[-args.steps:]  # each entry holds the wall time of its step (logging_steps=1)
    return {"seconds": sum(h["seconds"] for h in timed), "losses": [h["loss"] for h in timed]}


def child(args) -> None:
    if args.which == "reference":
        result = run_reference(args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_ours(args, args.total_steps, Path(tmp))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(args, which: str, total_steps: int = 0, variant: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--data", args.data, "--preset", args.preset,
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--resolution", str(args.resolution), "--channels", str(args.channels), "--total_steps", str(total_steps),
           "--variant", variant]
    cmd += ["--compile"] * args.compile
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["chosen"] = next((line[7:] for line in out.splitlines() if line.startswith("CHOSEN ")), None)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--steps", type=int, default=40, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--data", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"ours, comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet")
    parser.add_argument("--child", dest="which", default=None)
    parser.add_argument("--total_steps", type=int, default=0)
    args = parser.parse_args()
    if args.which:
        return child(args)

    import statistics

    import torch

    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        args.data = args.data or str(make_dataset(Path(tmp), args.images, args.resolution))
        results = {"reference (diffusers example parts, fp32)": spawn(args, "reference")}
        for variant in variants:
            results[f"ddpm_hf {variant}"] = spawn(args, "ours", args.warmup + args.steps, variant)
    print(f"UNet preset {args.preset}, {args.resolution}x{args.resolution}, {args.channels} channel(s), batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup, torch threads {torch.get_num_threads()}, compile={args.compile}")
    print(cpu_features())
    ref_ips = ref_mean = None
    for name, result in results.items():
        ips = args.steps * args.batch_size / result["seconds"]
        mean, sd = statistics.mean(result["losses"]), statistics.stdev(result["losses"])
        ref_ips, ref_mean = ref_ips or ips, ref_mean or mean
        chosen = f"   (auto chose {'fp32' if result['chosen'] == 'no' else result['chosen']})" if result.get("chosen") else ""
        print(f"{name:42s} {ips:8.1f} images/s  {ips / ref_ips:5.2f}x   peak RSS {result['peak_rss_mb']:6.0f} MB   "
              f"loss {mean:.4f} ± {sd:.4f} ({100 * (mean / ref_mean - 1):+.1f}% vs reference){chosen}")


if __name__ == "__main__":
    main()
