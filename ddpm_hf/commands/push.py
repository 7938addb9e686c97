"""`ddpm-push OUTPUT_DIR --hub_model_id ID`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-push OUTPUT_DIR --hub_model_id ID`: publish a run's output folder on the Hub: the pipeline,
    the model card (rewritten for the repo), sample grids, metrics.json, training_config.json and the loss
    curve; never checkpoints, optimizer state or logs."""
    from ddpm_hf.outputs.run_folder import PUBLISHED

    parser = Parser(description=main.__doc__, epilog="Uploaded paths: " + ", ".join(PUBLISHED), prog="ddpm-push")
    parser.add_argument("output_dir", help="the folder of a training run to upload")
    parser.add_argument("--hub_model_id", default=None, help="'name' (under your account) or 'namespace/name' (default: the folder's name)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the `hf auth login` token; never printed")
    parser.add_argument("--push_snapshots", action="store_true", help="also upload the run's post-hoc EMA snapshots "
                        "(ema_snapshots/, from --ema_posthoc), so that others can reconstruct EMAs of their own "
                        "lengths with ddpm-ema")
    parser.add_argument("--commit_message", default="Upload DDPM pipeline with ddpm_hf", help="the Hub commit's message")
    args = parser.parse_args(argv)

    from ddpm_hf.publishing.hub import push_output_folder

    url, commit = push_output_folder(args.output_dir, repo_id=args.hub_model_id, token=args.hub_token,
                                     private=args.hub_private_repo, commit_message=args.commit_message,
                                     snapshots=args.push_snapshots)
    print(f"pushed {args.output_dir} to {url} (commit {commit.oid[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
