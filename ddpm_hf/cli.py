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
            if getattr(e, "exit_code", None) is not None:  # a run stopped on request (a signal): not an error
                emit_error(str(e), prefix="stopped")
                return e.exit_code
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


@command
def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from .config import parse_args

    config, options = parse_args(argv)
    if options.dry_run:
        from .training_parts import make_unet

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
    from .choices import SAMPLERS, SAMPLING_DTYPES

    parser = Parser(description=sample_main.__doc__, prog="ddpm-sample")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the PNGs go ({k:06d}-seed{seed+k}.png)")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k")
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision (the chain "
                        "and the scheduler stay float32); bf16 or fp16 are faster on a GPU, fp16 only there")
    parser.add_argument("--overwrite", action="store_true", help="draw again from scratch in a folder drawn with other settings")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: seeds are integers from 0 (image k is drawn from seed + k)")

    from .devices import distributed_state
    from .sample_folder import sample_command
    from .samplers import network_dtype
    from .weights import load_pipeline

    state = distributed_state()
    network_dtype(args.dtype, state.device)  # refused before loading anything
    quiet_loading()
    pipe = load_pipeline(args.pipeline).to(state.device)
    result = sample_command(pipe, args.pipeline, args.output_dir, args.num_images, args.batch_size, args.scheduler,
                            args.num_inference_steps, args.eta, args.seed, args.overwrite, state, args.dtype)
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing to draw"
    print(f"process {state.process_index}: wrote {result['written']}, kept {result['kept']} already complete; {rate}")
    return 0


