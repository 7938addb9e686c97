"""The names of the files in a run's output folder, defined once. No heavy imports: the command lines read these.

Every other module (the loop, the checkpoints, the model card, the Hub allow-list, clearing an earlier run, the
commands' help) takes a name from here. A run folder holds:

    model_index.json, unet/, scheduler/     the pipeline (EMA weights), as save_pretrained writes it
    ddpm_hf_hashes.json                     the SHA-256 of the pipeline's files, verified when a command loads it
    .ddpm_hf-run                            marks the folder as a ddpm_hf run's; locked while a run trains
    README.md                               the model card
    training_config.json                    the resolved config (also inside every checkpoint)
    checkpoint-<step>/, best_checkpoint/    resumable checkpoints (trainer_state.json written last)
    samples.png, samples/step-*.png         sample grids from fixed seeds
    denoising.gif|webp, progressive.png     the card's figures, and figures.json saying how they were made
    loss_curve.png, train_summary.json      the loss curve and the summary of the run
    metrics.json, metrics-dinov2.json       ddpm-metrics' results (--output into the folder)
    nll.json                                ddpm-nll's result (--output into the folder)
    evaluation.json, evaluation.md          ddpm-evaluate's report (with eval_samples/, eval_nll/, metrics-<mode>.json)
                                            (a class-conditional pipeline: eval_samples/guidance-<w>/,
                                            metrics-<mode>-guidance-<w>.json and guidance.png, FID against IS)
    logs/                                   tracker logs (TensorBoard)
    ema_snapshots/                          with --ema_posthoc: snapshots of the power EMAs (snapshots.json lists
                                            them with their SHA-256), which ddpm-ema reconstructs other EMAs from
    posthoc_ema.json, ema_sweep.png         ddpm-ema --keep best: the published weights are a post-hoc EMA (which
                                            σ_rel, from which snapshots) chosen by the sweep in the plot
"""

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional

# the pipeline (save_pretrained's layout)
MODEL_INDEX = "model_index.json"
UNET_DIR = "unet"
SCHEDULER_DIR = "scheduler"
UNET_WEIGHTS = f"{UNET_DIR}/diffusion_pytorch_model.safetensors"
UNET_CONFIG = f"{UNET_DIR}/config.json"
SCHEDULER_CONFIG = f"{SCHEDULER_DIR}/scheduler_config.json"
MODEL_CARD = "README.md"
# the google/ddpm-* repos keep both configs at the root
ROOT_LAYOUT_UNET_CONFIG = "config.json"
ROOT_LAYOUT_SCHEDULER_CONFIG = "scheduler_config.json"

# the SHA-256 of every file of a pipeline we save (plain diffusers ignores it; our commands verify it)
PIPELINE_HASHES = "ddpm_hf_hashes.json"

# what the run writes beside the pipeline
RUN_MARKER = ".ddpm_hf-run"  # marks a ddpm_hf run folder; the running run's lock (hidden: never uploaded)
TRAINING_CONFIG = "training_config.json"
TRAIN_SUMMARY = "train_summary.json"
LOSS_CURVE = "loss_curve.png"
SAMPLE_GRID = "samples.png"
SAMPLE_GRIDS_DIR = "samples"
PROGRESSIVE = "progressive.png"
DENOISING_STEM = "denoising"  # denoising.gif or denoising.webp, whichever is smaller
DENOISING_ANIMATIONS = (f"{DENOISING_STEM}.webp", f"{DENOISING_STEM}.gif")
FIGURES_RECORD = "figures.json"
LOGS_DIR = "logs"
# ddpm-visualize's other figures (the paper's Fig. 8 and the forward process), beside the two a run makes
FORWARD = "forward.png"
FORWARD_STEM = "forward"  # its animation: forward.gif or forward.webp
INTERPOLATION = "interpolate.png"
FIGURE_FILES = (PROGRESSIVE, *DENOISING_ANIMATIONS, FORWARD, f"{FORWARD_STEM}.webp", f"{FORWARD_STEM}.gif",
                INTERPOLATION)


