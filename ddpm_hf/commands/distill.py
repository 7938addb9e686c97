"""`ddpm-distill TEACHER OUTPUT_DIR --to_steps N` / `python -m ddpm_hf.commands.distill`: see `main`."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from ddpm_hf.commands.running import command, configure_logging

# DDIM at 128 steps is within 3% of its 1000-step FID on CIFAR-10 (Song et al. 2021, Table 1: 4.16 at 100 steps,
# 4.04 at 1000): the first teacher's sampler is then about as good as it gets, and each doubling above it is one more
# round to train
FIRST_TEACHER_STEPS = 128
STEPS_PER_ROUND = 5000


def default_from_steps(to_steps: int, num_train_timesteps: int) -> int:
    """--from_steps when not given: to_steps times the smallest power of two that reaches FIRST_TEACHER_STEPS, within
    the teacher's T."""
    steps = to_steps * 2
    while steps < FIRST_TEACHER_STEPS and steps * 2 <= num_train_timesteps:
        steps *= 2
    return steps


@command(memory_hint="lower --batch_size; --gradient_accumulation_steps N keeps the batch that each step "
                     "averages over while holding 1/N of it in memory")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-distill TEACHER OUTPUT_DIR --to_steps N` / `python -m ddpm_hf.commands.distill`: progressive distillation
    (Salimans & Ho 2022). Round after round, a student learns to take in one DDIM step what its teacher takes in two,
    from --from_steps down to --to_steps; each round is a training run (OUTPUT_DIR/round-<steps>/: checkpoints, exact
    resume, grids, a card), and the last student is saved at the top of OUTPUT_DIR as a pipeline that plain diffusers
    samples with DDIMScheduler at --to_steps steps. Training's flags (--dataset, --batch_size, --learning_rate,
    --mixed_precision, ...) are taken as train_ddpm.py takes them; a rerun carries on where it stopped."""
    from ddpm_hf.commands.parsing import Parser
    from ddpm_hf.commands.train_flags import add_training_flags
    from ddpm_hf.recipes.config import DISTILLATION_DEFAULTS, DISTILLATION_SETS

    parser = Parser(description=main.__doc__, prog="ddpm-distill")
    parser.add_argument("teacher", help="the pipeline to distill (a folder saved by ddpm_hf or diffusers, or a Hub id): "
                        "its DDIM at --from_steps is the first round's teacher")
    parser.add_argument("output_dir", help="where the rounds (round-<steps>/) and the last student go")
    parser.add_argument("--to_steps", type=int, required=True, help="the last student's DDIM steps: a divisor of the "
                        "teacher's T (1, 2, 4 or 8 for T = 1000), so that plain diffusers' DDIM follows its grid")
    parser.add_argument("--from_steps", type=int, default=None, help="the first teacher's DDIM steps: --to_steps times "
                        f"a power of two (default: the first at or above {FIRST_TEACHER_STEPS}, where DDIM is within a "
                        "few percent of its 1000-step FID; each doubling above it is one more round)")
    parser.add_argument("--steps_per_round", type=int, default=STEPS_PER_ROUND, help="optimizer steps of each round "
                        "(the paper: 50,000 at batch 128 on CIFAR-10; its learning rate anneals to 0 within each round)")
    parser.add_argument("--overwrite", action="store_true", help="start again in a folder distilled with other settings "
                        "(its rounds are removed)")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="a class-conditional teacher's classifier-free "
                        "guidance w, fixed for the distillation (0 unconditional, 1 conditional, > 1 guided): the student "
                        "draws the teacher's guided images with one forward pass a step, sampled at guidance 1")
    parser.add_argument("--teacher_samples", type=int, default=None, metavar="N", help="where you have no data: the "
                        "rounds train on N images the teacher draws first (its DDIM at --from_steps, into "
                        "OUTPUT_DIR/teacher-samples/, kept and resumed) instead of --dataset; the student then learns "
                        "the teacher on its own images, not on the data's (docs/distillation.md)")
    parser.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: HF_TOKEN or the login); "
                        "never saved or printed")
    add_training_flags(parser, leave_out=DISTILLATION_SETS)
    shown = ", ".join(f"--{k} {v}" for k, v in DISTILLATION_DEFAULTS.items())
    parser.epilog = f"Unless given, each round trains with {shown} (Salimans & Ho 2022, App. E)."
    instead = {"max_train_steps": "--steps_per_round", "num_epochs": "--steps_per_round", "output_dir": "OUTPUT_DIR",
               "resume_from_checkpoint": "a rerun of the same command, which carries on", "overwrite_output_dir": "--overwrite",
               "distill_steps": "--to_steps and --from_steps", "distill_teacher": "TEACHER", "init_from": "TEACHER",
               "distill_guidance_scale": "--guidance_scale",
               "hub_push_every": "--push_to_hub, which pushes the last student once, when the rounds end",
               "class_conditional": "the teacher (a class-conditional teacher makes class-conditional rounds)"}
    for arg in sys.argv[1:] if argv is None else argv:
        name = str(arg)[2:].split("=")[0] if str(arg).startswith("--") else None
        if name in DISTILLATION_SETS:
            parser.error(f"--{name} is set by ddpm-distill for each round: use "
                         f"{instead.get(name, 'the teacher (each round takes its diffusion and UNet from it)')} instead")
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    teacher, output_dir = args.pop("teacher"), args.pop("output_dir")
    to_steps, from_steps = args.pop("to_steps"), args.pop("from_steps")
    steps_per_round, overwrite, hub_token = args.pop("steps_per_round"), args.pop("overwrite"), args.pop("hub_token")
    guidance, teacher_samples = args.pop("guidance_scale"), args.pop("teacher_samples")
    if steps_per_round < 1:
        parser.error(f"--steps_per_round {steps_per_round} must be at least 1")
    if teacher_samples is not None:
        from ddpm_hf.recipes.resolve import DIFFUSERS_ALIASES
        from ddpm_hf.sampling.counts import MAX_IMAGES

        if "dataset" in args or any(DIFFUSERS_ALIASES.get(k[len("alias:"):]) == "dataset" for k in args):
            parser.error(f"--teacher_samples {teacher_samples} draws the images the rounds train on: drop --dataset, "
                         "or drop --teacher_samples to train on that data")
        if teacher_samples < 1:
            parser.error(f"--teacher_samples {teacher_samples}: give at least 1 image")
        if teacher_samples > MAX_IMAGES:
            parser.error(f"--teacher_samples {teacher_samples} is more than one folder of PNGs holds well (at most "
                         f"{MAX_IMAGES:,}): draw fewer")
    from ddpm_hf.choices import MAX_GUIDANCE

    if not 0 <= guidance <= MAX_GUIDANCE:  # NaN and inf too
        parser.error(f"--guidance_scale {guidance}: give a scale from 0 to {MAX_GUIDANCE:g} (0 unconditional, 1 "
                     "conditional, > 1 guided)")
    # --push_to_hub publishes the last student (the top folder, as ddpm-push does) once the rounds end, not each round
    hub = {k: args.pop(k) for k in ("push_to_hub", "hub_model_id", "hub_private_repo") if k in args}
    if not hub.get("push_to_hub") and set(hub) - {"push_to_hub"}:
        parser.error("--hub_model_id and --hub_private_repo need --push_to_hub")
    given = {k: v for k, v in args.items()}

    from ddpm_hf.diffusion.distillation import steps_problem
    from ddpm_hf.saved.weights import read_pipeline_json  # the teacher's configs: before torch's work
    from ddpm_hf.outputs.run_folder import ROOT_LAYOUT_SCHEDULER_CONFIG, ROOT_LAYOUT_UNET_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG

    scheduler = read_pipeline_json(teacher, (SCHEDULER_CONFIG, ROOT_LAYOUT_SCHEDULER_CONFIG))
    unet = read_pipeline_json(teacher, (UNET_CONFIG, ROOT_LAYOUT_UNET_CONFIG))
    T = scheduler.get("num_train_timesteps", 1000)
    if scheduler.get("thresholding"):
        parser.error(f"{teacher}: its scheduler thresholds x̂ dynamically (thresholding: true), which distillation does "
                     "not follow yet; distill a teacher whose scheduler clips (clip_sample) or does neither")
    if unet.get("out_channels", 0) != unet.get("in_channels"):
        parser.error(f"{teacher}: its UNet gives {unet.get('out_channels')} channels for {unet.get('in_channels')} (a "
                     "learned variance): distilling it is not built yet; distill a fixed-variance teacher")
    if unet.get("num_class_embeds") is not None:  # the rounds are class-conditional, their teacher guided at w
        if teacher_samples is not None:
            parser.error(f"--teacher_samples draws unlabelled images, and {teacher} is class-conditional (its rounds "
                         "train on labelled images): give its --dataset instead")
        given.update(class_conditional=True, distill_guidance_scale=guidance)
        # the student is sampled with its labels: a step spent on "no class" teaches it the unconditional teacher only
        given.setdefault("label_dropout", 0.0)
    elif guidance != 1.0:
        parser.error(f"--guidance_scale {guidance} guides a class-conditional teacher, and {teacher} is unconditional; "
                     "drop it")
    from_steps = from_steps or default_from_steps(to_steps, T)
    problem = steps_problem(from_steps, to_steps, T)
    if problem:
        parser.error(problem)

    from ddpm_hf.devices import distributed_state
    from ddpm_hf.training.rounds import distill

    configure_logging()
    state = distributed_state()
    repo_id = None
    if hub.get("push_to_hub") and state.is_main_process:  # a missing or bad token fails now, not after the rounds
        from pathlib import Path

        from huggingface_hub import HfApi

        from ddpm_hf.publishing.hub import check_hub_access

        repo_id = check_hub_access(HfApi(token=hub_token), hub.get("hub_model_id") or Path(output_dir).resolve().name,
                                   hub_token, hub.get("hub_private_repo", False), output_dir)
    last = distill(teacher, output_dir, from_steps=from_steps, to_steps=to_steps, steps_per_round=steps_per_round,
                   given=given, state=state, overwrite=overwrite, hub_token=hub_token, teacher_samples=teacher_samples)
    if state.is_main_process:
        print(f"distilled {teacher} to {to_steps} DDIM steps: {output_dir} (the last round: {last}); sample it at its "
              f"{to_steps} steps (ddpm-sample's --num_inference_steps, or num_inference_steps= in Python)")
    if repo_id is not None:
        from ddpm_hf.publishing.hub import push_output_folder

        url, commit = push_output_folder(output_dir, repo_id=repo_id, token=hub_token,
                                         private=hub.get("hub_private_repo", False))
        print(f"pushed {output_dir} to {url} (commit {commit.oid[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
