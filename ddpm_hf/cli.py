"""Command-line entry points (thin: parse, then call the library)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from .config import parse_args
    from .data import BadImageError, DatasetUnavailableError

    try:
        config, dry_run = parse_args(argv)
    except ValueError as e:
        return _fail(str(e))
    if dry_run:
        from .training import make_unet

        n = sum(p.numel() for p in make_unet(config).parameters())
        print(config.to_json())
        print(f"UNet parameters: {n:,}")
        return 0
    from .training import NonFiniteLossError, train

    try:
        train(config)
    except (DatasetUnavailableError, BadImageError, NonFiniteLossError) as e:
        return _fail(str(e), 1)
    return 0
