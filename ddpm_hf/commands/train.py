"""`train_ddpm.py` / `ddpm-train`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.running import command, configure_logging


@command(memory_hint="lower --batch_size; --gradient_accumulation_steps N keeps the batch that each step "
                     "averages over while holding 1/N of it in memory")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from ddpm_hf.commands.train_flags import parse_args

    config, options = parse_args(argv)
    if options.dry_run:
        from ddpm_hf.training.parts import make_unet, resolve_classes

        config = resolve_classes(config)
        n = sum(p.numel() for p in make_unet(config).parameters())
        print(config.to_json())
        print(f"UNet parameters: {n:,}")
        return 0
    from ddpm_hf.training.loop import train

    configure_logging()
    train(config, hub_token=options.hub_token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
