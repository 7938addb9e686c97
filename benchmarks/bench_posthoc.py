"""The training step's cost with --ema_posthoc (two power EMAs tracked beside the usual EMA) against without it, in the
quick start's shape (--preset digits-cpu: the cpu-digits UNet, 16x16, batch 64), and what a snapshot costs to write.

Each run trains in its own process; the settings are interleaved over --repeats rounds, so that a change in the
machine's load falls on both. Step times come from the run's own history (the training clock, which leaves out the
periodic work: checkpoints, grids and the snapshots themselves, timed apart here from the log of the run that writes
them). The thread count is fixed (DDPM_HF_CPU_THREADS, default 2), so that the CPU governor's choices do not differ
between runs.

    python benchmarks/bench_posthoc.py                  # 150 steps, 3 rounds
    python benchmarks/bench_posthoc.py --steps 300 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, sys, time
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training import loop
written = []
write = loop.write_snapshots
def timed(*args):
    start = time.perf_counter()
    out = write(*args)
    written.append(time.perf_counter() - start)
    return out
loop.write_snapshots = timed
config = resolve_config(dict(json.loads(sys.argv[1])))
loop.train(config)
state = json.load(open(sorted(__import__("glob").glob(config.output_dir + "/checkpoint-*/trainer_state.json"))[-1]))
laps = [(h["seconds"], h["step"]) for h in state["history"]]
print(json.dumps({"laps": laps, "snapshot_seconds": written}))
"""


def run(settings: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUN, json.dumps(settings)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def seconds_per_step(laps: list) -> float:
    """The median seconds per step over the logged laps after the first (which holds the warm-up)."""
    steps = [b[1] - a[1] for a, b in zip(laps, laps[1:])]
    return statistics.median(s / n for (s, _), n in zip(laps[1:], steps) if n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="2", help="DDPM_HF_CPU_THREADS for every run")
    args = parser.parse_args()
    env = {**os.environ, "DDPM_HF_CPU_THREADS": args.threads}
    variants = {"without": {}, "--ema_posthoc": {"ema_posthoc": True, "ema_posthoc_every": 25}}
    measured = {name: [] for name in variants}
    snapshot_seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in variants.items():
                settings = {"preset": "digits-cpu", "max_train_steps": args.steps, "logging_steps": 10,
                            "checkpointing_steps": args.steps, "save_images_steps": 10 ** 6, "card_figures": False,
                            "mixed_precision": "no", "report_to": "none",
                            "output_dir": str(Path(tmp) / f"{r}-{len(extra)}"), **extra}
                result = run(settings, env)
                measured[name].append(seconds_per_step(result["laps"]))
                snapshot_seconds += result["snapshot_seconds"]
                print(f"round {r + 1} {name}: {1 / measured[name][-1]:.2f} steps/s", flush=True)
    base = statistics.median(measured["without"])
    print(f"\n{args.steps} steps of --preset digits-cpu (fp32), DDPM_HF_CPU_THREADS={args.threads}, "
          f"medians of {args.repeats} interleaved runs")
    print("| setting | steps/s | s/step | cost |\n|---|---|---|---|")
    for name, values in measured.items():
        m = statistics.median(values)
        print(f"| {name} | {1 / m:.2f} | {m:.4f} | {m / base:.3f}x |")
    if snapshot_seconds:
        print(f"\na snapshot of both power EMAs (fp16): median {statistics.median(snapshot_seconds) * 1000:.1f} ms "
              f"over {len(snapshot_seconds)} writes")


if __name__ == "__main__":
    main()
