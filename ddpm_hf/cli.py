"""Command-line entry points (thin: parse, then call the library)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


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


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """`train_ddpm.py` / `ddpm-train`: train a DDPM; `--dry_run` prints the resolved config and parameter count."""
    from .config import parse_args
    from .data import BadImageError, DatasetUnavailableError

    try:
        config, options = parse_args(argv)
    except ValueError as e:
        return _fail(str(e))
    if options.dry_run:
        from .training import make_unet

        n = sum(p.numel() for p in make_unet(config).parameters())
        print(config.to_json())
        print(f"UNet parameters: {n:,}")
        return 0
    from .evaluation import InceptionWeightsMissing
    from .hub import HubError
    from .training import NonFiniteLossError, train

    configure_logging()
    try:
        train(config, hub_token=options.hub_token)
    except (DatasetUnavailableError, BadImageError, NonFiniteLossError, InceptionWeightsMissing, HubError) as e:
        return _fail(str(e), 1)
    return 0


def sample_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-sample` / `python -m ddpm_hf.sample`: draw N images from a pipeline into a folder (resumable;
    under `accelerate launch` the processes share the work)."""
    import argparse

    from .choices import SAMPLERS
    from .sampling import sample_to_folder, use_scheduler

    parser = argparse.ArgumentParser(description=sample_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("pipeline", help="a folder written by save_pretrained / a training run, or a Hub repo id")
    parser.add_argument("output_dir", help="where the PNGs go ({k:06d}-seed{seed+k}.png)")
    parser.add_argument("--num_images", type=int, required=True)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000)
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k")
    args = parser.parse_args(argv)

    from accelerate import PartialState

    from .pipelines.pipeline_ddpm import DDPMPipeline
    from .training import accelerator_available

    state = PartialState(cpu=not accelerator_available())
    quiet_loading()
    try:
        pipe = use_scheduler(DDPMPipeline.from_pretrained(args.pipeline), args.scheduler).to(state.device)
        result = sample_to_folder(pipe, args.output_dir, args.num_images, args.batch_size, args.num_inference_steps,
                                  args.seed, args.eta, state.process_index, state.num_processes,
                                  progress=state.is_local_main_process)
    except (OSError, ValueError) as e:
        return _fail(str(e), 1)
    if state.is_main_process:  # the protocol, for ddpm-metrics' metrics.json
        from .outputs import atomic_write_json

        atomic_write_json(Path(args.output_dir) / "sampling.json", {
            "pipeline": args.pipeline, "num_images": args.num_images, "scheduler": args.scheduler,
            "num_inference_steps": args.num_inference_steps, "eta": args.eta, "seed": args.seed,
            "weights": "EMA" if (Path(args.pipeline) / "training_config.json").is_file() else "as published",
        })
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing to draw"
    print(f"process {state.process_index}: wrote {result['written']}, kept {result['kept']} already complete; {rate}")
    state.wait_for_everyone()
    return 0


