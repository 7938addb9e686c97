"""Training throughput: ddpm_hf's loop against a reference loop built from stock diffusers parts the way
diffusers' train_unconditional example builds it (diffusers DDPMScheduler and EMAModel, per-sample
torchvision transforms in a DataLoader, AdamW, accelerate.accumulate), with the same UNet config, batch
and step count, on the same synthetic RGB PNG dataset.

Prints images/s, peak RSS and the loss statistics of each, and the ratio. Each loop runs in its own
process (so peak memory is its own). Both are timed over the steps after the warmup: ours from the
per-step wall times `ddpm_hf.training.train` records in its history (logging every step), the
reference directly.

    python benchmarks/bench_train.py                    # cpu-small UNet, 32x32, batch 32
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
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from torchvision import transforms

    import datasets
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
    ds.set_transform(lambda ex: {"input": [augment(im.convert("RGB")) for im in ex["img"]]})
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0, drop_last=True)
    model = UNet2DModel.from_config(unet_config(args.preset, sample_size=args.resolution, in_channels=3))
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
    from ddpm_hf.config import resolve_config
    from ddpm_hf.training import train

    config = resolve_config(dict(
        dataset=args.data, channels=3, resolution=args.resolution, unet_preset=args.preset, dropout=0.0,
        batch_size=args.batch_size, max_train_steps=steps, learning_rate=1e-4, lr_scheduler="cosine",
        lr_warmup_steps=0, random_flip=True, logging_steps=1, checkpointing_steps=10**9, save_images_steps=10**9,
        num_sample_images=1, sample_inference_steps=1, report_to="none", output_dir=str(out),
        channels_last=args.channels_last, compile=args.compile,
    ))
    train(config)
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


def spawn(args, which: str, total_steps: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--data", args.data, "--preset", args.preset,
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--resolution", str(args.resolution), "--total_steps", str(total_steps)]
    cmd += ["--channels_last"] * args.channels_last + ["--compile"] * args.compile
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--data", default=None)
    parser.add_argument("--channels_last", action="store_true", help="ours: channels_last memory format")
    parser.add_argument("--compile", action="store_true", help="ours: torch.compile the UNet")
    parser.add_argument("--child", dest="which", default=None)
    parser.add_argument("--total_steps", type=int, default=0)
    args = parser.parse_args()
    if args.which:
        return child(args)

    import statistics

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        args.data = args.data or str(make_dataset(Path(tmp), args.images, args.resolution))
        ref = spawn(args, "reference")
        full = spawn(args, "ours", args.warmup + args.steps)
    ours_seconds = full["seconds"]
    ref_ips = args.steps * args.batch_size / ref["seconds"]
    ours_ips = args.steps * args.batch_size / ours_seconds
    mean_sd = lambda xs: f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"
    print(f"UNet preset {args.preset}, {args.resolution}x{args.resolution} RGB, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup} warmup, torch threads {torch.get_num_threads()}, "
          f"ours with channels_last={args.channels_last} compile={args.compile}")
    print(f"reference (diffusers example parts): {ref_ips:8.1f} images/s   peak RSS {ref['peak_rss_mb']:7.0f} MB   loss {mean_sd(ref['losses'])}")
    print(f"ddpm_hf                            : {ours_ips:8.1f} images/s   peak RSS {full['peak_rss_mb']:7.0f} MB   loss {mean_sd(full['losses'])}")
    print(f"speed-up: {ours_ips / ref_ips:.2f}x")


if __name__ == "__main__":
    main()