def figure_files(folder: Path) -> List[Path]:
    """The files of `folder` named as one of the paper's figures (FIGURE_FILES): ours only beside figures.json."""
    return [Path(folder) / name for name in FIGURE_FILES if os.path.lexists(Path(folder) / name)]


# checkpoints: checkpoint-<step>/ (rotated) and best_checkpoint/ (kept); their files
CHECKPOINT_PREFIX = "checkpoint-"
BEST_CHECKPOINT = "best_checkpoint"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
CHECKPOINT_UNET = "unet.safetensors"
CHECKPOINT_EMA = "ema.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_UNET_CONFIG = "unet_config.json"  # the network's config: a resume needs no --unet_config source
# what a checkpoint of ours holds (its trainer_state.json lists them; these where that file does not read)
CHECKPOINT_FILES = (CHECKPOINT_UNET, CHECKPOINT_EMA, CHECKPOINT_OPTIMIZER, CHECKPOINT_UNET_CONFIG, TRAINING_CONFIG,
                    TRAINER_STATE)

# post-hoc EMA: a checkpoint's tracked power EMAs, one file per σ_rel; the run's snapshots of them, listed (with their
# hashes) in the folder's index, written after each snapshot
def checkpoint_power_ema(sigma_rel: float) -> str:
    return f"ema_power-sigma_rel-{sigma_rel:g}.safetensors"


EMA_SNAPSHOTS_DIR = "ema_snapshots"
SNAPSHOT_INDEX = "snapshots.json"


def snapshot_file(step: int, sigma_rel: float) -> str:
    return f"step-{step:08d}-sigma_rel-{sigma_rel:g}.safetensors"


# what ddpm-ema writes: a pipeline per σ_rel (with its provenance), the sweep's table and plot
def posthoc_pipeline_dir(sigma_rel: float) -> str:
    return f"sigma_rel-{sigma_rel:g}"


POSTHOC_RECORD = "posthoc_ema.json"  # in each pipeline folder: the snapshots and weights it was made from
EMA_SWEEP = "ema_sweep.json"
EMA_SWEEP_TABLE = "ema_sweep.md"
EMA_SWEEP_PLOT = "ema_sweep.png"

# what the measuring commands write (ddpm-metrics, ddpm-nll; --output puts them into a run folder)
METRICS = "metrics.json"
NLL = "nll.json"

# what ddpm-evaluate writes into its folder (a run folder or any other): the report, and its stages' folders, named
# apart from a run's own samples/ grids
EVALUATION = "evaluation.json"
EVALUATION_TABLE = "evaluation.md"
EVALUATION_SAMPLES_DIR = "eval_samples"
EVALUATION_NLL_DIR = "eval_nll"


def evaluation_metrics_file(mode: str, guidance_scale: Optional[float] = None) -> str:
    """ddpm-evaluate's metrics in clean-fid mode `mode` (of a class-conditional pipeline: at `guidance_scale`)."""
    return f"metrics-{mode}.json" if guidance_scale is None else f"metrics-{mode}-guidance-{guidance_scale:g}.json"


# what ddpm-distill writes: a training run per round (round-<its steps>/), its record, and the last round's student
# at the top of the folder
DISTILL_RECORD = "distill.json"
# the top folder's card pictures: the last student at its steps, and its first teacher by DDIM at the same steps
DISTILL_STUDENT_GRID = "student_samples.png"
DISTILL_TEACHER_GRID = "teacher_ddim_samples.png"
DISTILL_ROUND_PREFIX = "round-"
# --teacher_samples: the images the teacher draws first, which every round trains on where the user has no data
DISTILL_TEACHER_SAMPLES = "teacher-samples"


def distill_round_dir(steps: int) -> str:
    """The folder of the distillation round whose student takes `steps` DDIM steps."""
    return f"{DISTILL_ROUND_PREFIX}{steps}"


