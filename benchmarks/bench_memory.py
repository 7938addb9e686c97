"""Memory and time of `--gradient_checkpointing`: one training forward and backward pass (the loop's own loss and
network, built by `ddpm_hf.training.parts.build_model`) at the 256x256 preset (`ddpm-celebahq-256`, the paper's
CelebA-HQ and LSUN network, 113.7M parameters), with and without it, each in its own process so that its peak
memory is its own. Peak memory is how far the process's RSS rises above where it was during one pass (its peak RSS,
reset before the pass, Linux's /proc/self/clear_refs), after a first pass that is not measured: the weights and their
gradients are already there then, alike in both, so what it measures is what the pass keeps for its backward.

    python benchmarks/bench_memory.py                       # 256x256, batch 2, on the CPU
    python benchmarks/bench_memory.py --preset cpu-small --resolution 32 --batch_size 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def child(args) -> dict:
    import torch
    from accelerate import Accelerator

    from ddpm_hf.recipes.resolve import resolve_config
    from ddpm_hf.training.parts import build_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        config = resolve_config(dict(dataset="digits", unet_preset=args.preset, resolution=args.resolution, channels=3,
                                     output_dir=out, report_to="none", gradient_checkpointing=args.checkpointing))
        parts = build_model(config, Accelerator(cpu=True), total_steps=10)
    unet, loss = parts["raw_unet"], parts["loss"]
    unet.train()
    x0 = torch.rand(args.batch_size, 3, args.resolution, args.resolution) * 2 - 1
    seconds, peaks = [], []
    for _ in range(args.passes):
        noise, t = torch.randn_like(x0), torch.randint(0, 1000, (args.batch_size,))
        unet.zero_grad(set_to_none=False)  # after the first pass the gradients exist, in both variants alike
        before = _reset_peak()
        start = time.perf_counter()
        loss(lambda x, s: unet(x, s).sample, x0, noise, t).mean().backward()
        seconds.append(time.perf_counter() - start)
        peaks.append(_status_kib("VmHWM") - before)
    grads = torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None])
    return {"step_s": min(seconds[1:]), "peak_mib": max(peaks[1:]) / 1024,
            "params": sum(p.numel() for p in unet.parameters()), "grad_norm": float(grads.norm())}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """The RSS now, after resetting the process's peak RSS (VmHWM) to it (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-celebahq-256")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3, help="forward-backward passes; the first is not measured")
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = {}
    for on in (False, True):
        cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--resolution", str(args.resolution),
               "--batch_size", str(args.batch_size), "--passes", str(args.passes)] + (["--checkpointing"] if on else [])
        rows[on] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    off, on = rows[False], rows[True]
    print(f"{args.preset} ({off['params'] / 1e6:.1f}M parameters), {args.resolution}x{args.resolution}, batch "
          f"{args.batch_size}, fp32, one training forward+backward on the CPU:")
    print(f"{'':28s}{'peak memory of the pass':>26s}{'time of the pass':>20s}")
    for name, row in (("without checkpointing", off), ("--gradient_checkpointing", on)):
        print(f"{name:28s}{row['peak_mib']:>22.0f} MiB{row['step_s']:>18.2f} s")
    print(f"ratio (with / without): memory {on['peak_mib'] / off['peak_mib']:.2f}x, time {on['step_s'] / off['step_s']:.2f}x; "
          f"gradient norms {off['grad_norm']:.6g} and {on['grad_norm']:.6g}")


if __name__ == "__main__":
    main()
