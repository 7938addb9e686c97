"""How fast the command lines answer: the wall time of `--help` and of a usage error for each command, each in a
fresh process (the interpreter's start included), median of 3. The target is under 2 s: parsing imports no torch.

    python benchmarks/bench_cli.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "train_ddpm.py": [sys.executable, str(REPO / "train_ddpm.py")],
    "ddpm-sample": [sys.executable, "-m", "ddpm_hf.commands.sample"],
    "ddpm-metrics": [sys.executable, "-m", "ddpm_hf.commands.metrics"],
    "ddpm-nll": [sys.executable, "-m", "ddpm_hf.commands.nll"],
    "ddpm-visualize": [sys.executable, "-m", "ddpm_hf.commands.visualize"],
    "ddpm-push": [sys.executable, "-m", "ddpm_hf.commands.push"],
    "ddpm-card": [sys.executable, "-c", "import sys; from ddpm_hf.commands.cli import card_main; sys.exit(card_main())"],
}


def seconds(cmd: list) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"{'command':14s} {'--help':>8s} {'usage error':>12s}")
    worst = 0.0
    for name, cmd in COMMANDS.items():
        help_s, error_s = seconds(cmd + ["--help"]), seconds(cmd + ["--no_such_flag"])
        worst = max(worst, help_s, error_s)
        print(f"{name:14s} {help_s:7.2f}s {error_s:11.2f}s")
    print(f"slowest: {worst:.2f} s (target: under 2 s)")


if __name__ == "__main__":
    main()