def evaluation_metrics_files(folder: Path) -> List[Path]:
    """The files of `folder` named as ddpm-evaluate's metrics, of every FID mode and guidance scale."""
    from ddpm_hf.choices import FID_MODES

    names = {evaluation_metrics_file(mode) for mode in FID_MODES}
    return sorted(p for p in Path(folder).glob("metrics-*.json") if p.name in names or any(
        p.name.startswith(evaluation_metrics_file(mode, 0.0)[:-len("0.json")]) for mode in FID_MODES))


def evaluation_samples_dir(guidance_scale: Optional[float] = None) -> str:
    """ddpm-evaluate's samples (of a class-conditional pipeline: class-balanced, at `guidance_scale`)."""
    return EVALUATION_SAMPLES_DIR if guidance_scale is None else f"{EVALUATION_SAMPLES_DIR}/guidance-{guidance_scale:g}"


# ddpm-evaluate's FID against IS over the guidance scales of a class-conditional pipeline (Ho & Salimans 2021, Fig. 4)
GUIDANCE_PLOT = "guidance.png"


def metrics_file(kind: str) -> str:
    """The metrics file of a feature space: metrics.json for Inception, metrics-<kind>.json for another."""
    return METRICS if kind == "inception" else f"metrics-{kind}.json"


METRICS_DINOV2 = metrics_file("dinov2")


def sample_grid_file(step: int) -> str:
    return f"{SAMPLE_GRIDS_DIR}/step-{step:07d}.png"


# What a Hub repo of ours holds: a path is uploaded only when it matches one of these. Never checkpoints,
# optimizer state or logs.
PUBLISHED = (
    MODEL_INDEX, UNET_CONFIG, UNET_WEIGHTS, SCHEDULER_CONFIG, MODEL_CARD, SAMPLE_GRID, f"{SAMPLE_GRIDS_DIR}/step-*.png",
    PROGRESSIVE, *DENOISING_ANIMATIONS, FIGURES_RECORD, METRICS, METRICS_DINOV2, TRAINING_CONFIG, LOSS_CURVE,
    EVALUATION, EVALUATION_TABLE, GUIDANCE_PLOT, POSTHOC_RECORD, EMA_SWEEP_PLOT,
    DISTILL_RECORD, DISTILL_STUDENT_GRID, DISTILL_TEACHER_GRID,  # a distilled folder's: its protocol and card's grids
)
# what ddpm-push --push_snapshots adds: post-hoc EMA's snapshots, for others to reconstruct their own EMA lengths
PUBLISHED_SNAPSHOTS = (f"{EMA_SNAPSHOTS_DIR}/*",)

# What a training run itself leaves besides the pipeline, the card and its config: removed (with the checkpoints) when
# --overwrite_output_dir starts the folder over.
RUN_PRODUCTS = (
    BEST_CHECKPOINT, SAMPLE_GRIDS_DIR, SAMPLE_GRID, LOGS_DIR, TRAIN_SUMMARY, LOSS_CURVE, PROGRESSIVE,
    *DENOISING_ANIMATIONS, FIGURES_RECORD, EMA_SNAPSHOTS_DIR, POSTHOC_RECORD, EMA_SWEEP_PLOT,
)


def named_step(folder: Path) -> Optional[int]:
    """The step a checkpoint-<step> folder's name says; None for a folder named otherwise (best_checkpoint)."""
    suffix = Path(folder).name[len(CHECKPOINT_PREFIX):]
    return int(suffix) if Path(folder).name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() else None


def checkpoint_folders(output_dir: Path) -> List[Path]:
    """Every checkpoint-* folder in output_dir, readable or not."""
    return sorted(f for f in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if f.is_dir())


