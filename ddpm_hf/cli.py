"""Command-line entry points (thin: parse, then call the library).

Every command reports an error as one line on stderr (`error: ...`), exits 1 (2 for a usage error) and shows no
traceback: `--debug` or DDPM_HF_DEBUG=1 shows it. Under `accelerate launch` a message that several processes
share is printed once. Parsing needs no torch, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .arguments import DEBUG_ENV, Parser, emit_error

# Errors a user can act on; anything else is a bug in ddpm_hf and is said to be one.
USER_ERRORS = (ValueError, OSError, RuntimeError, ImportError)


def command(main):
    """Run `main(argv)`; report any exception as one line (the traceback with --debug or DDPM_HF_DEBUG=1)."""

    @functools.wraps(main)
    def wrapper(argv: Optional[Sequence[str]] = None) -> int:
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        try:
            return main([a for a in argv if a != "--debug"])
        except KeyboardInterrupt:
            emit_error("interrupted")
            return 130
        except Exception as e:
            if debug:
                raise
            if isinstance(e, USER_ERRORS):
                emit_error(str(e) or type(e).__name__)
            else:
                emit_error(f"internal error ({type(e).__name__}: {e}); run again with --debug for the traceback and "
                           "report it, please")
            return 1

    return wrapper


def configure_logging() -> None:
    """INFO lines with time and source on stderr; no line per HTTP request (huggingface_hub's client logs each)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def quiet_loading() -> None:
    """No progress bar for loading a pipeline's two components: commands show their own progress."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def distributed_state():
    from accelerate import PartialState

    from .training import accelerator_available

    return PartialState(cpu=not accelerator_available())


@command
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from .config import parse_args

    config, options = parse_args(argv)
    if options.dry_run:
        from .training import make_unet

        n = sum(p.numel() for p in make_unet(config).parameters())
        print(config.to_json())
        print(f"UNet parameters: {n:,}")
        return 0
    from .training import train

    configure_logging()
    train(config, hub_token=options.hub_token)
    return 0


@command
def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-sample` / `python -m ddpm_hf.sample`: draw N images from a pipeline into a folder (resumable;
    under `accelerate launch` the processes share the work). The folder records how its images were drawn
    (sampling.json: the weights' SHA-256, sampler, steps, eta, seed); a rerun with other settings is refused."""
    from .choices import SAMPLERS

    parser = Parser(description=sample_main.__doc__, prog="ddpm-sample")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the PNGs go ({k:06d}-seed{seed+k}.png)")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k")
    parser.add_argument("--overwrite", action="store_true", help="draw again from scratch in a folder drawn with other settings")
    args = parser.parse_args(argv)

    from .pipelines.pipeline_ddpm import DDPMPipeline
    from .sampling import sample_command

    state = distributed_state()
    quiet_loading()
    pipe = DDPMPipeline.from_pretrained(args.pipeline).to(state.device)
    result = sample_command(pipe, args.pipeline, args.output_dir, args.num_images, args.batch_size, args.scheduler,
                            args.num_inference_steps, args.eta, args.seed, args.overwrite, state)
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing to draw"
    print(f"process {state.process_index}: wrote {result['written']}, kept {result['kept']} already complete; {rate}")
    return 0


