"""`ddpm-card OUTPUT_DIR`: see `main`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command
from ddpm_hf.errors import MissingError


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-card OUTPUT_DIR`: (re)write the model card README.md of a run's output folder, e.g. after
    `ddpm-metrics ... --output OUTPUT_DIR/metrics.json`."""
    parser = Parser(description=main.__doc__, prog="ddpm-card")
    parser.add_argument("output_dir", help="the folder of a training run, whose README.md is rewritten")
    parser.add_argument("--repo_id", default=None, help="the Hub repo id to show in the usage snippet")
    args = parser.parse_args(argv)
    from ddpm_hf.outputs.files import refuse_links
    from ddpm_hf.publishing.model_card import write_model_card
    from ddpm_hf.outputs.run_folder import TRAINING_CONFIG

    if not (Path(args.output_dir) / TRAINING_CONFIG).is_file():
        raise MissingError(f"{args.output_dir} has no {TRAINING_CONFIG}; give the output folder of a training run.")
    refuse_links(Path(args.output_dir), "ddpm-card")
    print(f"wrote {write_model_card(args.output_dir, args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
