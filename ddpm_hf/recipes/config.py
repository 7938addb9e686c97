"""The one training config: a dataclass whose fields are the command-line flags (`flags.py` makes the flags from
it), the rules of what a resume may change, and the recipes a `--preset` names.

The resolved config is saved as `training_config.json` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ddpm_hf.choices import (
    DISTILL_WEIGHTINGS,
    MAX_GUIDANCE,
    STUDENT_PREDICTIONS,
    BAD_IMAGE_POLICIES,
    BETA_SCHEDULES,
    FEATURE_NETWORKS,
    LEARNED_VARIANCE_TYPES,
    LOSSES,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    PREDICTION_TYPES,
    SAMPLING_DTYPES,
    SNAPSHOT_DTYPES,
    TIMESTEP_SAMPLERS,
    TRACKERS,
    TRAINING_VARIANCE_TYPES,
)
from ddpm_hf.sizes import canonical, size_problem
from ddpm_hf.sizes import resolution as image_resolution
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.run_folder import (
    TRAINING_CONFIG,
)
from ddpm_hf.diffusion.phema import sigma_rels_problem, sigma_rels_text
from ddpm_hf.paths import DINOV2_DEFAULT

# post-hoc EMA's snapshots of each tracked EMA over a run, by default: the reconstruction's error falls as they get
# denser, and the disk they take grows (docs/training.md gives both for the paper's recipe)
POSTHOC_SNAPSHOTS = 64


def _f(default, help: str, choices: Optional[Sequence[str]] = None, parse=None):
    """A setting: its default, its flag's help, its choices, and `parse` where its flag's text is read by a function
    of its own (argparse's type), not by the field's type."""
    return field(default=default, metadata={"help": help, "choices": choices, "parse": parse})


@dataclass(frozen=True)
class TrainingConfig:
    """Every training setting. The defaults are the paper's CIFAR-10 recipe (Ho et al. 2020, Sec. 4 and Appendix B: the
    35.7M UNet with dropout 0.1, T = 1000 linear betas, ε-prediction, Adam 2e-4 with 5000 warmup steps, batch 128,
    gradient clipping at 1, EMA 0.9999, random flips, 800k steps). Frozen: a stage of setup that learns a setting (the
    precision, the classes, an epoch's steps) makes a new config with `dataclasses.replace`, and the Run holds the
    last."""

    # ---- data
    dataset: str = _f("cifar10", "'digits' (built in, offline), an alias (cifar10, mnist, ...), a Hub dataset id, a folder of images, or .parquet/.arrow file(s)")
    dataset_config: Optional[str] = _f(None, "the Hub dataset's config name")
    split: str = _f("train", "the Hub dataset's split")
    image_column: Optional[str] = _f(None, "the column holding images (default: img, image, or the only Image column)")
    class_conditional: bool = _f(False, "train a class-conditional model for classifier-free guidance (Ho & Salimans 2021): "
                                 "the UNet's class embedding learns the dataset's labels (--label_column)")
    label_column: Optional[str] = _f(None, "the column of class labels for --class_conditional (default: the only ClassLabel "
                                     "column; image folders with one sub-folder per class have one)")
    label_dropout: float = _f(0.1, "with --class_conditional, the probability that an image's label is replaced by \"no "
                              "class\" in a step: the same network learns the unconditional model that guidance needs")
    # resolved from the data, not a flag: the names of the classes (label order) of a --class_conditional run
    class_names: Optional[List[str]] = field(default=None, metadata={"help": "", "resolved": True})
    max_train_samples: Optional[int] = _f(None, "use only the first N images (quick experiments)")
    channels: int = _f(3, "image channels the model sees: 1 (grayscale) or 3 (RGB); inputs are converted")
    resolution: Union[int, str] = _f(32, "training images are resized (short side) and center-cropped to this size: "
                                     "N for N x N, or HxW (e.g. 32x64: 32 high, 64 wide)", parse=image_resolution)
    center_crop: bool = _f(True, "center-crop to a square after resizing (else squash)")
    random_flip: bool = _f(True, "flip each training image left-right with probability 1/2")
    streaming: bool = _f(False, "stream the dataset (for sets larger than the disk); decoded on the fly")
    on_bad_image: str = _f("stop", "an undecodable image stops the run (naming it) or is skipped and counted", BAD_IMAGE_POLICIES)
    cache_dir: Optional[str] = _f(None, "where Hub datasets are downloaded (default: the datasets cache, HF_DATASETS_CACHE)")
    # ---- model and diffusion
    unet_preset: str = _f("ddpm-cifar10-32", "UNet2DModel preset (see ddpm_hf.UNET_PRESETS); --unet_config replaces it")
    unet_config: Optional[str] = _f(None, "your own UNet2DModel config: a config.json, a folder holding one (or unet/config.json), "
                                    "or a Hub repo id; checked against --channels and --resolution")
    unet_subfolder: Optional[str] = _f(None, "the folder of --unet_config's repo or pipeline holding the UNet (default: unet, else the root)")
    init_from: Optional[str] = _f(None, "start from a pipeline's UNet weights (a folder or a Hub repo id, e.g. google/ddpm-celebahq-256): "
                                  "its UNet config and scheduler settings too, unless given; the EMA starts from the same weights")
    dropout: Optional[float] = _f(None, "UNet dropout (default: the preset's)")
    num_train_timesteps: int = _f(1000, "T, the number of diffusion steps")
    beta_schedule: str = _f("linear", "beta schedule", BETA_SCHEDULES)
    beta_start: float = _f(1e-4, "β_1, the first step's noise variance (linear schedule)")
    beta_end: float = _f(0.02, "β_T, the last step's noise variance (linear schedule)")
    prediction_type: str = _f("epsilon", "what the UNet predicts", PREDICTION_TYPES)
    variance_type: str = _f("fixed_small", "σ_t² of the reverse process: fixed_small (β̃_t) or fixed_large (β_t) as in the paper, "
                            "or learned by the UNet (2C output channels; needs --loss hybrid or vlb): learned_range "
                            "(improved DDPM) or learned (log σ²)", TRAINING_VARIANCE_TYPES)
    loss: str = _f("simple", "training objective: simple (L_simple, Eq. 14), vlb (the variational bound, Eq. 5) or hybrid "
                   "(improved DDPM's L_simple + λ·L_vlb, which trains a learned variance)", LOSSES)
    vlb_weight: float = _f(0.001, "λ of --loss hybrid (improved DDPM: 0.001)")
    timestep_sampler: str = _f("uniform", "how t is drawn: uniform (Algorithm 1) or loss-second-moment (improved DDPM's "
                               "importance sampling for --loss vlb)", TIMESTEP_SAMPLERS)
    snr_gamma: Optional[float] = _f(None, "min-SNR-γ loss weighting (e.g. 5.0); off by default (the paper's L_simple)")
    # ---- progressive distillation: one round (ddpm-distill runs the rounds, and sets these)
    distill_teacher: Optional[str] = _f(None, "instead of the data's own objective, train a student whose one DDIM step "
                                        "matches two of this teacher pipeline's (progressive distillation, Salimans & "
                                        "Ho 2022): its target x̃ replaces x_0, on the grid of --distill_steps")
    distill_steps: Optional[int] = _f(None, "the student's DDIM steps (its teacher takes twice as many)")
    distill_weighting: str = _f("truncated-snr", "the weight of the student's ‖x̃ - x̂‖²: max(SNR, 1) or SNR + 1 "
                                "(Salimans & Ho 2022, Sec. 4)", DISTILL_WEIGHTINGS)
    distill_guidance_scale: float = _f(1.0, "a class-conditional teacher's classifier-free guidance w in its target (0 "
                                       "unconditional, 1 conditional, > 1 guided): the student learns the guided "
                                       "teacher, and draws its images in one forward pass a step")
    # ---- optimisation
    batch_size: int = _f(128, "images per optimizer step, over all processes and accumulation steps")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    max_train_steps: Optional[int] = _f(800_000, "optimizer steps to train (replaced by --num_epochs when that is given)")
    num_epochs: Optional[int] = _f(None, "train this many passes over the data instead of --max_train_steps")
    learning_rate: float = _f(2e-4, "Adam learning rate")
    adam_beta1: float = _f(0.9, "Adam β1")
    adam_beta2: float = _f(0.999, "Adam β2")
    adam_epsilon: float = _f(1e-8, "Adam ε")
    weight_decay: float = _f(0.0, "Adam weight decay")
    optimizer: str = _f("adam", "adam (the paper; weight decay as L2) or adamw (decoupled weight decay, as diffusers' example)", OPTIMIZERS)
    lr_scheduler: str = _f("constant_with_warmup", "diffusers LR schedule", LR_SCHEDULES)
    lr_warmup_steps: int = _f(5000, "LR warmup steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 disables)")
    mixed_precision: str = _f("no", "mixed precision through Accelerate; auto: on a CPU bf16 where it times at least 10%% faster "
                              "than no on a few steps before training (the choice is saved with the run), on a GPU bf16 "
                              "where supported",
                              MIXED_PRECISIONS)
    max_nonfinite_in_a_row: int = _f(20, "stop after this many consecutive steps with a non-finite loss (each is skipped)")
    seed: int = _f(0, "seed for initialisation, data order, noise and timesteps: the same seed gives the same run")
    channels_last: bool = _f(False, "channels_last memory format (faster convolutions on GPUs)")
    gradient_checkpointing: bool = _f(False, "keep fewer activations for the backward pass and recompute them there "
                                      "(diffusers' UNet gradient checkpointing): less memory for more time, the same "
                                      "gradients; benchmarks/bench_memory.py measures both")
    compile: bool = _f(False, "torch.compile the UNet for training (the saved model is the plain one)")
    cuda_graph: bool = _f(True, "replay each training step as one CUDA graph where it can be (one CUDA process; not "
                                "fp16, --compile or --timestep_sampler loss-second-moment; the log says why not); "
                                "elsewhere each step runs eagerly, with the same data and randomness")
    deterministic: bool = _f(False, "torch's deterministic kernels where it has them and no cuDNN autotuning (slower): on a "
                                    "GPU, sums that do not depend on the order of atomic adds; a CPU run is bit-exact "
                                    "without it")
    # ---- EMA
    ema_decay: float = _f(0.9999, "EMA decay (the paper: 0.9999)")
    ema_warmup: bool = _f(False, "grow the EMA decay as 1 - (1 + n/inv_gamma)^-power up to --ema_decay")
    ema_inv_gamma: float = _f(1.0, "EMA warmup inv_gamma")
    ema_power: float = _f(0.75, "EMA warmup power")
    ema_update_after_step: int = _f(0, "copy the weights into the EMA until this step")
    ema_posthoc: bool = _f(False, "also track power-function EMAs and keep snapshots of them, so that ddpm-ema can "
                                  "reconstruct the EMA of any length after training (post-hoc EMA, Karras et al. 2024)")
    ema_posthoc_sigma_rels: str = _f("0.05,0.1", "the relative widths σ_rel of the tracked power EMAs, comma-separated "
                                     "(EDM2's two)", parse=sigma_rels_text)
    ema_posthoc_every: Optional[int] = _f(None, "write a snapshot of each tracked EMA every N steps (default: the run's "
                                          f"steps / {POSTHOC_SNAPSHOTS}, so that about {POSTHOC_SNAPSHOTS} snapshots of "
                                          "each span the run, at any length)")
    ema_posthoc_dtype: str = _f("fp16", "the snapshots' precision (EDM2 keeps them in fp16: half the disk)",
                                choices=SNAPSHOT_DTYPES)
    # ---- outputs
    output_dir: str = _f("runs/ddpm", "where the pipeline, checkpoints, grids and logs go")
    checkpointing_steps: int = _f(5000, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: Optional[int] = _f(3, "keep at most this many checkpoints (oldest removed first)")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' (the newest intact checkpoint) or a checkpoint folder to continue from")
    allow_config_change: bool = _f(False, "resume with settings that differ from the checkpoint's (each change is recorded in the run's config history)")
    overwrite_output_dir: bool = _f(False, "start over in an --output_dir that holds a run: its checkpoints, grids and logs are removed")
    save_images_steps: int = _f(5000, "save a sample grid (fixed seeds, EMA weights) every N steps")
    save_images_epochs: Optional[int] = _f(None, "save a sample grid every N epochs instead (converted to steps once the data is loaded)")
    save_model_epochs: Optional[int] = _f(None, "checkpoint every N epochs instead of --checkpointing_steps (converted to steps)")
    num_sample_images: int = _f(16, "images in each sample grid")
    sample_inference_steps: Optional[int] = _f(None, "sampler steps for grids (default: all T)")
    logging_steps: int = _f(50, "log the loss every N steps")
    # ---- evaluation during training
    eval_every: Optional[int] = _f(None, "every N steps, sample --eval_samples images from the EMA model and compute FID (and IS) against the training set")
    eval_samples: int = _f(1000, "images sampled for each evaluation (shared over all processes)")
    eval_steps: int = _f(50, "DDIM steps for the evaluation samples")
    keep_best: bool = _f(False, "keep the checkpoint with the best FID (FD_DINOv2) in best_checkpoint/ (outside the rotation limit)")
    eval_feature_network: str = _f("inception", "the feature space of --eval_every: Inception-v3 (FID, IS) or DINOv2 (FD_DINOv2)", FEATURE_NETWORKS)
    inception_weights: Optional[str] = _f(None, "Inception weights file for --eval_every (else $DDPM_HF_INCEPTION_WEIGHTS or the cache)")
    eval_dinov2_model: str = _f(DINOV2_DEFAULT, "the DINOv2 model of --eval_feature_network dinov2: a Hub id (cached ones work offline) or a folder")
    eval_cache_dir: Optional[str] = _f(None, "where reference statistics are cached (default $DDPM_HF_CACHE or ~/.cache/ddpm_hf)")
    eval_nll_every: Optional[int] = _f(None, "every N steps, the EMA model's NLL bound in bits/dim on --eval_nll_images held-out images")
    eval_nll_images: int = _f(256, "held-out images for --eval_nll_every (shared over all processes)")
    eval_nll_dataset: Optional[str] = _f(None, "the held-out images of --eval_nll_every: anything --dataset takes (default: --dataset)")
    eval_nll_split: str = _f("test", "the split of the held-out dataset")
    eval_dtype: str = _f("fp32", "the EMA network's dtype for --eval_every's samples and --eval_nll_every's bound (a copy; the "
                                 "chain and the bound's arithmetic stay float32/float64): bf16, or fp16 on a GPU, is faster",
                         SAMPLING_DTYPES)
    # ---- the Hub (the token is a flag of its own, --hub_token, and is never saved)
    card_figures: bool = _f(True, "at the end, the denoising animation and the progressive figure (Ho et al. Fig. 6) of the grid's first seeds, shown in the model card")
    push_to_hub: bool = _f(False, "push the pipeline, model card, grids, metrics and config to the Hub; the token and repo are checked before training starts")
    hub_model_id: Optional[str] = _f(None, "the Hub repo: 'name' (under your account) or 'namespace/name' (default: the output folder's name)")
    hub_private_repo: bool = _f(False, "create the Hub repo as private")
    hub_push_every: Optional[int] = _f(None, "also push the EMA pipeline so far every N steps, uploading in the background")
    report_to: str = _f("tensorboard", "experiment tracker", TRACKERS)
    preset: Optional[str] = _f(None, "a training recipe whose values replace the defaults (flags still win)")

    @property
    def grid_steps(self) -> int:
        """The sampler steps of the grids and the card's figures: a distillation round's student's own, else
        --sample_inference_steps, else the full chain."""
        return self.distill_steps or self.sample_inference_steps or self.num_train_timesteps

    def micro_batch(self, processes: int) -> int:
        """Images per process and micro-batch: --batch_size split over the processes and the accumulation steps (the
        most a step holds in memory at once, so also what an evaluation draws at a time)."""
        return max(1, self.batch_size // (processes * self.gradient_accumulation_steps))

    def __post_init__(self) -> None:
        try:  # one form of it, whether it came from a flag, a saved config or the Python API: 32, "32x64"
            object.__setattr__(self, "resolution", canonical(self.resolution))  # (frozen: set once, as it is made)
        except ValueError:
            pass  # validate() names the problem

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise UsageError(f"--{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}.")
        if (self.max_train_steps is None) == (self.num_epochs is None):
            raise UsageError("Give one of --max_train_steps or --num_epochs.")
        for name in ("max_train_steps", "num_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name}={value} must be at least 1.")
        self._validate_ranges()
        if self.channels not in (1, 3):
            raise UsageError(f"--channels={self.channels} is not supported; use 1 or 3.")
        if self.keep_best and not self.eval_every:
            raise UsageError("--keep_best needs --eval_every N (the FID it keeps the best checkpoint by).")
        for name in ("sample_inference_steps", "eval_steps"):
            steps = getattr(self, name) if name != "eval_steps" or self.eval_every else None
            if steps is not None and self.num_train_timesteps >= 1 and steps > self.num_train_timesteps:
                raise UsageError(f"--{name}={steps} is more than --num_train_timesteps={self.num_train_timesteps}; "
                                 f"use at most {self.num_train_timesteps}.")
        if self.variance_type in LEARNED_VARIANCE_TYPES and self.loss == "simple":
            raise UsageError(f"--variance_type {self.variance_type} is trained by the bound, which L_simple does not hold; "
                             "add --loss hybrid (improved DDPM) or --loss vlb.")
        if self.loss == "hybrid" and self.variance_type not in LEARNED_VARIANCE_TYPES:
            raise UsageError("--loss hybrid adds the bound to train a learned variance; with a fixed variance it is L_simple. "
                             "Add --variance_type learned_range, or use --loss simple or vlb.")
        if self.loss == "vlb" and self.snr_gamma is not None:
            raise UsageError("--snr_gamma weights L_simple's MSE; --loss vlb has the bound's own weighting. Drop one of them.")
        if not self.vlb_weight > 0:
            raise UsageError(f"--vlb_weight={self.vlb_weight} must be positive (improved DDPM: 0.001).")
        self._validate_distillation()
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise UsageError("--overwrite_output_dir starts over; it cannot go with --resume_from_checkpoint.")
        if any(getattr(self, k) for k in HUB_SETTINGS) and not self.push_to_hub:
            raise UsageError("--hub_model_id, --hub_private_repo and --hub_push_every need --push_to_hub.")
        try:
            canonical(self.resolution)
        except ValueError as e:
            raise UsageError(f"--resolution: {e}.") from None
        for name in ("batch_size", "gradient_accumulation_steps", "checkpointing_steps", "sample_inference_steps",
                     "save_images_steps", "logging_steps", "num_sample_images", "eval_samples", "eval_steps", "hub_push_every",
                     "eval_nll_every", "eval_nll_images", "save_images_epochs", "save_model_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: an Optional setting that is off
                raise UsageError(f"--{name}={value} must be at least 1.")

    def _validate_distillation(self) -> None:
        """A distillation round: a student of the kind it can be, on a grid its teacher's T holds."""
        if (self.distill_teacher is None) != (self.distill_steps is None):
            raise UsageError("--distill_teacher and --distill_steps go together (ddpm-distill sets both for each round).")
        if self.distill_teacher is None:
            if self.distill_guidance_scale != 1.0:
                raise UsageError("--distill_guidance_scale is for a distillation round (--distill_teacher); drop it.")
            return
        if self.distill_steps < 1:
            raise UsageError(f"--distill_steps={self.distill_steps} must be at least 1.")
        if 2 * self.distill_steps > self.num_train_timesteps:  # the teacher's grid would repeat timesteps
            raise UsageError(f"--distill_steps={self.distill_steps}: its teacher's {2 * self.distill_steps} steps are more "
                             f"than the {self.num_train_timesteps} training timesteps; use at most "
                             f"{self.num_train_timesteps // 2}.")
        if self.prediction_type not in STUDENT_PREDICTIONS:
            raise UsageError(f"--prediction_type {self.prediction_type}: a student predicts one of "
                             f"{', '.join(STUDENT_PREDICTIONS)} (an ε-prediction's x̂ divides by α, which vanishes at "
                             "the pure-noise end).")
        if self.variance_type in LEARNED_VARIANCE_TYPES or self.loss != "simple" or self.timestep_sampler != "uniform":
            raise UsageError("a distillation round trains its own objective: leave --variance_type, --loss and "
                             "--timestep_sampler at their defaults.")
        if not 0 <= self.distill_guidance_scale <= MAX_GUIDANCE:  # NaN and inf too
            raise UsageError(f"--distill_guidance_scale {self.distill_guidance_scale}: give a scale from 0 to "
                             f"{MAX_GUIDANCE:g} (0 unconditional, 1 conditional, > 1 guided).")
        if self.distill_guidance_scale != 1.0 and not self.class_conditional:
            raise UsageError(f"--distill_guidance_scale {self.distill_guidance_scale} guides a class-conditional "
                             "teacher, and this one is unconditional; drop it.")

    def _validate_ranges(self) -> None:
        """Numbers outside the range where they mean something: each is one line naming the flag and the fix."""
        from ddpm_hf.diffusion.unets import UNET_PRESETS, downsampling_factor

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UsageError(message)

        need(self.num_train_timesteps >= 1, f"--num_train_timesteps={self.num_train_timesteps} must be at least 1 (the paper: 1000).")
        need(self.beta_schedule in ("squaredcos_cap_v2", "laplace") or 0 < self.beta_start < self.beta_end < 1,
             f"--beta_start={self.beta_start} and --beta_end={self.beta_end} must satisfy 0 < beta_start < beta_end < 1 "
             "(the paper: 1e-4 and 0.02).")
        need(self.learning_rate > 0, f"--learning_rate={self.learning_rate} must be positive (the paper: 2e-4).")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1,
             f"--adam_beta1={self.adam_beta1} and --adam_beta2={self.adam_beta2} must be in [0, 1) (Adam: 0.9 and 0.999).")
        need(self.adam_epsilon > 0, f"--adam_epsilon={self.adam_epsilon} must be positive (Adam: 1e-8).")
        need(self.weight_decay >= 0, f"--weight_decay={self.weight_decay} must not be negative.")
        need(self.max_grad_norm >= 0, f"--max_grad_norm={self.max_grad_norm} must not be negative (0 turns clipping off).")
        need(self.lr_warmup_steps >= 0, f"--lr_warmup_steps={self.lr_warmup_steps} must not be negative.")
        need(0 <= self.ema_decay < 1, f"--ema_decay={self.ema_decay} must be in [0, 1) (the paper: 0.9999).")
        need(self.ema_inv_gamma > 0 and self.ema_power > 0,
             f"--ema_inv_gamma={self.ema_inv_gamma} and --ema_power={self.ema_power} must be positive.")
        need(self.ema_update_after_step >= 0, f"--ema_update_after_step={self.ema_update_after_step} must not be negative.")
        need(not sigma_rels_problem(self.ema_posthoc_sigma_rels),
             f"--ema_posthoc_sigma_rels: {sigma_rels_problem(self.ema_posthoc_sigma_rels)}.")
        need(self.ema_posthoc_every is None or self.ema_posthoc_every >= 1,
             f"--ema_posthoc_every={self.ema_posthoc_every} must be at least 1 (or none: about {POSTHOC_SNAPSHOTS} "
             "snapshots over the run).")
        need(self.dropout is None or 0 <= self.dropout < 1, f"--dropout={self.dropout} must be in [0, 1).")
        need(0 <= self.label_dropout < 1, f"--label_dropout={self.label_dropout} must be in [0, 1) (Ho & Salimans 2021: "
             "0.1 or 0.2; 0 trains no unconditional model, so guidance cannot be used).")
        need(self.snr_gamma is None or self.snr_gamma > 0, f"--snr_gamma={self.snr_gamma} must be positive (e.g. 5).")
        need(self.max_nonfinite_in_a_row >= 1, f"--max_nonfinite_in_a_row={self.max_nonfinite_in_a_row} must be at least 1.")
        need(self.max_train_samples is None or self.max_train_samples >= 1,
             f"--max_train_samples={self.max_train_samples} must be at least 1 (or none).")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit={self.checkpoints_total_limit} must be at least 1 (or none: keep all).")
        need(self.unet_preset in UNET_PRESETS,
             f"--unet_preset {self.unet_preset!r} is not one of {', '.join(sorted(UNET_PRESETS))}.")
        factor = 1 if self.unet_config else downsampling_factor(UNET_PRESETS[self.unet_preset])  # a config is checked when read
        problem = size_problem(self.resolution, factor, where=f" (--unet_preset {self.unet_preset})")
        need(problem is None, f"{problem}.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    def save(self, folder) -> Path:
        from ddpm_hf.outputs.files import atomic_write_text

        path = Path(folder) / TRAINING_CONFIG
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def setting_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def load(cls, path) -> "TrainingConfig":
        data = json.loads(Path(path).read_text())
        unknown = set(data) - cls.setting_names()
        if unknown:
            raise UsageError(f"{path} has keys this version does not know: {sorted(unknown)}.")
        return cls(**data)


# settings every training_config.json of ours has held: with no key we do not know, what tells ours from a file of the
# same name that another tool wrote
ALWAYS_SAVED = ("dataset", "resolution", "learning_rate", "seed", "ema_decay", "output_dir")


def saved_by_us(path) -> bool:
    """Whether `path` is a training_config.json a ddpm_hf run wrote (by its content, not its name)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) <= TrainingConfig.setting_names() and set(ALWAYS_SAVED) <= set(data)


# Settings a resume may change without --allow_config_change: how long to train, how often to save, log and
# measure, and where results go; not what is trained or how.
# the settings only --push_to_hub uses (a resume with --no-push_to_hub drops the ones it inherited)
HUB_SETTINGS = ("hub_model_id", "hub_private_repo", "hub_push_every")

RESUMABLE_SETTINGS = (
    "max_train_steps", "num_epochs", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "allow_config_change", "overwrite_output_dir", "save_images_steps", "num_sample_images",
    "sample_inference_steps", "logging_steps", "max_nonfinite_in_a_row", "eval_every", "eval_samples", "eval_steps",
    "keep_best", "inception_weights", "eval_cache_dir", "card_figures", "eval_nll_every", "eval_nll_images", "eval_nll_dataset",
    "eval_nll_split", "eval_dtype", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_push_every", "report_to", "preset",
    "cache_dir", "init_from", "save_images_epochs", "save_model_epochs", "cuda_graph",
    "deterministic", "gradient_checkpointing", "ema_posthoc_every", "ema_posthoc_dtype",
)


def config_changes(old: TrainingConfig, new: TrainingConfig) -> Dict[str, list]:
    """{setting: [old, new]} for every setting outside RESUMABLE_SETTINGS that differs."""
    return {f.name: [getattr(old, f.name), getattr(new, f.name)] for f in dataclasses.fields(TrainingConfig)
            if f.name not in RESUMABLE_SETTINGS and getattr(old, f.name) != getattr(new, f.name)}


# Settings that make the network what it is: a resumed run goes on with the checkpoint's network, so a change to one
# of these cannot apply, and is refused even with --allow_config_change.
NETWORK_SETTINGS = ("unet_preset", "unet_config", "unet_subfolder", "dropout", "resolution", "channels", "class_conditional",
                    "label_column", "class_names")


# Post-hoc EMA's tracked averages are over the whole run: a resume that would change them is refused, always.
POSTHOC_SETTINGS = ("ema_posthoc", "ema_posthoc_sigma_rels")


def checkpoint_settings(checkpoint: Path, output_dir: Path) -> Optional[TrainingConfig]:
    """The settings the run of `checkpoint` trained with: its own training_config.json, else the output folder's."""
    saved = next((p for p in (checkpoint / TRAINING_CONFIG, output_dir / TRAINING_CONFIG) if p.is_file()), None)
    return TrainingConfig.load(saved) if saved else None


def resume_changes(config: TrainingConfig, checkpoint: Path) -> Dict[str, list]:
    """The settings in which `config` differs from the run the checkpoint belongs to (its own config, else the output
    folder's); refused, before any data or model work, unless --allow_config_change, and always where the change
    cannot apply to the checkpoint's network (NETWORK_SETTINGS, or a learned variance turned on or off)."""
    saved = checkpoint_settings(checkpoint, Path(config.output_dir))
    changes = config_changes(saved, config) if saved is not None else {}
    fixed = {k: v for k, v in changes.items() if k in NETWORK_SETTINGS or
             (k == "variance_type" and (v[0] in LEARNED_VARIANCE_TYPES) != (v[1] in LEARNED_VARIANCE_TYPES))}
    if fixed:
        listed = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in fixed.items())
        raise UsageError(f"{checkpoint.name} holds a network of other settings ({listed}), which a resumed run cannot "
                         "change (--allow_config_change covers how it trains: learning rate, steps, EMA, logging, ...); "
                         f"resume with its settings, or start a new run from this run's pipeline (--init_from "
                         f"{config.output_dir}).")
    averages = {k: v for k, v in changes.items() if k in POSTHOC_SETTINGS}
    if averages:
        listed = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in averages.items())
        raise UsageError(f"{checkpoint.name} tracks other power EMAs ({listed}): their averages start at step 0, so a "
                         "resume cannot add, drop or change them, even with --allow_config_change; resume with its "
                         "settings, or start a new run.")
    if changes and not config.allow_config_change:
        listed = ", ".join(f"--{k} {old} -> {new}" for k, (old, new) in changes.items())
        raise UsageError(f"{checkpoint.name} was trained with other settings ({listed}); resume with its settings, or add "
                         "--allow_config_change to train on with these (recorded in the run's config history).")
    return changes