@command
def metrics_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-metrics`: FID (clean-fid), KID and Inception Score of a folder of samples against a reference
    folder or dataset split; writes metrics.json with the protocol."""
    from .choices import FID_MODES
    from .paths import CACHE_ENV, INCEPTION_FILE

    parser = Parser(description=metrics_main.__doc__, prog="ddpm-metrics")
    parser.add_argument("samples", nargs="?", help="folder of generated images (e.g. from ddpm-sample)")
    parser.add_argument("--reference", help="a folder of images; a dataset as for train_ddpm.py --dataset (cifar10, a Hub id, parquet "
                        "files); or clean-fid's precomputed statistics, cleanfid:NAME:SPLIT:RES (e.g. cleanfid:cifar10:train:32)")
    parser.add_argument("--split", default="train", help="the reference dataset's split")
    parser.add_argument("--resolution", type=int, default=None, help="reference images are resized/cropped to this (the samples' size)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid's resizing protocol")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--cache_dir", default=None, help=f"reference statistics and weights cache (default: ${CACHE_ENV}, "
                        "else ~/.cache/ddpm_hf)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True, help="Kernel Inception Distance")
    parser.add_argument("--is", dest="isc", action=argparse.BooleanOptionalAction, default=True, help="Inception Score")
    parser.add_argument("--output", default=None, help="where to write metrics.json (default: in the samples folder)")
    parser.add_argument("--download_inception", action="store_true", help="fetch the Inception weights into the cache and exit")
    args = parser.parse_args(argv)

    from .evaluation import download_inception, evaluate_folder, inception_network, resolve_inception_weights

    if args.download_inception:
        try:
            print(f"saved {download_inception(args.cache_dir)}")
        except OSError as e:
            raise OSError(f"could not download the Inception weights ({e}); copy {INCEPTION_FILE} from a machine with "
                          "internet and pass --inception_weights.") from None
        return 0
    if not args.samples or not args.reference:
        parser.error("give the samples folder and --reference")
    weights = resolve_inception_weights(args.inception_weights, args.cache_dir)  # first: fail before any work
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = evaluate_folder(args.samples, args.reference, inception_network(weights, device), args.mode, args.cache_dir,
                             args.split, args.resolution, args.channels, kid=args.kid, isc=args.isc,
                             output=args.output, batch_size=args.batch_size, device=device)
    print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=2))
    return 0


@command
def nll_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` / `python -m ddpm_hf.nll`: the variational bound of
    a pipeline in bits/dim (prior, KL and decoder terms) on a dataset split or a folder of images; resumable, and
    shared over processes under `accelerate launch`; writes nll.json with the protocol and nll_terms.png."""
    parser = Parser(description=nll_main.__doc__, prog="ddpm-nll")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the per-image results, nll.json and nll_terms.png go")
    parser.add_argument("--dataset", required=True, help="anything train_ddpm.py --dataset takes: cifar10, a Hub id, "
                        "a folder of images, .parquet/.arrow files")
    parser.add_argument("--split", default="test", help="the dataset's split (local files have one)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--num_images", type=int, required=True, help="the first N images of the split")
    parser.add_argument("--batch_size", type=int, default=64, help="images per network call (T calls per batch)")
    parser.add_argument("--seed", type=int, default=0, help="image k's noise comes from (seed, k)")
    parser.add_argument("--clip_denoised", action=argparse.BooleanOptionalAction, default=True, help="clip x̂_0 to [-1, 1]")
    parser.add_argument("--output", default=None, help="where to write nll.json (default: in OUTPUT_DIR), e.g. a run's "
                        "folder, whose model card then shows it")
    parser.add_argument("--overwrite", action="store_true", help="measure again from scratch in a folder measured with other settings")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error(f"--num_images={args.num_images} and --batch_size={args.batch_size} must be at least 1")

    from .nll import measure
    from .pipelines.pipeline_ddpm import DDPMPipeline

    state = distributed_state()
    quiet_loading()
    pipe = DDPMPipeline.from_pretrained(args.pipeline).to(state.device)
    summary = measure(pipe, args.pipeline, args.output_dir, args.dataset, args.num_images, args.split, args.batch_size,
                      args.seed, args.clip_denoised, args.dataset_config, args.image_column, args.overwrite, args.output, state)
    if summary is not None:
        bpd = summary["bits_per_dim"]
        print(f"NLL bound: {bpd['total']['mean']:.4f} ± {bpd['total']['sem']:.4f} bits/dim on {args.num_images} images "
              f"(prior {bpd['prior']['mean']:.4f}, KL {bpd['kl']['mean']:.4f}, decoder {bpd['decoder']['mean']:.4f})")
    return 0


@command
def card_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-card OUTPUT_DIR`: (re)write the model card README.md of a run's output folder, e.g. after
    `ddpm-metrics ... --output OUTPUT_DIR/metrics.json`."""
    from .model_card import write_model_card

    parser = Parser(description=card_main.__doc__, prog="ddpm-card")
    parser.add_argument("output_dir")
    parser.add_argument("--repo_id", default=None, help="the Hub repo id to show in the usage snippet")
    args = parser.parse_args(argv)
    if not (Path(args.output_dir) / "training_config.json").is_file():
        raise FileNotFoundError(f"{args.output_dir} has no training_config.json; give the output folder of a training run.")
    print(f"wrote {write_model_card(args.output_dir, args.repo_id)}")
    return 0


@command
def push_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-push OUTPUT_DIR --hub_model_id ID`: publish a run's output folder on the Hub: the pipeline,
    the model card (rewritten for the repo), sample grids, metrics.json, training_config.json and the loss
    curve; never checkpoints, optimizer state or logs."""
    from .hub import UPLOAD_PATTERNS

    parser = Parser(description=push_main.__doc__, epilog="Uploaded paths: " + ", ".join(UPLOAD_PATTERNS), prog="ddpm-push")
    parser.add_argument("output_dir")
    parser.add_argument("--hub_model_id", default=None, help="'name' (under your account) or 'namespace/name' (default: the folder's name)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the `hf auth login` token; never printed")
    parser.add_argument("--commit_message", default="Upload DDPM pipeline with ddpm_hf")
    args = parser.parse_args(argv)

    from .hub import push_output_folder

    url, commit = push_output_folder(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo,
                                     args.commit_message)
    print(f"pushed {args.output_dir} to {url} (commit {commit.oid[:12]})")
    return 0
