"""CPU speed under load: the quick start's training step and ddpm-sample's chain, idle and beside busy programs, with
torch's default threads (the old setting), one thread, and ddpm_hf's choice (`ddpm_hf.cpu_threads`: the count follows
the load, timing all threads against one now and then).

Each measurement is a fresh process running the real command (`train_ddpm.py --preset digits-cpu` with fp32 and no
figures; `ddpm-sample` on a random pipeline of the quick start's shape), so the OpenMP runtime reads the environment
the way a user's command does. A competitor is a Python process spinning on one core (`while True: pass`), as a busy
browser tab or IDE is; 0, 1 and 2 of them run beside each measurement.

    python benchmarks/bench_threads.py                     # training and sampling, 0/1/2 competitors
    python benchmarks/bench_threads.py --steps 30 --competitors 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: the environment it adds (ddpm_hf.cpu_threads reads DDPM_HF_CPU_THREADS)
    "torch default (old)": {"DDPM_HF_CPU_THREADS": "torch"},
    "one thread": {"DDPM_HF_CPU_THREADS": "1"},
    "ddpm_hf (new)": {},
}
SPIN = "while True: pass"


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                        "DDPM_HF_CPU_THREADS")}
    return {**env, **extra}


def train_rate(env: dict, steps: int, warmup: int) -> float:
    """Training steps/s over the steps after `warmup`, from the per-step wall times the run records."""
    with tempfile.TemporaryDirectory() as tmp:
        total = warmup + steps
        cmd = [sys.executable, str(ROOT / "train_ddpm.py"), "--preset", "digits-cpu", "--mixed_precision", "no",
               "--max_train_steps", str(total), "--logging_steps", "1", "--checkpointing_steps", str(total),
               "--save_images_steps", str(10 ** 6), "--no-card_figures", "--report_to", "none",
               "--lr_warmup_steps", "0", "--output_dir", str(Path(tmp) / "run")]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        state = json.loads((Path(tmp) / "run" / f"checkpoint-{total}" / "trainer_state.json").read_text())
        timed = state["history"][-steps:]
        return steps / sum(h["seconds"] for h in timed)


def make_pipeline(folder: Path) -> Path:
    """A random pipeline of the quick start's shape (the digits-cpu UNet, 16x16, one channel)."""
    code = ("import sys; from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet;"
            "pipe = DDPMPipeline(unet=build_unet('cpu-digits', sample_size=16, in_channels=1), scheduler=DDPMScheduler());"
            "pipe.save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(folder)], check=True, capture_output=True, text=True)
    return folder


def sample_rate(env: dict, pipeline: Path, images: int, steps: int) -> float:
    """Chain steps/s of `ddpm-sample` (one batch of `images`), the command's start included."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "ddpm_hf.commands.sample", str(pipeline), str(Path(tmp) / "out"),
               "--num_images", str(images), "--num_inference_steps", str(steps)]
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sample_steps", type=int, default=100, help="chain steps of ddpm-sample")
    parser.add_argument("--sample_images", type=int, default=64)
    parser.add_argument("--competitors", default="0,1,2", help="numbers of busy processes, comma-separated")
    parser.add_argument("--only", choices=("train", "sample"), default=None)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each cell (the median is shown)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=VAR=VALUE[,VAR=VALUE]",
                        help="another setting to measure, e.g. 'spin 10k=GOMP_SPINCOUNT=10000'")
    args = parser.parse_args()
    counts = [int(c) for c in args.competitors.split(",")]
    for also in args.also:
        name, assignments = also.split("=", 1)
        SETTINGS[name] = dict(pair.split("=", 1) for pair in assignments.split(","))
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores; {args.steps} training steps of the quick start "
          f"(digits-cpu, fp32), ddpm-sample {args.sample_images} images x {args.sample_steps} steps")
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = make_pipeline(Path(tmp) / "pipe") if args.only != "train" else None
        jobs = [("train", "steps/s", lambda env: train_rate(env, args.steps, args.warmup)),
                ("ddpm-sample", "chain steps/s", lambda env: sample_rate(env, pipeline, args.sample_images, args.sample_steps))]
        for what, unit, measure in jobs:
            if args.only and not what.endswith(args.only):
                continue
            print(f"\n{what} ({unit}, median of {args.repeats})" + "".join(f"{n} busy".rjust(12) for n in counts))
            runs = {name: {n: [] for n in counts} for name in SETTINGS}
            for _ in range(args.repeats):  # the settings interleaved, so that a slow spell of the machine hits all
                for n in counts:
                    for name, extra in SETTINGS.items():
                        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]
                        try:
                            runs[name][n].append(measure(clean_env(extra)))
                        finally:
                            for p in spinners:
                                p.kill()
                                p.wait()
            rows = {name: [statistics.median(runs[name][n]) for n in counts] for name in SETTINGS}
            for name in SETTINGS:
                every = "; ".join(", ".join(f"{r:.2f}" for r in runs[name][n]) for n in counts)
                print(f"{name:22s}" + "".join(f"{r:12.2f}" for r in rows[name]) + (f"   (runs: {every})" if args.repeats > 1 else ""),
                      flush=True)
            old, new = rows["torch default (old)"], rows["ddpm_hf (new)"]
            print(f"{'new / old':22s}" + "".join(f"{b / a:11.2f}x" for a, b in zip(old, new)))


if __name__ == "__main__":
    main()