# What each round of ddpm-distill trains with unless its flags say otherwise (Salimans & Ho 2022, App. E: Adam at
# 5e-5 annealed linearly to 0 within each round, no EMA, no dropout; a v-prediction student, Sec. 4)
DISTILLATION_DEFAULTS: Dict[str, Any] = dict(learning_rate=5e-5, lr_scheduler="linear", lr_warmup_steps=0, ema_decay=0.0,
                                             ema_warmup=False, dropout=0.0, prediction_type="v_prediction")
# ... and what ddpm-distill sets for each round itself (from its teacher and its own flags): not training flags there
DISTILLATION_SETS = ("output_dir", "distill_teacher", "distill_steps", "distill_guidance_scale", "class_conditional",
                     "init_from", "max_train_steps", "num_epochs", "resume_from_checkpoint", "overwrite_output_dir",
                     "unet_config", "unet_subfolder", "unet_preset", "channels", "resolution", "num_train_timesteps",
                     "beta_schedule", "beta_start", "beta_end", "variance_type", "loss", "timestep_sampler",
                     "allow_config_change", "hub_push_every")

# Recipes: values that replace the defaults. Each is a complete, named experiment.
RECIPES: Dict[str, Dict[str, Any]] = {
    # The defaults: CIFAR-10 at FID 3.17 / IS 9.46 in the paper.
    "ddpm-cifar10": {},
    # The quick start: recognisable 16x16 digits from the built-in set in under 3 minutes on 2 CPU cores.
    # Precision by measurement: bf16 autocast was 1.44x fp32 on one CPU with AVX512-BF16 and 0.7-0.93x on others
    # (benchmarks/bench_train.py), at the same loss; grids with 100 strided DDPM steps, as recognisable as with 1000.
    "digits-cpu": dict(
        dataset="digits", channels=1, resolution=16, random_flip=False, unet_preset="cpu-digits", dropout=0.0,
        learning_rate=2e-3, batch_size=64, lr_scheduler="cosine", lr_warmup_steps=100, max_train_steps=1200,
        ema_decay=0.999, ema_warmup=True, checkpointing_steps=400, save_images_steps=400, logging_steps=25,
        num_sample_images=25, sample_inference_steps=100, mixed_precision="auto", output_dir="runs/digits",
    ),
    # diffusers' examples/unconditional_image_generation/train_unconditional.py as it runs by default: its UNet,
    # AdamW (0.95, 0.999, weight decay 1e-6), cosine LR with 500 warmup steps, 100 epochs of 16, no EMA unless
    # --use_ema, grids and models every 10 epochs. (It random-crops without --center_crop; ddpm_hf center-crops.)
    "diffusers-example": dict(
        dataset="huggan/flowers-102-categories", resolution=64, center_crop=True, random_flip=False,
        unet_preset="diffusers-example", learning_rate=1e-4, lr_scheduler="cosine", lr_warmup_steps=500,
        adam_beta1=0.95, adam_beta2=0.999, weight_decay=1e-6, optimizer="adamw", adam_epsilon=1e-8, batch_size=16,
        max_train_steps=None, num_epochs=100, ema_decay=0.0, ema_warmup=False, save_images_epochs=10,
        save_model_epochs=10, num_sample_images=16, sample_inference_steps=1000, output_dir="ddpm-model-64",
        checkpoints_total_limit=None, seed=0,
    ),
}

def describe_recipe(name: str) -> str:
    """A preset in a few words: what it trains and the settings it changes."""
    values = RECIPES[name]
    if not values:
        return "the paper's CIFAR-10 recipe (the defaults)"
    shown = ("dataset", "resolution", "unet_preset", "batch_size", "learning_rate", "max_train_steps", "num_epochs",
             "mixed_precision", "output_dir")
    return ", ".join(f"{k}={values[k]}" for k in shown if values.get(k) is not None)
