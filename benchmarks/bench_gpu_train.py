"""Training steps/s of our loop's variants on the paper recipe (--preset ddpm-cifar10: the 35.7M UNet, batch 128,
32x32 RGB, dropout 0.1), for the table in the README's GPU section. Each variant runs in its own process and prints:
steady-state steps/s (the device synchronised at both ends of the timed steps), CUDA host synchronisations per timed
step (torch.cuda.set_sync_debug_mode), peak device memory, and the start-up (the first steps: cuDNN's choices, the
CUDA graph's capture, torch.compile's compilation).

    python benchmarks/bench_gpu_train.py                                  # every variant, random CIFAR-shaped images
    python benchmarks/bench_gpu_train.py --variants "graph bf16" "eager fp32"
    python benchmarks/bench_gpu_train.py --data cifar10_train.parquet     # any dataset train_ddpm.py takes
    python benchmarks/bench_gpu_train.py --preset digits-cpu --steps 20   # the quick start's run (also on a CPU)
    python benchmarks/bench_gpu_train.py --variants "graph bf16" --profile 15   # and where a step's time goes

On a CPU the graph variants are refused and run eagerly (the line says so): the figures there are the eager loop's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

VARIANTS = {  # name: settings of train_ddpm.py
    "eager fp32": dict(cuda_graph=False, mixed_precision="no"),
    "eager bf16": dict(cuda_graph=False, mixed_precision="bf16"),
    "graph fp32": dict(mixed_precision="no"),
    "graph bf16": dict(mixed_precision="bf16"),
    "graph bf16 channels_last": dict(mixed_precision="bf16", channels_last=True),
    "eager fp32 --compile": dict(cuda_graph=False, mixed_precision="no", compile=True),
}


def measure(args, settings: dict, out: Path) -> dict:
    import torch

    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.loop import release, resume, run_step, setup, start_step_graph
    from ddpm_hf.training.step_graph import graph_refusal

    warm, timed = args.warmup, args.steps
    config = resolve_config(dict(
        preset=args.preset, dataset=args.data, output_dir=str(out),
        checkpointing_steps=10**9, save_images_steps=10**9, logging_steps=10**9, report_to="none", **settings,
        max_train_steps=warm + timed + 5 * bool(args.profile),
    ))
    run = setup(config)
    cuda = run.device.type == "cuda"

    def synchronize():
        if cuda:
            torch.cuda.synchronize()

    try:
        resume(run)
        graph = start_step_graph(run)
        started = time.perf_counter()
        for step in range(warm):
            run_step(run, step, graph)
        synchronize()
        startup = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            started = time.perf_counter()
            for step in range(warm, warm + timed):
                run_step(run, step, graph)
            synchronize()
            seconds = time.perf_counter() - started
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        if args.profile:
            from bench_sample import profile_table  # the same table as the sampling benchmark's

            def profiled_steps():
                for step in range(warm + timed, warm + timed + 5):
                    run_step(run, step, graph)

            print(f"{args.child}: the {args.profile} ops that take the most time in 5 steps\n"
                  + profile_table(profiled_steps, run.device, args.profile))
        syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"steps_per_s": timed / seconds, "syncs_per_step": None if syncs is None else syncs / timed,
                "peak_mb": peak_mb, "startup_s": startup, "device": str(run.device),
                "graph": graph is not None and graph.replayed.graph is not None,
                "replay_difference": None if graph is None else graph.replayed.largest_difference,
                "refused": graph_refusal(config, run.device, run.accelerator.num_processes)
                or "the sync check, the capture or the first replay's check refused it (its warning says why)"}
    finally:
        release(run)


def random_cifar_like(folder: Path, n: int) -> str:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import make_dataset  # n random 32x32 RGB PNGs in a parquet file

    return str(make_dataset(folder, n, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--preset", default="ddpm-cifar10", help="train_ddpm.py's --preset (the model, batch and recipe)")
    parser.add_argument("--data", default=None, help="a dataset train_ddpm.py takes (default: 2048 random 32x32 images)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed ones (the start-up)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print each variant's N ops that take the most time in 5 more steps")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(measure(args, VARIANTS[args.child], Path(tmp) / "run")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or random_cifar_like(Path(tmp), 2048)
        print(f"{args.preset}, {args.steps} timed steps after {args.warmup}; data {args.data or 'random 32x32 RGB'}")
        print("| variant | steps/s | host syncs per step | peak memory MiB | start-up s |")
        print("|---|---|---|---|---|")
        profiles = []
        for name in args.variants:
            cmd = [sys.executable, __file__, "--child", name, "--preset", args.preset, "--data", data,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile", str(args.profile)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            profiles.append("\n".join(l for l in done.stdout.splitlines() if not l.startswith("RESULT ")))
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                print(f"| {name} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:150]} | | | |", flush=True)
                continue
            r = json.loads(line[7:])
            syncs = "n/a (CPU)" if r["syncs_per_step"] is None else f"{r['syncs_per_step']:.2f}"
            how = "" if r["graph"] or not name.startswith("graph") else f" (ran eagerly: {r['refused']})"
            if r.get("replay_difference") is not None:  # the self-check's measured difference (cuda_graphs.py)
                how += f" (first replay vs eager: {r['replay_difference']:.2g} relative)"
            print(f"| {name}{how} | {r['steps_per_s']:.1f} | {syncs} | {r['peak_mb']:.0f} | {r['startup_s']:.1f} |",
                  flush=True)
        for text in profiles if args.profile else ():
            print("\n" + text)


if __name__ == "__main__":
    main()
