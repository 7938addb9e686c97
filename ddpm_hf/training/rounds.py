"""The rounds of progressive distillation (`ddpm-distill`): each round is a training run (the same loop, with its
checkpoints, exact resume, signals, bars and grids) whose objective is the teacher's target (`diffusion/distillation.py`),
and the student of one round is the teacher of the next, from --from_steps down to --to_steps.

OUTPUT_DIR holds distill.json (the protocol, then the rounds done), one run folder per round (round-<its steps>/) and,
at the end, the last round's student as a pipeline at the top. A rerun carries on where it stopped: finished rounds
are kept, the round under way resumes from its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.files import remove_atomically
from ddpm_hf.outputs.folder_jobs import FolderJob
from ddpm_hf.outputs.run_folder import (
    DISTILL_RECORD,
    DISTILL_ROUND_PREFIX,
    DISTILL_STUDENT_GRID,
    DISTILL_TEACHER_GRID,
    DISTILL_TEACHER_SAMPLES,
    MODEL_CARD,
    MODEL_INDEX,
    TRAIN_SUMMARY,
    distill_round_dir,
    list_checkpoints,
)
from ddpm_hf.recipes.config import DISTILLATION_DEFAULTS, TrainingConfig
from ddpm_hf.publishing.model_card import write_distill_card
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.run_guard import RunStopped


def round_config(teacher: str, steps: int, output_dir: Path, steps_per_round: int, given: Dict[str, Any]) -> TrainingConfig:
    """The training config of the round whose student takes `steps` DDIM steps: DISTILLATION_DEFAULTS, then the
    training flags `given`, then what the round sets (its folder, teacher, steps and length); a round under way
    resumes from its latest checkpoint, a new one starts from its teacher's weights and takes its diffusion and UNet."""
    folder = Path(output_dir) / distill_round_dir(steps)
    overrides = {**DISTILLATION_DEFAULTS, **given, "output_dir": str(folder), "distill_teacher": teacher,
                 "distill_steps": steps, "max_train_steps": steps_per_round}
    if list_checkpoints(folder):
        overrides["resume_from_checkpoint"] = "latest"
    else:
        overrides["init_from"] = teacher
    return resolve_config(overrides)


def round_done(folder: Path, steps_per_round: int) -> bool:
    """Whether a round's run ended: its pipeline, its summary and its last checkpoint are there."""
    checkpoints = list_checkpoints(folder)
    return ((folder / MODEL_INDEX).is_file() and (folder / TRAIN_SUMMARY).is_file() and bool(checkpoints)
            and checkpoints[-1][0] == steps_per_round)


def round_folders(output_dir: Path) -> List[Path]:
    return sorted(p for p in Path(output_dir).glob(f"{DISTILL_ROUND_PREFIX}*") if p.is_dir() or p.is_symlink())


def distill_results(output_dir: Path) -> List[Path]:
    """What ddpm-distill writes by name into its folder: the rounds, the top pipeline's index and the card's files
    (a folder holding them without distill.json holds someone else's: refused)."""
    named = [Path(output_dir) / name for name in (MODEL_INDEX, MODEL_CARD, DISTILL_STUDENT_GRID, DISTILL_TEACHER_GRID,
                                                  DISTILL_TEACHER_SAMPLES)]
    return round_folders(output_dir) + [p for p in named if p.exists() or p.is_symlink()]


def draw_comparison(student, output_dir: Path, teacher: str, steps: int, guidance: float, count: int = 16) -> None:
    """The card's two grids in `output_dir`: the `student` pipeline at its `steps`, and its first teacher by DDIM on
    the same grid of `steps` (clipped where its scheduler clips, as the student learned it; guided at `guidance`
    where it is class-conditional, the student at its own guidance of 1); image i from seed i in both, of class i mod
    K in a class-conditional pair."""
    from ddpm_hf.diffusion.distillation import student_scheduler, teacher_clip
    from ddpm_hf.outputs.files import atomic_save_image
    from ddpm_hf.outputs.plots import image_grid
    from ddpm_hf.pipelines.guidance import num_classes
    from ddpm_hf.saved.weights import load_pipeline

    by_ddim = load_pipeline(teacher)
    config = dict(by_ddim.scheduler.config)
    by_ddim.scheduler = student_scheduler(config, steps, config["prediction_type"], teacher_clip(config))
    classes = num_classes(student.unet)
    labels = None if classes is None else [k % classes for k in range(2 * classes)]  # two rows, a class a column
    seeds = list(range(count if labels is None else len(labels)))
    for pipe, name, scale in ((student, DISTILL_STUDENT_GRID, 1.0), (by_ddim, DISTILL_TEACHER_GRID, guidance)):
        pipe.set_progress_bar_config(disable=True)
        guided = {} if labels is None else {"class_labels": labels, "guidance_scale": scale}
        images = pipe(batch_size=len(seeds), seeds=seeds, num_inference_steps=steps, output_type="pt", **guided).images
        atomic_save_image(image_grid(images, cols=classes), output_dir / name)


