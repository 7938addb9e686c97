"""What a Hub push costs the training loop: the main-thread work of a `--hub_push_every` push (saving the
EMA pipeline, the card, the hard-link snapshot, handing it to the upload thread) against the upload itself,
which runs in the background; and the training step time while an upload is running (the upload thread
shares the CPU and the GIL with the loop). Uses the paper's CIFAR-10 UNet (35.7M parameters, 143 MB of
safetensors) as what is pushed, the `cpu-small` UNet as the loop, and the Hub-compatible test server
(tests/hub_server.py) in its own process on 127.0.0.1, with an optional delay per commit for a slow link.

    python benchmarks/bench_push.py                    # ddpm-cifar10-32, no added delay
    python benchmarks/bench_push.py --commit_delay 5   # the Hub takes 5 s more per commit
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.publishing.hub import HubPusher, snapshot
from ddpm_hf.publishing.model_card import write_model_card
from ddpm_hf.saved.weights import save_pipeline
from ddpm_hf.recipes.resolve import resolve_config

HUB_SERVER = Path(__file__).resolve().parents[1] / "tests" / "hub_server.py"


def training_steps(unet, optimizer, batch: torch.Tensor, until=None, n: int = 10) -> list:
    """Seconds per training step (ε-prediction MSE, Adam) for n steps, or while `until()` is false."""
    times = []
    while (until is not None and not until()) or (until is None and len(times) < n):
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch.shape[0],))
        loss = torch.nn.functional.mse_loss(unet(batch, t).sample, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet_preset", default="ddpm-cifar10-32", help="the model that is pushed")
    parser.add_argument("--commit_delay", type=float, default=0.0, help="seconds the test Hub waits before each commit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from huggingface_hub import constants

    token = "hf_benchmarkToken"
    server = subprocess.Popen([sys.executable, str(HUB_SERVER), token, "bench", str(args.commit_delay)],
                              stdout=subprocess.PIPE, text=True)
    try:
        constants.ENDPOINT = server.stdout.readline().strip()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            resolve_config({"unet_preset": args.unet_preset, "output_dir": tmp, "push_to_hub": True}).save(folder)
            Image.new("RGB", (274, 274)).save(folder / "samples.png")
            Image.new("RGB", (640, 480)).save(folder / "loss_curve.png")
            pipe = DDPMPipeline(unet=build_unet(args.unet_preset), scheduler=DDPMScheduler())
            n_params = sum(p.numel() for p in pipe.unet.parameters())
            pusher = HubPusher("bench-push", token=token)

            loop_unet = build_unet("cpu-small", sample_size=32)
            optimizer = torch.optim.Adam(loop_unet.parameters(), lr=1e-4)
            batch = torch.randn(32, 3, 32, 32)
            training_steps(loop_unet, optimizer, batch, n=3)  # warm up

            saves, hand_overs, uploads, quiet, busy = [], [], [], [], []
            for i in range(args.repeats):
                quiet += training_steps(loop_unet, optimizer, batch, n=10)
                start = time.perf_counter()
                save_pipeline(pipe, folder)
                write_model_card(folder, pusher.repo_id, progress=(i + 1, args.repeats + 1))
                saved = time.perf_counter()
                future = pusher.push_in_background(folder, f"step {i + 1}")
                handed_over = time.perf_counter()
                busy += training_steps(loop_unet, optimizer, batch, until=future.done)
                future.result()
                uploads.append(time.perf_counter() - handed_over)
                saves.append(saved - start)
                hand_overs.append(handed_over - saved)
            start = time.perf_counter()
            snapshot_dir = snapshot(folder)
            snap = time.perf_counter() - start
            size = sum(p.stat().st_size for p in snapshot_dir.rglob("*") if p.is_file())
            pusher.close()
    finally:
        server.kill()

    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    delay = f", +{args.commit_delay:g} s per commit" if args.commit_delay else ""
    print(f"pushed: {args.unet_preset}, {n_params / 1e6:.1f}M parameters, {size / 1e6:.1f} MB per push")
    print(f"main thread per push: save EMA pipeline + card {median(saves) * 1000:.0f} ms, "
          f"snapshot + hand-over {median(hand_overs) * 1000:.1f} ms (snapshot alone {snap * 1000:.1f} ms)")
    print(f"background upload per push: {median(uploads):.2f} s (test Hub on 127.0.0.1{delay})")
    lost = (sum(busy) - len(busy) * median(quiet)) / args.repeats
    print(f"training step (cpu-small, batch 32): {median(quiet) * 1000:.0f} ms without an upload, "
          f"{median(busy) * 1000:.0f} ms while one runs ({len(busy) / args.repeats:.1f} steps per upload)")
    print(f"loop time lost per push: {lost:.2f} s in the background (the loop keeps going, slower while the upload "
          f"shares the CPU) against {median(uploads):.2f} s stopped for a synchronous push")


if __name__ == "__main__":
    main()
