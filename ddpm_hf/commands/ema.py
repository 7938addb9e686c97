"""`ddpm-ema RUN_DIR OUTPUT_DIR --sigma_rel ...` / `python -m ddpm_hf.commands.ema`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-ema RUN_DIR OUTPUT_DIR` / `python -m ddpm_hf.commands.ema`: post-hoc EMA (Karras et al. 2024). From the
    power-EMA snapshots of a run trained with --ema_posthoc, reconstruct the EMA of each --sigma_rel (its length
    relative to the training time) and write each as a pipeline plain diffusers loads (OUTPUT_DIR/sigma_rel-<σ>/, with
    posthoc_ema.json: the snapshots mixed and their weights); with --measure nll, measure each (and the run's own EMA)
    and write the sweep's table and plot (ema_sweep.md, ema_sweep.png). Resumable; shared over processes under
    `accelerate launch`."""
    from ddpm_hf.choices import SAMPLERS
    from ddpm_hf.measuring.ema_sweep import MEASURES, SWEEP_POINTS
    from ddpm_hf.paths import DINOV2_DEFAULT, INCEPTION_FILE

    parser = Parser(description=main.__doc__, prog="ddpm-ema")
    parser.add_argument("run_dir", help="the --output_dir of a run trained with --ema_posthoc")
    parser.add_argument("output_dir", help="where the pipelines (sigma_rel-<σ>/) and the sweep's results go")
    parser.add_argument("--sigma_rel", type=float, nargs="+", default=None,
                        help="the EMA lengths to reconstruct, relative to the training time (EDM2's presets: 0.015 to "
                             "0.19; the paper's decay 0.9999 at 800k steps is about 0.0125); default: "
                             f"{SWEEP_POINTS} spread over the range the run's snapshots express")
    parser.add_argument("--at_step", type=int, default=None, help="reconstruct the EMAs as of this snapshot's step "
                        "(default: the last snapshot)")
    parser.add_argument("--measure", choices=MEASURES, default=None, help="measure each pipeline (the run's own EMA "
                        "beside them): nll, the bits/dim bound on --dataset (as ddpm-nll); fid or fd_dinov2, the "
                        "Fréchet distance of --num_images samples to --reference (as ddpm-sample, then ddpm-metrics)")
    parser.add_argument("--keep", choices=("best",), default=None, help="best: make the best-measured pipeline the "
                        "run's published one (the weights its card shows and ddpm-push uploads), recorded in the "
                        "run's posthoc_ema.json; the run's fixed-decay EMA stays in its last checkpoint")
    parser.add_argument("--dataset", default=None, help="--measure nll's held-out images: anything train_ddpm.py "
                        "--dataset takes")
    parser.add_argument("--reference", default=None, help="--measure fid or fd_dinov2's real images, as ddpm-metrics "
                        "takes them (a folder, a dataset, or cleanfid:NAME:SPLIT:RES)")
    parser.add_argument("--split", default=None, help="the split of --dataset (default: test) or of --reference "
                        "(default: train)")
    parser.add_argument("--num_images", type=int, default=None, help="--measure nll's images (the first N of the "
                        "split), or the samples of each pipeline that fid and fd_dinov2 measure")
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--inception_weights", default=None, help=f"--measure fid: the path to {INCEPTION_FILE} "
                        "(default: as ddpm-metrics finds it)")
    parser.add_argument("--dinov2_model", default=DINOV2_DEFAULT, help="--measure fd_dinov2: the DINOv2 model (a Hub "
                        "id, cached ones work offline, or a save_pretrained folder)")
    parser.add_argument("--cache_dir", default=None, help="reference statistics and weights cache, as ddpm-metrics'")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="image k's noise comes from (seed, k), alike for every σ_rel")
    parser.add_argument("--overwrite", action="store_true", help="make the pipelines again from scratch in a folder "
                        "made from other snapshots or settings")
    args = parser.parse_args(argv)
    if args.keep and not args.measure:
        parser.error("--keep best needs --measure (the metric that says which is best)")
    if args.measure == "nll" and (args.dataset is None or args.num_images is None):
        parser.error("--measure nll needs --dataset and --num_images (the held-out images it measures on)")
    if args.measure in ("fid", "fd_dinov2") and (args.reference is None or args.num_images is None):
        parser.error(f"--measure {args.measure} needs --reference and --num_images (the real images, and how many "
                     "samples of each pipeline it compares with them)")
    if args.num_images is not None and args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images={args.num_images} and --batch_size={args.batch_size} must be at least 1")
    if args.sigma_rel and len(set(args.sigma_rel)) != len(args.sigma_rel):
        parser.error("--sigma_rel: give each value once")
    parser.check_sources(args)
    if args.measure in ("fid", "fd_dinov2"):  # the sampling's counts, before anything is made
        from ddpm_hf.outputs.run_folder import steps_problem
        from ddpm_hf.sampling.counts import count_problem

        problem = (count_problem(args.num_images, args.batch_size, args.num_inference_steps)
                   or steps_problem(args.run_dir, args.num_inference_steps))
        if problem:
            parser.error(problem)

    from pathlib import Path

    from ddpm_hf.measuring.ema_sweep import FEATURE_SPACE, measure_sweep, plan, value_text, write_pipelines
    from ddpm_hf.outputs.run_folder import EMA_SWEEP_TABLE

    planned = plan(Path(args.run_dir), args.sigma_rel and sorted(args.sigma_rel), args.at_step)  # every refusal, before torch loads
    measure = None
    network = None
    if args.measure == "nll":
        split = args.split or (None if Path(args.dataset).expanduser().exists() else "test")
        measure = {"metric": args.measure, "dataset": args.dataset, "split": split, "num_images": args.num_images,
                   "batch_size": args.batch_size, "seed": args.seed}
    elif args.measure:
        measure = {"metric": args.measure, "reference": args.reference, "split": args.split or "train",
                   "num_images": args.num_images, "batch_size": args.batch_size, "seed": args.seed,
                   "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps}
    from ddpm_hf.devices import distributed_state

    state = distributed_state()
    if args.measure in FEATURE_SPACE:  # the feature network first: missing weights fail before any pipeline is made
        from ddpm_hf.measuring.folder_metrics import feature_network

        network = feature_network(FEATURE_SPACE[args.measure], state.device, args.inception_weights,
                                  args.dinov2_model, args.cache_dir)
    folders = write_pipelines(planned, Path(args.output_dir), state, args.overwrite, measure)
    if state.is_main_process:
        for sigma, folder in zip(planned["solved"], folders):
            print(f"σ_rel {sigma:g}: {folder} (profile error {planned['solved'][sigma]['relative_error']:.2%})")
    if measure is None:
        return 0
    sweep = measure_sweep(planned, Path(args.output_dir), folders, measure, state,
                          notify=lambda note: print(f"note: {note}.", file=sys.stderr), network=network)
    if sweep is not None:
        best = sweep["best"]
        fixed = sweep["fixed_ema"]
        beside = f"; {fixed['label']}: {fixed['value']:.4f}" if fixed else ""
        print(f"best: σ_rel {best['sigma_rel']:g} at {value_text(best)} ({sweep['metric']}){beside} "
              f"({Path(args.output_dir) / EMA_SWEEP_TABLE})")
        if args.keep == "best":
            from ddpm_hf.publishing.posthoc_ema import publish_best

            publish_best(Path(args.run_dir), Path(args.output_dir), sweep)
            print(f"{args.run_dir}: its published pipeline is now the post-hoc EMA of σ_rel {best['sigma_rel']:g} "
                  "(posthoc_ema.json; the card says so)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