@command
def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-evaluate PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.evaluate`: a published protocol in one command
    (default ddpm-cifar10, the paper's Table 1): samples (resumable, shared under `accelerate launch`), FID and IS in
    clean-fid's legacy_tensorflow and clean modes, NLL in bits/dim on the held-out split, and evaluation.json and
    evaluation.md with the published figures beside them. Smaller counts are allowed and written into the report."""
    from .choices import FID_MODES, SAMPLING_DTYPES
    from .paths import INCEPTION_FILE
    from .protocols import PROTOCOLS

    parser = Parser(description=evaluate_main.__doc__, prog="ddpm-evaluate")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id "
                        "(e.g. google/ddpm-cifar10-32)")
    parser.add_argument("output_dir", help="where the samples, metrics, bound and report go")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="ddpm-cifar10")
    parser.add_argument("--num_images", type=int, default=None, help="samples for FID and IS (default: the protocol's, "
                        "50,000)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="DDPM steps (default: the protocol's, 1000)")
    parser.add_argument("--reference", default=None, help="the FID reference, as ddpm-metrics takes it (default: cifar10)")
    parser.add_argument("--reference_split", default=None, help="(default: train)")
    parser.add_argument("--nll_dataset", default=None, help="the held-out images, as ddpm-nll takes them (default: cifar10)")
    parser.add_argument("--nll_split", default=None, help="(default: test)")
    parser.add_argument("--nll_images", type=int, default=None, help="images for the bound, 0 to skip it (default: "
                        "the protocol's, 10,000)")
    parser.add_argument("--modes", nargs="+", choices=FID_MODES, default=None, help="clean-fid modes (default: "
                        "legacy_tensorflow clean)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision when sampling")
    parser.add_argument("--seed", type=int, default=0, help="sample k from seed + k; the bound's image k from (seed, k)")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--cache_dir", default=None, help="reference statistics and weights cache")
    parser.add_argument("--fid_se_rounds", type=int, default=None, help="bootstrap resamplings of the samples for FID's "
                        "standard error, 0 to skip it (default: the protocol's, 10; each costs about one FID)")
    parser.add_argument("--overwrite", action="store_true", help="start again in a folder evaluated with other settings")
    args = parser.parse_args(argv)
    if args.seed < 0 or args.batch_size < 1:
        parser.error(f"--seed {args.seed} must be at least 0 and --batch_size {args.batch_size} at least 1")

    from .devices import distributed_state
    from .evaluation import feature_network
    from .protocols import check_data, evaluate_pipeline, settings
    from .samplers import network_dtype
    from .weights import load_pipeline

    chosen = settings(args.protocol, num_images=args.num_images, num_inference_steps=args.num_inference_steps,
                      reference=args.reference, reference_split=args.reference_split, nll_dataset=args.nll_dataset,
                      nll_split=args.nll_split, nll_images=args.nll_images, modes=args.modes,
                      fid_se_rounds=args.fid_se_rounds)
    state = distributed_state()
    network_dtype(args.dtype, state.device)
    # before any sampling: the Inception weights and the data, each missing one a line now rather than hours later
    network = feature_network("inception", state.device, args.inception_weights, cache_dir=args.cache_dir)
    check_data(chosen)
    quiet_loading()
    pipe = load_pipeline(args.pipeline).to(state.device)
    report = evaluate_pipeline(pipe, lambda: load_pipeline(args.pipeline).to(state.device), args.pipeline,
                               args.output_dir, chosen, network, args.batch_size, args.dtype, args.seed, args.cache_dir,
                               args.overwrite, state, notify=lambda note: print(f"note: {note}.", file=sys.stderr))
    if report is not None:
        from .run_folder import EVALUATION_TABLE

        print((Path(args.output_dir) / EVALUATION_TABLE).read_text(), end="")
    return 0


@command
def metrics_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-metrics`: FID (clean-fid), KID and Inception Score of a folder of samples against a reference
    folder or dataset split, or the Fréchet distance in DINOv2's feature space (--feature_network dinov2:
    FD_DINOv2); precision and recall as an option; writes metrics.json (metrics-dinov2.json) with the protocol."""
    from .choices import FEATURE_NETWORKS, FID_MODES
    from .paths import CACHE_ENV, DINOV2_DEFAULT, INCEPTION_FILE

    parser = Parser(description=metrics_main.__doc__, prog="ddpm-metrics")
    parser.add_argument("samples", nargs="?", help="folder of generated images (e.g. from ddpm-sample)")
    parser.add_argument("--reference", help="a folder of images; a dataset as for train_ddpm.py --dataset (cifar10, a Hub id, parquet "
                        "files); or clean-fid's precomputed statistics, cleanfid:NAME:SPLIT:RES (e.g. cleanfid:cifar10:train:32)")
    parser.add_argument("--split", default="train", help="the reference dataset's split")
    parser.add_argument("--resolution", type=int, default=None, help="reference images are resized/cropped to this (the samples' size)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid's resizing protocol")
    parser.add_argument("--feature_network", choices=FEATURE_NETWORKS, default="inception",
                        help="the feature space: Inception-v3 (FID, KID, IS) or DINOv2 (FD_DINOv2, Stein et al. 2023)")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--dinov2_model", default=DINOV2_DEFAULT, help="the DINOv2 model: a Hub id (cached ones work "
                        "offline) or a save_pretrained folder with its preprocessor_config.json")
    parser.add_argument("--precision_recall", action="store_true", help="improved precision and recall (k = 3) in "
                        "the same feature space")
    parser.add_argument("--cache_dir", default=None, help=f"reference statistics and weights cache (default: ${CACHE_ENV}, "
                        "else ~/.cache/ddpm_hf)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True, help="Kernel Inception Distance")
    parser.add_argument("--is", dest="isc", action=argparse.BooleanOptionalAction, default=True, help="Inception Score "
                        "(Inception only)")
    parser.add_argument("--output", default=None, help="where to write the metrics (default: metrics.json, or "
                        "metrics-dinov2.json, in the samples folder)")
    parser.add_argument("--download_inception", action="store_true", help="fetch the Inception weights into the cache and exit")
    args = parser.parse_args(argv)

    from .devices import distributed_state
    from .evaluation import download_inception, evaluate_folder, feature_network

    if args.download_inception:
        try:
            print(f"saved {download_inception(args.cache_dir)}")
        except OSError as e:
            raise OSError(f"could not download the Inception weights ({e}); copy {INCEPTION_FILE} from a machine with "
                          "internet and pass --inception_weights.") from None
        return 0
    if not args.samples or not args.reference:
        parser.error("give the samples folder and --reference")
    device = distributed_state().device
    network = feature_network(args.feature_network, device, args.inception_weights, args.dinov2_model,
                              args.cache_dir)  # first: fail before any work
    result = evaluate_folder(args.samples, args.reference, network, args.mode, args.cache_dir, args.split,
                             args.resolution, args.channels, kid=args.kid, isc=args.isc, output=args.output,
                             precision_recall=args.precision_recall, batch_size=args.batch_size, device=device)
    if "caution" in result["protocol"]:
        print(f"note: {result['protocol']['caution']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=2))
    return 0


@command
def nll_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` / `python -m ddpm_hf.nll`: the variational bound of
    a pipeline in bits/dim (prior, KL and decoder terms) on a dataset split or a folder of images; resumable, and
    shared over processes under `accelerate launch`; writes nll.json with the protocol and nll_terms.png."""
    from .choices import SAMPLING_DTYPES

    parser = Parser(description=nll_main.__doc__, prog="ddpm-nll")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the per-image results, nll.json and nll_terms.png go")
    parser.add_argument("--dataset", required=True, help="anything train_ddpm.py --dataset takes: cifar10, a Hub id, "
                        "a folder of images, .parquet/.arrow files")
    parser.add_argument("--split", default=None, help="the dataset's split (default: test for a Hub dataset and the "
                        "built-in digits; local files and folders are one set, measured whole)")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--image_column", default=None)
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

    from .devices import distributed_state
    from .likelihood_folder import measure
    from .samplers import network_dtype
    from .weights import load_pipeline

    if args.split is None and not Path(args.dataset).expanduser().exists():
        args.split = "test"  # the held-out images of a Hub dataset or the built-in digits
    state = distributed_state()
    network_dtype(args.dtype, state.device)  # refused before loading anything
    quiet_loading()
    pipe = load_pipeline(args.pipeline).to(state.device)
    summary = measure(pipe, args.pipeline, args.output_dir, args.dataset, args.num_images, args.split, args.batch_size,
                      args.seed, args.clip_denoised, args.dataset_config, args.image_column, args.overwrite, args.output, state,
                      notify=lambda note: print(f"note: {note}.", file=sys.stderr), dtype=args.dtype)
    if summary is not None:
        bpd = summary["bits_per_dim"]
        print(f"NLL bound: {bpd['total']['mean']:.4f} ± {bpd['total']['sem']:.4f} bits/dim on {args.num_images} images "
              f"(prior {bpd['prior']['mean']:.4f}, KL {bpd['kl']['mean']:.4f}, decoder {bpd['decoder']['mean']:.4f})")
    return 0


