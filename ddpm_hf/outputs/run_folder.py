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
"""

from typing import Optional

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
    EVALUATION, EVALUATION_TABLE, GUIDANCE_PLOT,
)

# What a training run itself leaves besides the pipeline, the card and its config: removed (with the checkpoints) when
# --overwrite_output_dir starts the folder over.
RUN_PRODUCTS = (
    BEST_CHECKPOINT, SAMPLE_GRIDS_DIR, SAMPLE_GRID, LOGS_DIR, TRAIN_SUMMARY, LOSS_CURVE, PROGRESSIVE,
    *DENOISING_ANIMATIONS, FIGURES_RECORD,
)
