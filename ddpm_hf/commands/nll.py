"""`ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` / `python -m ddpm_hf.commands.nll`: see `main`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command, load_for_command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` / `python -m ddpm_hf.commands.nll`: the variational bound of
    a pipeline in bits/dim (prior, KL and decoder terms) on a dataset split or a folder of images; resumable, and
    shared over processes under `accelerate launch`; writes nll.json with the protocol and nll_terms.png."""
    from ddpm_hf.choices import SAMPLING_DTYPES

    parser = Parser(description=main.__doc__, prog="ddpm-nll")
    parser.add_argument("pipeline")
    parser.add_argument("output_dir", help="where the per-image results, nll.json and nll_terms.png go")
    parser.add_argument("--dataset", required=True, help="anything train_ddpm.py --dataset takes: cifar10, a Hub id, "
                        "a folder of images, .parquet/.arrow files")
    parser.add_argument("--split", default=None, help="the dataset's split (default: test for a Hub dataset and the "
                        "built-in digits; local files and folders are one set, measured whole)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None, help="a class-conditional pipeline's labels, measured given each "
                        "image's class (default: the dataset's ClassLabel column)")
    parser.add_argument("--num_images", type=int, required=True, help="the first N images of the split")
    parser.add_argument("--batch_size", type=int, default=64, help="images per network call (T calls per batch)")
    parser.add_argument("--seed", type=int, default=0, help="image k's noise comes from (seed, k)")
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision (the bound's "
                        "arithmetic stays float64); bf16 or fp16 are faster on a GPU, fp16 only there")
    parser.add_argument("--clip_denoised", action=argparse.BooleanOptionalAction, default=True, help="clip x̂_0 to [-1, 1]")
    parser.add_argument("--output", default=None, help="where to write nll.json (default: in OUTPUT_DIR), e.g. a run's "
                        "folder, whose model card then shows it")
    parser.add_argument("--overwrite", action="store_true", help="measure again from scratch in a folder measured with other settings")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images={args.num_images} and --batch_size={args.batch_size} must be at least 1")

    parser.check_sources(args)
    from ddpm_hf.devices import distributed_state
    from ddpm_hf.measuring.nll_folder import measure
    from ddpm_hf.sampling.samplers import network_dtype

    if args.split is None and not Path(args.dataset).expanduser().exists():
        args.split = "test"  # the held-out images of a Hub dataset or the built-in digits
    state = distributed_state()
    network_dtype(args.dtype, state.device)  # refused before loading anything
    pipe = load_for_command(args.pipeline, state.device)
    summary = measure(pipe, pipeline_name=args.pipeline, folder=args.output_dir, dataset=args.dataset,
                      num_images=args.num_images, split=args.split, batch_size=args.batch_size, seed=args.seed,
                      clip_denoised=args.clip_denoised, dataset_config=args.dataset_config,
                      image_column=args.image_column, overwrite=args.overwrite, output=args.output, state=state,
                      label_column=args.label_column,
                      notify=lambda note: print(f"note: {note}.", file=sys.stderr), dtype=args.dtype)
    if summary is not None:
        bpd = summary["bits_per_dim"]
        print(f"NLL bound: {bpd['total']['mean']:.4f} ± {bpd['total']['sem']:.4f} bits/dim on {args.num_images} images "
              f"(prior {bpd['prior']['mean']:.4f}, KL {bpd['kl']['mean']:.4f}, decoder {bpd['decoder']['mean']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