@command
def visualize_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-visualize PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.visualize`: the paper's pictures of a pipeline, from
    fixed seeds: progressive generation (Fig. 6: x_t and the predicted x_0 along the reverse chain), the denoising
    animation, the forward process on real images, and interpolation in the diffused space (Fig. 8). Seed s is the
    image ddpm-sample draws from seed s with the same sampler; figures.json records how each file was made."""
    from .choices import ANIMATION_FORMATS, FIGURES, SAMPLERS, SAMPLING_DTYPES

    parser = Parser(description=visualize_main.__doc__, prog="ddpm-visualize")
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the PNGs, animations and figures.json go")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=None,
                        help="default: progressive and denoise, and forward and interpolate when --dataset is given")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(16)), help="the seeds of the denoising grid "
                        "(the first --progressive_seeds of them make the progressive figure)")
    parser.add_argument("--progressive_seeds", type=int, default=4)
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--dataset", default=None, help="real images for forward and interpolate: anything "
                        "train_ddpm.py --dataset takes (cifar10, a Hub id, a folder of images, .parquet files)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--num_images", type=int, default=4, help="real images for forward (the first two interpolate)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="interpolate: the depths λ in [0, 1] the two images are diffused to (t = λ·(T-1)), a row each")
    parser.add_argument("--columns", type=int, default=10, help="columns of the progressive, forward and interpolate figures")
    parser.add_argument("--frames", type=int, default=50, help="frames of the animations (the last one is held)")
    parser.add_argument("--noise_seed", type=int, default=0, help="the noise of forward and interpolate")
    parser.add_argument("--animation_format", choices=ANIMATION_FORMATS, default="auto", help="auto: the smaller file")
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision (the chain "
                        "stays float32); fp16 only on a GPU")
    args = parser.parse_args(argv)
    figures = args.figures or (["progressive", "denoise"] + (["forward", "interpolate"] if args.dataset else []))
    needs_images = [f for f in figures if f in ("forward", "interpolate")]
    if needs_images and not args.dataset:
        parser.error(f"--figures {' '.join(needs_images)} need real images: give --dataset")
    if "interpolate" in figures and args.num_images < 2:
        parser.error("interpolate needs two images: --num_images 2 or more")
    if any(not 0 <= d <= 1 for d in args.depths):
        parser.error(f"--depths {args.depths}: each depth is a fraction of T, in [0, 1]")
    for name in ("num_inference_steps", "columns", "frames", "num_images", "progressive_seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be at least 1")
    if min(args.seeds) < 0:
        parser.error(f"--seeds {min(args.seeds)}: seeds are integers from 0 (seed s is the image ddpm-sample draws from s)")

    from .data import first_rows, images_of
    from .devices import distributed_state
    from .figures import visualize
    from .samplers import network_dtype, use_scheduler
    from .weights import load_pipeline

    device = distributed_state().device
    network_dtype(args.dtype, device)  # refused before loading anything
    rows = first_rows(args.dataset, args.split, args.num_images, args.dataset_config) if needs_images else None
    quiet_loading()
    pipe = load_pipeline(args.pipeline).to(device)
    use_scheduler(pipe, args.scheduler)
    images = None if rows is None else images_of(rows, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                                                 args.image_column)
    about = {"pipeline": args.pipeline, "dataset": args.dataset, "split": args.split} if needs_images else {"pipeline": args.pipeline}
    entries = visualize(pipe, args.output_dir, figures, args.seeds, args.num_inference_steps, args.eta, images,
                        args.depths, columns=args.columns, frames=args.frames, seed=args.noise_seed,
                        fmt=args.animation_format, about=about, progressive_seeds=args.progressive_seeds, dtype=args.dtype)
    for name in entries:
        print(f"wrote {Path(args.output_dir) / name}")
    return 0


@command
def card_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-card OUTPUT_DIR`: (re)write the model card README.md of a run's output folder, e.g. after
    `ddpm-metrics ... --output OUTPUT_DIR/metrics.json`."""
    parser = Parser(description=card_main.__doc__, prog="ddpm-card")
    parser.add_argument("output_dir")
    parser.add_argument("--repo_id", default=None, help="the Hub repo id to show in the usage snippet")
    args = parser.parse_args(argv)
    from .model_card import write_model_card
    from .run_folder import TRAINING_CONFIG

    if not (Path(args.output_dir) / TRAINING_CONFIG).is_file():
        raise FileNotFoundError(f"{args.output_dir} has no {TRAINING_CONFIG}; give the output folder of a training run.")
    print(f"wrote {write_model_card(args.output_dir, args.repo_id)}")
    return 0


@command
def push_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-push OUTPUT_DIR --hub_model_id ID`: publish a run's output folder on the Hub: the pipeline,
    the model card (rewritten for the repo), sample grids, metrics.json, training_config.json and the loss
    curve; never checkpoints, optimizer state or logs."""
    from .run_folder import PUBLISHED

    parser = Parser(description=push_main.__doc__, epilog="Uploaded paths: " + ", ".join(PUBLISHED), prog="ddpm-push")
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
