"""`ddpm-evaluate PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.commands.evaluate`: see `main`."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command, load_for_command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-evaluate PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.commands.evaluate`: a published protocol in one command
    (default ddpm-cifar10, the paper's Table 1): samples (resumable, shared under `accelerate launch`), FID and IS in
    clean-fid's legacy_tensorflow and clean modes, NLL in bits/dim on the held-out split, and evaluation.json and
    evaluation.md with the published figures beside them. Smaller counts are allowed and written into the report."""
    from ddpm_hf.choices import FID_MODES, SAMPLING_DTYPES
    from ddpm_hf.measuring.evaluation import PROTOCOLS
    from ddpm_hf.paths import INCEPTION_FILE

    parser = Parser(description=main.__doc__, prog="ddpm-evaluate")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id "
                        "(e.g. google/ddpm-cifar10-32)")
    parser.add_argument("output_dir", help="where the samples, metrics, bound and report go")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="ddpm-cifar10", help="ddpm-cifar10 (Table 1), "
                        "ddpm-lsun-church/bedroom/cat (Table 3, 256x256), ddpm-celebahq-256 (no published number)")
    parser.add_argument("--num_images", type=int, default=None, help="samples for FID and IS (default: the protocol's, "
                        "50,000)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="steps of the chain (default: the "
                        "protocol's, 1000; a pipeline ddpm-distill made: the steps it was distilled for)")
    parser.add_argument("--reference", default=None, help="the FID reference, as ddpm-metrics takes it (default: the "
                        "protocol's: cifar10; the LSUN and CelebA-HQ protocols name the set to pass)")
    parser.add_argument("--reference_split", default=None, help="the --reference dataset's split (default: train)")
    parser.add_argument("--nll_dataset", default=None, help="the held-out images, as ddpm-nll takes them (default: cifar10)")
    parser.add_argument("--nll_split", default=None, help="the --nll_dataset's split (default: test)")
    parser.add_argument("--nll_images", type=int, default=None, help="images for the bound, 0 to skip it (default: "
                        "the protocol's, 10,000)")
    parser.add_argument("--modes", nargs="+", choices=FID_MODES, default=None, help="clean-fid modes (default: "
                        "legacy_tensorflow clean)")
    parser.add_argument("--guidance_scales", default=None, help="a class-conditional pipeline: the guidance scales w to "
                        "evaluate, comma-separated (e.g. 0,0.5,1,2,4; default: 1), each on class-balanced samples, with FID "
                        "against IS in guidance.png")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision when sampling")
    parser.add_argument("--seed", type=int, default=0, help="sample k from seed + k; the bound's image k from (seed, k)")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--cache_dir", default=None, help="reference statistics and weights cache")
    parser.add_argument("--fid_se_rounds", type=int, default=None, help="bootstrap resamplings of the samples for FID's "
                        "standard error, 0 to skip it (default: the protocol's, 10; each costs about one FID)")
    parser.add_argument("--overwrite", action="store_true", help="start again in a folder evaluated with other settings")
    args = parser.parse_args(argv)
    scales = None
    if args.guidance_scales is not None:
        try:
            scales = [float(w) for w in args.guidance_scales.split(",")]
        except ValueError:
            parser.error(f"--guidance_scales {args.guidance_scales!r}: give comma-separated numbers, e.g. 0,1,2,4")
    if args.seed < 0 or args.batch_size < 1:
        parser.error(f"--seed {args.seed} must be at least 0 and --batch_size {args.batch_size} at least 1")

    parser.check_sources(args)
    from ddpm_hf.devices import distributed_state
    from ddpm_hf.measuring.evaluation import check_data, evaluate_pipeline, evaluation_files, evaluation_started, settings
    from ddpm_hf.outputs.folder_jobs import FolderJob
    from ddpm_hf.outputs.run_folder import EVALUATION
    from ddpm_hf.measuring.folder_metrics import feature_network
    from ddpm_hf.sampling.samplers import network_dtype

    chosen = settings(args.protocol, num_images=args.num_images, num_inference_steps=args.num_inference_steps,
                      reference=args.reference, reference_split=args.reference_split, nll_dataset=args.nll_dataset,
                      nll_split=args.nll_split, nll_images=args.nll_images, modes=args.modes,
                      fid_se_rounds=args.fid_se_rounds, guidance_scales=scales)
    state = distributed_state()
    network_dtype(args.dtype, state.device)
    # the report is written last: its stages' own records (the samples' sampling.json first) mark the folder ours
    with FolderJob(args.output_dir, EVALUATION, None, state, results=evaluation_files, ours=evaluation_started,
                   results_are="files named as ddpm-evaluate's results", leaves_lock=False) as job:
        job.check("an evaluation", "", args.overwrite)  # locked, links and files not ours refused: before any work
        # before any sampling: the Inception weights and the data, each missing one a line now rather than hours later
        network = feature_network("inception", state.device, args.inception_weights, cache_dir=args.cache_dir)
        check_data(chosen)
        load = functools.partial(load_for_command, args.pipeline, state.device)
        pipe = load()
        job.start()
        report = evaluate_pipeline(pipe, reload=load, pipeline_name=args.pipeline, folder=args.output_dir, chosen=chosen,
                                   network=network, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
                                   cache_dir=args.cache_dir, overwrite=args.overwrite, state=state,
                                   notify=lambda note: print(f"note: {note}.", file=sys.stderr))
    if report is not None:
        from ddpm_hf.outputs.run_folder import EVALUATION_TABLE

        print((Path(args.output_dir) / EVALUATION_TABLE).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
