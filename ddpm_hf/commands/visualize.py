"""`ddpm-visualize PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.commands.visualize`: see `main`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser, add_label_flags, label_flags_problem
from ddpm_hf.commands.running import command, load_for_command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-visualize PIPELINE OUTPUT_DIR` / `python -m ddpm_hf.commands.visualize`: the paper's pictures of a pipeline, from
    fixed seeds: progressive generation (Fig. 6: x_t and the predicted x_0 along the reverse chain), the denoising
    animation, the forward process on real images, and interpolation in the diffused space (Fig. 8). Seed s is the
    image ddpm-sample draws from seed s with the same sampler; figures.json records how each file was made."""
    from ddpm_hf.choices import ANIMATION_FORMATS, FIGURES, SAMPLERS, SAMPLING_DTYPES

    parser = Parser(description=main.__doc__, prog="ddpm-visualize")
    parser.add_argument("pipeline")
    parser.add_argument("output_dir", help="where the PNGs, animations and figures.json go")
    parser.add_argument("--figures", nargs="+", choices=FIGURES, default=None,
                        help="default: progressive and denoise, and forward and interpolate when --dataset is given")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(16)), help="the seeds of the denoising grid "
                        "(the first --progressive_seeds of them make the progressive figure)")
    parser.add_argument("--progressive_seeds", type=int, default=4, help="how many of --seeds make the "
                        "progressive figure (a row of x_t and a row of the predicted x_0 each)")
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000, help="steps of the chain (a pipeline "
                        "ddpm-distill made: the steps it was distilled for)")
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
    add_label_flags(parser, "a class-conditional pipeline's classes: balanced (seed i of class i mod K: one row per "
                    "class in the progressive figure) or comma-separated labels (0,3,7)")
    args = parser.parse_args(argv)
    if label_flags_problem(args):
        parser.error(label_flags_problem(args))
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

    parser.check_sources(args)

    from ddpm_hf.outputs.folder_jobs import FolderJob
    from ddpm_hf.outputs.run_folder import FIGURES_RECORD, figure_files

    # figures.json is written before the first figure: no settings to compare (each figure records its own)
    with FolderJob(args.output_dir, FIGURES_RECORD, None, results=figure_files,
                   results_are="files named as ddpm-visualize's figures", leaves_lock=False) as job:
        job.check("figures", "", overwrite=False)  # the folder locked, links and files not ours refused: before loading
        entries = _draw(args, figures, needs_images, job)
    for name in entries:
        print(f"wrote {Path(args.output_dir) / name}")
    return 0


def _draw(args, figures, needs_images, job) -> dict:
    """Load what the figures need (the data first, then the pipeline), then draw them into the job's folder."""
    from ddpm_hf.data.decoding import images_of
    from ddpm_hf.data.sources import first_rows
    from ddpm_hf.devices import distributed_state
    from ddpm_hf.pipelines.guidance import num_classes
    from ddpm_hf.sampling.figures import visualize
    from ddpm_hf.sampling.sample_folder import class_labels_of, label_of
    from ddpm_hf.sampling.samplers import network_dtype, use_scheduler

    device = distributed_state().device
    network_dtype(args.dtype, device)  # refused before loading anything
    rows = first_rows(args.dataset, args.split, args.num_images, args.dataset_config) if needs_images else None
    pipe = load_for_command(args.pipeline, device)
    labels = class_labels_of(args.class_labels, num_classes(pipe.unet))
    use_scheduler(pipe, args.scheduler)
    images = None if rows is None else images_of(rows, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                                                 args.image_column)
    about = {"pipeline": args.pipeline, "dataset": args.dataset, "split": args.split} if needs_images else {"pipeline": args.pipeline}
    job.start()  # the folder is the job's from here
    return visualize(pipe, args.output_dir, figures=figures, seeds=args.seeds,
                     num_inference_steps=args.num_inference_steps, eta=args.eta, images=images, depths=args.depths,
                     columns=args.columns, frames=args.frames, seed=args.noise_seed,
                     fmt=args.animation_format, about=about, progressive_seeds=args.progressive_seeds, dtype=args.dtype,
                     class_labels=None if labels is None else [label_of(i, labels) for i in range(len(args.seeds))],
                     guidance_scale=args.guidance_scale)


if __name__ == "__main__":
    sys.exit(main())