def list_checkpoints(output_dir: Path) -> List[tuple]:
    """(step, folder) of every checkpoint whose state file reads and names the step of the folder's name, oldest
    first. Others are left alone (never rotated away) and named as damaged by a resume."""
    found = []
    for folder in checkpoint_folders(output_dir):
        try:
            step = json.loads((folder / TRAINER_STATE).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(step, int) and step == named_step(folder):
            found.append((step, folder))
    return sorted(found)


def saved_config_files(output_dir: Path, which: str) -> List[Path]:
    """Where the config of the run a resume continues may be, best first: in the checkpoint (`latest`: the newest
    whose state reads; else the folder `which`), then in the output folder."""
    folder = Path(output_dir)
    if which == "latest":
        newest = list_checkpoints(folder)[-1:]
        candidates = [checkpoint / TRAINING_CONFIG for _, checkpoint in newest]
    else:
        candidates = [named_checkpoint(folder, which) / TRAINING_CONFIG]
    return candidates + [folder / TRAINING_CONFIG]


def named_checkpoint(output_dir: Path, which: str) -> Path:
    """The folder --resume_from_checkpoint names (not `latest`): a path as it is; a bare checkpoint-<step> that is not
    a folder here is the one inside the output folder, as diffusers' train_unconditional.py takes it."""
    path = Path(which).expanduser()
    if not path.is_dir() and path.name == which and which.startswith(CHECKPOINT_PREFIX):
        return Path(output_dir) / which
    return path


# The card's last line: the SHA-256 of the text above it. A card that still matches it is one we wrote, which a later
# run may write over; one that does not (edited by hand, or the user's own README.md) is the user's, and a run refuses
# to write over it (run_guard.user_files_in_run). The record sits in the card itself, so writing the card stays one
# atomic write. An HTML comment: the Hub does not show it.
CARD_STAMP = "<!-- written by ddpm_hf; the SHA-256 of the text above: {} -->"


def stamped_card(text: str) -> str:
    body = text if text.endswith("\n") else text + "\n"
    return body + CARD_STAMP.format(hashlib.sha256(body.encode()).hexdigest()) + "\n"


def card_is_ours(path: Path) -> bool:
    """Whether the card at `path` is as we wrote it: its last line the SHA-256 of the text above it."""
    try:
        text = Path(path).read_bytes().decode()
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    return bool(body) and last == CARD_STAMP.format(hashlib.sha256((body + "\n").encode()).hexdigest())



def pipeline_source_problem(source: str) -> Optional[str]:
    """What is wrong with a pipeline argument, known without loading anything (so a command answers before torch
    loads): a local path that is not there, a file, or a folder that holds no pipeline. None for a pipeline folder or a
    Hub repo id (which loading checks)."""
    from ddpm_hf.paths import names_a_local_path

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MODEL_INDEX).is_file():
            return None
        return (f"{source} holds no pipeline (no {MODEL_INDEX}); give the folder a training run or save_pretrained "
                "wrote (a run writes its pipeline at its first checkpoint), or a Hub repo id.")
    if path.exists():
        return f"{source} is a file; give the folder a training run or save_pretrained wrote, or a Hub repo id."
    if names_a_local_path(source):
        return (f"{source}: no such file or folder; give the folder a training run or save_pretrained wrote (or a Hub "
                "repo id).")
    return None


def distilled_steps(source: str) -> Optional[int]:
    """The DDIM steps a distilled pipeline was made for, read from a local folder without loading it: a round's
    training_config.json (distill_steps), or the top folder's distill.json once its rounds are complete (to_steps);
    None for any other pipeline, or one not local."""
    folder = Path(source).expanduser()
    for name, key, done in ((TRAINING_CONFIG, "distill_steps", None), (DISTILL_RECORD, "to_steps", "complete")):
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get(key), int) and (done is None or record.get(done) is True):
            return record[key]
    return None


def steps_problem(source: str, num_inference_steps: int, flag: str = "--num_inference_steps") -> Optional[str]:
    """A chain longer than the pipeline's T (read from its scheduler config in a local folder, without loading it), so
    that the count is refused before anything loads or is written; None where it fits or the folder is not local."""
    folder = Path(source).expanduser()
    for name in (SCHEDULER_CONFIG, ROOT_LAYOUT_SCHEDULER_CONFIG):
        try:
            T = int(json.loads((folder / name).read_text())["num_train_timesteps"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if num_inference_steps > T:
            return (f"{flag} {num_inference_steps}: the pipeline {source} has T = {T} timesteps, so its chain takes 1 "
                    f"to {T} steps")
        return None
    return None
