"""`ddpm-sample` / `python -m ddpm_hf.commands.sample`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser, add_label_flags, label_flags_problem
from ddpm_hf.commands.running import command, load_for_command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-sample` / `python -m ddpm_hf.commands.sample`: draw N images from a pipeline into a folder (resumable;
    under `accelerate launch` the processes share the work). The folder records how its images were drawn
    (sampling.json: the weights' SHA-256, sampler, steps, eta, seed); a rerun with other settings is refused."""
    from ddpm_hf.choices import SAMPLERS, SAMPLING_DTYPES, SAMPLING_TIMESTEPS, TIMESTEP_SPACINGS

    parser = Parser(description=main.__doc__, prog="ddpm-sample")
    parser.add_argument("pipeline")
    parser.add_argument("output_dir", help="where the PNGs go ({k:06d}-seed{seed+k}.png)")
    parser.add_argument("--num_images", type=int, required=True, help="how many images to draw: 0..N-1, image k "
                        "from seed --seed + k (50000 for FID, as the paper)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scheduler", choices=SAMPLERS, default="ddpm")
    parser.add_argument("--num_inference_steps", type=int, default=1000, help="steps of the chain (1000: the paper's "
                        "T; a pipeline ddpm-distill made: the steps it was distilled for; fewer for ddim or dpm-solver)")
    parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None, help="how the N steps are "
                        "spaced over the T timesteps (Lin et al. 2023, Table 2); default: as the pipeline's scheduler "
                        "config says (leading for the paper's)")
    parser.add_argument("--timesteps", choices=SAMPLING_TIMESTEPS, default="uniform", help="uniform: N steps spaced "
                        "by --timestep_spacing; quadratic: the DDIM paper's CIFAR-10 chain, t_i ∝ i² up to 0.8·T "
                        "(ddpm, ddim or dpm-solver)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM's eta (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="image k is drawn from seed + k")
    parser.add_argument("--dtype", choices=SAMPLING_DTYPES, default="fp32", help="the network's precision (the chain "
                        "and the scheduler stay float32); bf16 or fp16 are faster on a GPU, fp16 only there")
    parser.add_argument("--npz", action="store_true", help="also write the folder as one samples.npz (uint8 NHWC in "
                        "arr_0, image k at index k; labels in arr_1), as guided-diffusion's evaluator reads it")
    parser.add_argument("--overwrite", action="store_true", help="draw again from scratch in a folder drawn with other settings")
    add_label_flags(parser, "a class-conditional pipeline's classes to draw: balanced (every class alike) or "
                    "comma-separated labels (0,3,7); image k is of the (k mod count)-th")
    args = parser.parse_args(argv)
    if args.timesteps != "uniform" and args.timestep_spacing is not None:
        parser.error(f"--timestep_spacing spaces uniform steps, and --timesteps {args.timesteps} is a chain of its "
                     "own: give one of them")
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: seeds are integers from 0 (image k is drawn from seed + k)")

    from ddpm_hf.sampling.counts import count_problem

    problem = count_problem(args.num_images, args.batch_size, args.num_inference_steps)
    if problem:  # before the pipeline is loaded and anything is written
        parser.error(problem)
    if label_flags_problem(args):
        parser.error(label_flags_problem(args))
    parser.check_sources(args)
    from ddpm_hf.devices import distributed_state
    from ddpm_hf.sampling.sample_folder import sample_command
    from ddpm_hf.sampling.samplers import network_dtype

    state = distributed_state()
    network_dtype(args.dtype, state.device)  # refused before loading anything
    pipe = load_for_command(args.pipeline, state.device)
    from ddpm_hf.pipelines.guidance import num_classes
    from ddpm_hf.sampling.sample_folder import class_labels_of

    labels = class_labels_of(args.class_labels, num_classes(pipe.unet))
    result = sample_command(pipe, pipeline_name=args.pipeline, folder=args.output_dir, num_images=args.num_images,
                            batch_size=args.batch_size, sampler=args.scheduler,
                            num_inference_steps=args.num_inference_steps, eta=args.eta, seed=args.seed,
                            overwrite=args.overwrite, state=state, dtype=args.dtype, labels=labels,
                            guidance_scale=args.guidance_scale, npz=args.npz,
                            timestep_spacing=args.timestep_spacing, timesteps=args.timesteps)
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing to draw"
    print(f"process {state.process_index}: wrote {result['written']}, kept {result['kept']} already complete; {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
