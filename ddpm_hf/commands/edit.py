"""`ddpm-edit PIPELINE IMAGES OUTPUT_DIR --strength S | --mask PATH | --mask_half SIDE`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser, add_label_flags, label_flags_problem
from ddpm_hf.commands.running import command, load_for_command


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-edit` / `python -m ddpm_hf.commands.edit`: edit your images with a trained pipeline, into a folder
    (resumable; under `accelerate launch` the processes share the work). --strength S: SDEdit (Meng et al. 2022),
    each image diffused to t ≈ S·T and denoised from there. --mask / --mask_half: inpainting with RePaint (Lugmayr et
    al. 2022), the white region filled, the rest kept. The folder records what its results were made from (edit.json:
    the weights' and each input's SHA-256, the settings); comparison.png shows the first ones beside their inputs."""
    from ddpm_hf.choices import MASK_HALVES

    parser = Parser(description=main.__doc__, prog="ddpm-edit")
    parser.add_argument("pipeline")
    parser.add_argument("images", help="an image, or a folder of images (each fitted to the UNet's size: short side "
                        "resized, center-cropped); never written to")
    parser.add_argument("output_dir", help="where the results go ({k:06d}-{name}.png, input k edited with seed + k)")
    parser.add_argument("--strength", type=float, default=None, help="SDEdit: in [0, 1], how much of the chain is "
                        "run (0 returns the input, 1 samples anew; 0.5 keeps the layout)")
    parser.add_argument("--mask", default=None, help="inpainting: one mask image for all inputs, or a folder with a "
                        "mask under each input's name; white is filled, black kept")
    parser.add_argument("--mask_half", choices=MASK_HALVES, default=None, help="inpainting: fill this half of each image")
    parser.add_argument("--jump_length", type=int, default=None, help="RePaint's resampling: steps back up per "
                        "jump (j; default 10, as its paper)")
    parser.add_argument("--jump_n_sample", type=int, default=None, help="RePaint's resampling: jumps per point (r; "
                        "default 10, as its paper); 1 turns resampling off; the cost is about 1 + 2(r - 1) times the chain's")
    parser.add_argument("--num_inference_steps", type=int, default=1000, help="steps of the chain (a pipeline "
                        "ddpm-distill made: the steps it was distilled for)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="input k is edited with seed + k")
    parser.add_argument("--overwrite", action="store_true", help="edit again from scratch in a folder made from other "
                        "inputs or settings")
    add_label_flags(parser, "a class-conditional pipeline's classes: balanced or comma-separated labels (0,3,7); "
                    "input k is edited as the (k mod count)-th")
    args = parser.parse_args(argv)
    if args.strength is not None and (args.jump_length, args.jump_n_sample) != (None, None):
        parser.error("--jump_length and --jump_n_sample are RePaint's: they go with --mask or --mask_half")
    jump_length, jump_n_sample = (10 if v is None else v for v in (args.jump_length, args.jump_n_sample))
    if label_flags_problem(args):
        parser.error(label_flags_problem(args))
    parser.check_sources(args)
    from ddpm_hf.outputs.run_folder import distilled_steps
    from ddpm_hf.sampling.edit_folder import edit_command, edit_problem, input_files, refuse_overlap

    student = args.pipeline if distilled_steps(args.pipeline) == args.num_inference_steps else None
    problem = edit_problem(args.strength, args.mask, args.mask_half, student,
                           num_inference_steps=args.num_inference_steps, batch_size=args.batch_size, jump_length=jump_length, jump_n_sample=jump_n_sample,
                           seed=args.seed)
    if problem:  # before the pipeline is loaded
        parser.error(problem)

    from ddpm_hf.devices import distributed_state

    refuse_overlap(args.images, args.output_dir, args.mask)
    input_files(args.images)
    state = distributed_state()
    pipe = load_for_command(args.pipeline, state.device)
    from ddpm_hf.pipelines.guidance import num_classes
    from ddpm_hf.sampling.sample_folder import class_labels_of

    labels = class_labels_of(args.class_labels, num_classes(pipe.unet))
    result = edit_command(pipe, pipeline_name=args.pipeline, images=args.images, folder=args.output_dir,
                          strength=args.strength, mask=args.mask, mask_half=args.mask_half,
                          num_inference_steps=args.num_inference_steps, jump_length=jump_length,
                          jump_n_sample=jump_n_sample, seed=args.seed, batch_size=args.batch_size,
                          overwrite=args.overwrite, state=state, labels=labels, guidance_scale=args.guidance_scale)
    print(f"process {state.process_index}: edited {result['written']}, kept {result['kept']} already done "
          f"({result['images']} inputs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