def metrics_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-metrics`: FID (clean-fid), KID and Inception Score of a folder of samples against a reference
    folder or dataset split; writes metrics.json with the protocol."""
    import argparse

    from .choices import FID_MODES
    from .evaluation import INCEPTION_FILE, default_cache_dir

    parser = argparse.ArgumentParser(description=metrics_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("samples", nargs="?", help="folder of generated images (e.g. from ddpm-sample)")
    parser.add_argument("--reference", help="a folder of images; a dataset as for train_ddpm.py --dataset (cifar10, a Hub id, parquet "
                        "files); or clean-fid's precomputed statistics, cleanfid:NAME:SPLIT:RES (e.g. cleanfid:cifar10:train:32)")
    parser.add_argument("--split", default="train", help="the reference dataset's split")
    parser.add_argument("--resolution", type=int, default=None, help="reference images are resized/cropped to this (the samples' size)")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid's resizing protocol")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--cache_dir", default=None, help=f"reference statistics and weights cache (default {default_cache_dir()})")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--is", dest="isc", action=argparse.BooleanOptionalAction, default=True, help="Inception Score")
    parser.add_argument("--output", default=None, help="where to write metrics.json (default: in the samples folder)")
    parser.add_argument("--download_inception", action="store_true", help="fetch the Inception weights into the cache and exit")
    args = parser.parse_args(argv)

    from .evaluation import InceptionWeightsMissing, download_inception, evaluate_folder, inception_network, resolve_inception_weights

    if args.download_inception:
        try:
            print(f"saved {download_inception(args.cache_dir)}")
        except OSError as e:
            return _fail(f"could not download the Inception weights ({e}); copy {INCEPTION_FILE} from a machine with internet and pass --inception_weights.", 1)
        return 0
    if not args.samples or not args.reference:
        return _fail("give the samples folder and --reference.")
    try:
        weights = resolve_inception_weights(args.inception_weights, args.cache_dir)  # first: fail before any work
    except InceptionWeightsMissing as e:
        return _fail(str(e), 1)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = evaluate_folder(args.samples, args.reference, inception_network(weights, device), args.mode, args.cache_dir,
                                 args.split, args.resolution, args.channels, kid=args.kid, isc=args.isc,
                                 output=args.output, batch_size=args.batch_size, device=device)
    except (OSError, ValueError) as e:
        return _fail(str(e), 1)
    summary = {k: v for k, v in result.items() if k != "protocol"}
    print(json.dumps(summary, indent=2))
    return 0


def nll_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-nll PIPELINE OUTPUT_DIR --dataset D --num_images N` / `python -m ddpm_hf.nll`: the variational bound of
    a pipeline in bits/dim (prior, KL and decoder terms) on a dataset split or a folder of images; resumable, and
    shared over processes under `accelerate launch`; writes nll.json with the protocol and nll_terms.png."""
    import argparse

    parser = argparse.ArgumentParser(description=nll_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
        return _fail(f"--num_images={args.num_images} and --batch_size={args.batch_size} must be at least 1.")

    from accelerate import PartialState

    from .data import BadImageError, DatasetUnavailableError
    from .nll import measure
    from .pipelines.pipeline_ddpm import DDPMPipeline
    from .training import accelerator_available

    state = PartialState(cpu=not accelerator_available())
    quiet_loading()
    try:
        pipe = DDPMPipeline.from_pretrained(args.pipeline).to(state.device)
        summary = measure(pipe, args.pipeline, args.output_dir, args.dataset, args.num_images, args.split,
                          args.batch_size, args.seed, args.clip_denoised, args.dataset_config, args.image_column,
                          args.overwrite, args.output, state)
    except (OSError, ValueError, RuntimeError, DatasetUnavailableError, BadImageError) as e:
        return _fail(str(e), 1)
    if summary is not None:
        bpd = summary["bits_per_dim"]
        print(f"NLL bound: {bpd['total']['mean']:.4f} ± {bpd['total']['sem']:.4f} bits/dim on {args.num_images} images "
              f"(prior {bpd['prior']['mean']:.4f}, KL {bpd['kl']['mean']:.4f}, decoder {bpd['decoder']['mean']:.4f})")
    return 0


def card_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-card OUTPUT_DIR`: (re)write the model card README.md of a run's output folder, e.g. after
    `ddpm-metrics ... --output OUTPUT_DIR/metrics.json`."""
    import argparse

    from .model_card import write_model_card

    parser = argparse.ArgumentParser(description=card_main.__doc__)
    parser.add_argument("output_dir")
    parser.add_argument("--repo_id", default=None, help="the Hub repo id to show in the usage snippet")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {write_model_card(args.output_dir, args.repo_id)}")
    except (OSError, ValueError) as e:
        return _fail(str(e), 1)
    return 0


def push_main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-push OUTPUT_DIR --hub_model_id ID`: publish a run's output folder on the Hub: the pipeline,
    the model card (rewritten for the repo), sample grids, metrics.json, training_config.json and the loss
    curve; never checkpoints, optimizer state or logs."""
    import argparse

    from .hub import UPLOAD_PATTERNS

    parser = argparse.ArgumentParser(description=push_main.__doc__, epilog="Uploaded paths: " + ", ".join(UPLOAD_PATTERNS))
    parser.add_argument("output_dir")
    parser.add_argument("--hub_model_id", default=None, help="'name' (under your account) or 'namespace/name' (default: the folder's name)")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the `hf auth login` token; never printed")
    parser.add_argument("--commit_message", default="Upload DDPM pipeline with ddpm_hf")
    args = parser.parse_args(argv)

    from .hub import HubError, push_output_folder

    try:
        url, commit = push_output_folder(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo,
                                         args.commit_message)
    except (HubError, OSError, ValueError) as e:
        return _fail(str(e), 1)
    print(f"pushed {args.output_dir} to {url} (commit {commit.oid[:12]})")
    return 0