def draw_teacher_samples(teacher: str, folder: Path, num_images: int, steps: int, state, overwrite: bool) -> None:
    """--teacher_samples: `num_images` images of the teacher by its DDIM at `steps` (trailing, clipped where it clips:
    the first round's teacher), drawn as ddpm-sample draws (seed k for image k, its protocol in sampling.json, kept and
    resumed, shared across processes)."""
    from ddpm_hf.sampling.sample_folder import sample_command
    from ddpm_hf.saved.weights import load_pipeline

    pipe = load_pipeline(teacher)
    sample_command(pipe, pipeline_name=teacher, folder=folder, num_images=num_images, batch_size=min(num_images, 100),
                   sampler="ddim", num_inference_steps=steps, eta=None, seed=0, overwrite=overwrite, state=state,
                   timestep_spacing="trailing")


def distill(teacher: str, output_dir, *, from_steps: int, to_steps: int, steps_per_round: int,
            given: Dict[str, Any], state=None, overwrite: bool = False, hub_token: Optional[str] = None,
            teacher_samples: Optional[int] = None) -> Path:
    """Run the rounds from `from_steps` to `to_steps` (checked by the caller: `distillation.steps_problem`) into
    `output_dir`; returns the last round's folder. `given`: the training flags given, as train_ddpm.py takes them;
    with `teacher_samples` N, the rounds train on N images the teacher draws first (OUTPUT_DIR/teacher-samples/)."""
    from ddpm_hf.diffusion.distillation import rounds
    from ddpm_hf.saved.weights import load_pipeline, save_pipeline
    from ddpm_hf.training.loop import train

    output_dir = Path(output_dir)
    samples = output_dir / DISTILL_TEACHER_SAMPLES
    if teacher_samples is not None:
        given = {**given, "dataset": str(samples)}
    protocol = {"teacher": teacher, "from_steps": from_steps, "to_steps": to_steps, "steps_per_round": steps_per_round,
                "training": {k: given[k] for k in sorted(given)}}
    if teacher_samples is not None:  # recorded only where used: a folder distilled on data keeps its protocol
        protocol["teacher_samples"] = teacher_samples
        # before anything is drawn or recorded: the first round's settings, as the rounds will read them
        batch = round_config(teacher, rounds(from_steps, to_steps)[0], output_dir, steps_per_round, given).batch_size
        if teacher_samples < batch:
            raise UsageError(f"--teacher_samples {teacher_samples} is fewer than one batch of {batch}: draw at least "
                             f"{batch}, or lower --batch_size.")
    with FolderJob(output_dir, DISTILL_RECORD, protocol, state, free=("teacher", "rounds", "complete"),
                   results=distill_results, results_are="files and folders named as ddpm-distill's") as job:
        job.check("a distillation", "distill again from scratch", overwrite)
        if overwrite and job.is_main:
            for folder in round_folders(output_dir) + ([samples] if samples.exists() else []):
                remove_atomically(folder)
        done = [] if overwrite else list(job.recorded().get("rounds") or [])
        job.start((), False, rounds=done, complete=False)
        if teacher_samples is not None:  # every round trains on them: drawn (or completed) before the first
            draw_teacher_samples(teacher, samples, teacher_samples, from_steps, state, overwrite)
        current = teacher
        for steps in rounds(from_steps, to_steps):
            folder = output_dir / distill_round_dir(steps)
            if not round_done(folder, steps_per_round):
                try:
                    train(round_config(current, steps, output_dir, steps_per_round, given), hub_token=hub_token)
                except RunStopped as stopped:  # the round resumes as part of the rounds, not as a training run
                    raise stopped.resumed_by(f"the same `ddpm-distill ... {output_dir}` command (it carries on with "
                                             f"{folder.name} from that checkpoint)") from None
            if job.is_main and steps not in done:
                done.append(steps)
                job.record(rounds=done, complete=False)
            job.wait()
            current = str(folder)
        if job.finish():  # the last student at the top of the folder, as a pipeline of its own, with its card
            student = load_pipeline(current)
            save_pipeline(student, output_dir)
            draw_comparison(student, output_dir, teacher, to_steps, given.get("distill_guidance_scale", 1.0))
            job.record(rounds=done, complete=True)
            write_distill_card(output_dir)
        return Path(current)
