"""The one training config: a dataclass whose fields are the command-line flags, with recipe presets.

Precedence: the dataclass defaults < a `--preset` recipe < flags given on the command line.
The resolved config is saved as `training_config.json` in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .choices import (
    BAD_IMAGE_POLICIES,
    BETA_SCHEDULES,
    LEARNED_VARIANCE_TYPES,
    LOSSES,
    LR_SCHEDULES,
    MIXED_PRECISIONS,
    PREDICTION_TYPES,
    TIMESTEP_SAMPLERS,
    TRACKERS,
    TRAINING_VARIANCE_TYPES,
)


def _f(default, help: str, choices: Optional[Sequence[str]] = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainingConfig:
    """Every training setting. The defaults are the paper's CIFAR-10 recipe (Ho et al. 2020, Sec. 4 and
    Appendix B: the 35.7M UNet with dropout 0.1, T = 1000 linear betas, ε-prediction, Adam 2e-4 with 5000
    warmup steps, batch 128, gradient clipping at 1, EMA 0.9999, random flips, 800k steps)."""

    # ---- data
    dataset: str = _f("cifar10", "'digits' (built in, offline), an alias (cifar10, mnist, ...), a Hub dataset id, a folder of images, or .parquet/.arrow file(s)")
    dataset_config: Optional[str] = _f(None, "the Hub dataset's config name")
    split: str = _f("train", "the Hub dataset's split")
    image_column: Optional[str] = _f(None, "the column holding images (default: img, image, or the only Image column)")
    max_train_samples: Optional[int] = _f(None, "use only the first N images (quick experiments)")
    channels: int = _f(3, "image channels the model sees: 1 (grayscale) or 3 (RGB); inputs are converted")
    resolution: int = _f(32, "training images are resized (short side) and center-cropped to this size")
    center_crop: bool = _f(True, "center-crop to a square after resizing (else squash)")
    random_flip: bool = _f(True, "flip each training image left-right with probability 1/2")
    streaming: bool = _f(False, "stream the dataset (for sets larger than the disk); decoded on the fly")
    on_bad_image: str = _f("stop", "an undecodable image stops the run (naming it) or is skipped and counted", BAD_IMAGE_POLICIES)
    # ---- model and diffusion
    unet_preset: str = _f("ddpm-cifar10-32", "UNet2DModel preset (see ddpm_hf.UNET_PRESETS)")
    dropout: Optional[float] = _f(None, "UNet dropout (default: the preset's)")
    num_train_timesteps: int = _f(1000, "T, the number of diffusion steps")
    beta_schedule: str = _f("linear", "beta schedule", BETA_SCHEDULES)
    beta_start: float = _f(1e-4, "β_1")
    beta_end: float = _f(0.02, "β_T")
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
    lr_scheduler: str = _f("constant_with_warmup", "diffusers LR schedule", LR_SCHEDULES)
    lr_warmup_steps: int = _f(5000, "LR warmup steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 disables)")
    mixed_precision: str = _f("no", "mixed precision through Accelerate", MIXED_PRECISIONS)
    max_nonfinite_in_a_row: int = _f(20, "stop after this many consecutive steps with a non-finite loss (each is skipped)")
    seed: int = _f(0, "seed for initialisation, data order, noise and timesteps: the same seed gives the same run")
    channels_last: bool = _f(False, "channels_last memory format (faster convolutions on GPUs)")
    compile: bool = _f(False, "torch.compile the UNet for training (the saved model is the plain one)")
    # ---- EMA
    ema_decay: float = _f(0.9999, "EMA decay (the paper: 0.9999)")
    ema_warmup: bool = _f(False, "grow the EMA decay as 1 - (1 + n/inv_gamma)^-power up to --ema_decay")
    ema_inv_gamma: float = _f(1.0, "EMA warmup inv_gamma")
    ema_power: float = _f(0.75, "EMA warmup power")
    ema_update_after_step: int = _f(0, "copy the weights into the EMA until this step")
    # ---- outputs
    output_dir: str = _f("runs/ddpm", "where the pipeline, checkpoints, grids and logs go")
    checkpointing_steps: int = _f(5000, "save a resumable checkpoint every N steps")
    checkpoints_total_limit: Optional[int] = _f(3, "keep at most this many checkpoints (oldest removed first)")
    resume_from_checkpoint: Optional[str] = _f(None, "'latest' (the newest intact checkpoint) or a checkpoint folder to continue from")
    allow_config_change: bool = _f(False, "resume with settings that differ from the checkpoint's (each change is recorded in the run's config history)")
    overwrite_output_dir: bool = _f(False, "start over in an --output_dir that holds a run: its checkpoints, grids and logs are removed")
    save_images_steps: int = _f(5000, "save a sample grid (fixed seeds, EMA weights) every N steps")
    num_sample_images: int = _f(16, "images in each sample grid")
    sample_inference_steps: Optional[int] = _f(None, "sampler steps for grids (default: all T)")
    logging_steps: int = _f(50, "log the loss every N steps")
    # ---- evaluation during training
    eval_every: Optional[int] = _f(None, "every N steps, sample --eval_samples images from the EMA model and compute FID (and IS) against the training set")
    eval_samples: int = _f(1000, "images sampled for each evaluation (shared over all processes)")
    eval_steps: int = _f(50, "DDIM steps for the evaluation samples")
    keep_best: bool = _f(False, "keep the checkpoint with the best FID in best_checkpoint/ (outside the rotation limit)")
    inception_weights: Optional[str] = _f(None, "Inception weights file for --eval_every (else $DDPM_HF_INCEPTION_WEIGHTS or the cache)")
    eval_cache_dir: Optional[str] = _f(None, "where reference statistics are cached (default $DDPM_HF_CACHE or ~/.cache/ddpm_hf)")
    eval_nll_every: Optional[int] = _f(None, "every N steps, the EMA model's NLL bound in bits/dim on --eval_nll_images held-out images")
    eval_nll_images: int = _f(256, "held-out images for --eval_nll_every (shared over all processes)")
    eval_nll_dataset: Optional[str] = _f(None, "the held-out images of --eval_nll_every: anything --dataset takes (default: --dataset)")
    eval_nll_split: str = _f("test", "the split of the held-out dataset")
    # ---- the Hub (the token is a flag of its own, --hub_token, and is never saved)
    push_to_hub: bool = _f(False, "push the pipeline, model card, grids, metrics and config to the Hub; the token and repo are checked before training starts")
    hub_model_id: Optional[str] = _f(None, "the Hub repo: 'name' (under your account) or 'namespace/name' (default: the output folder's name)")
    hub_private_repo: bool = _f(False, "create the Hub repo as private")
    hub_push_every: Optional[int] = _f(None, "also push the EMA pipeline so far every N steps, uploading in the background")
    report_to: str = _f("tensorboard", "experiment tracker", TRACKERS)
    preset: Optional[str] = _f(None, "a training recipe whose values replace the defaults (flags still win)")

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name}={getattr(self, f.name)!r} is not one of {', '.join(choices)}.")
        if (self.max_train_steps is None) == (self.num_epochs is None):
            raise ValueError("Give one of --max_train_steps or --num_epochs.")
        for name in ("max_train_steps", "num_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name}={value} must be at least 1.")
        self._validate_ranges()
        if self.channels not in (1, 3):
            raise ValueError(f"--channels={self.channels} is not supported; use 1 or 3.")
        if self.keep_best and not self.eval_every:
            raise ValueError("--keep_best needs --eval_every N (the FID it keeps the best checkpoint by).")
        for name in ("sample_inference_steps", "eval_steps"):
            steps = getattr(self, name) if name != "eval_steps" or self.eval_every else None
            if steps is not None and self.num_train_timesteps >= 1 and steps > self.num_train_timesteps:
                raise ValueError(f"--{name}={steps} is more than --num_train_timesteps={self.num_train_timesteps}; "
                                 f"use at most {self.num_train_timesteps}.")
        if self.variance_type in LEARNED_VARIANCE_TYPES and self.loss == "simple":
            raise ValueError(f"--variance_type {self.variance_type} is trained by the bound, which L_simple does not hold; "
                             "add --loss hybrid (improved DDPM) or --loss vlb.")
        if self.loss == "hybrid" and self.variance_type not in LEARNED_VARIANCE_TYPES:
            raise ValueError("--loss hybrid adds the bound to train a learned variance; with a fixed variance it is L_simple. "
                             "Add --variance_type learned_range, or use --loss simple or vlb.")
        if self.loss == "vlb" and self.snr_gamma is not None:
            raise ValueError("--snr_gamma weights L_simple's MSE; --loss vlb has the bound's own weighting. Drop one of them.")
        if not self.vlb_weight > 0:
            raise ValueError(f"--vlb_weight={self.vlb_weight} must be positive (improved DDPM: 0.001).")
        if self.overwrite_output_dir and self.resume_from_checkpoint is not None:
            raise ValueError("--overwrite_output_dir starts over; it cannot go with --resume_from_checkpoint.")
        if (self.hub_model_id or self.hub_private_repo or self.hub_push_every) and not self.push_to_hub:
            raise ValueError("--hub_model_id, --hub_private_repo and --hub_push_every need --push_to_hub.")
        for name in ("batch_size", "gradient_accumulation_steps", "resolution", "checkpointing_steps",
                     "save_images_steps", "logging_steps", "num_sample_images", "eval_samples", "eval_steps", "hub_push_every",
                     "eval_nll_every", "eval_nll_images"):
            value = getattr(self, name)
            if value is not None and value < 1:  # None: an Optional setting that is off
                raise ValueError(f"--{name}={value} must be at least 1.")

    def _validate_ranges(self) -> None:
        """Numbers outside the range where they mean something: each is one line naming the flag and the fix."""
        from .unets import UNET_PRESETS, downsampling_factor

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_train_timesteps >= 1, f"--num_train_timesteps={self.num_train_timesteps} must be at least 1 (the paper: 1000).")
        need(self.beta_schedule == "squaredcos_cap_v2" or 0 < self.beta_start < self.beta_end < 1,
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
        need(self.dropout is None or 0 <= self.dropout < 1, f"--dropout={self.dropout} must be in [0, 1).")
        need(self.snr_gamma is None or self.snr_gamma > 0, f"--snr_gamma={self.snr_gamma} must be positive (e.g. 5).")
        need(self.max_nonfinite_in_a_row >= 1, f"--max_nonfinite_in_a_row={self.max_nonfinite_in_a_row} must be at least 1.")
        need(self.max_train_samples is None or self.max_train_samples >= 1,
             f"--max_train_samples={self.max_train_samples} must be at least 1 (or none).")
        need(self.checkpoints_total_limit is None or self.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit={self.checkpoints_total_limit} must be at least 1 (or none: keep all).")
        need(self.unet_preset in UNET_PRESETS,
             f"--unet_preset {self.unet_preset!r} is not one of {', '.join(sorted(UNET_PRESETS))}.")
        factor = downsampling_factor(UNET_PRESETS[self.unet_preset])
        need(self.resolution % factor == 0,
             f"--resolution={self.resolution} is not divisible by {factor}, the downsampling of --unet_preset "
             f"{self.unet_preset}; use a multiple of {factor} (e.g. {max(factor, self.resolution // factor * factor)}).")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    def save(self, folder) -> Path:
        path = Path(folder) / "training_config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "TrainingConfig":
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path} has keys this version does not know: {sorted(unknown)}.")
        return cls(**data)


# Settings a resume may change without --allow_config_change: how long to train, how often to save, log and
# measure, and where results go; not what is trained or how.
RESUMABLE_SETTINGS = (
    "max_train_steps", "num_epochs", "output_dir", "checkpointing_steps", "checkpoints_total_limit",
    "resume_from_checkpoint", "allow_config_change", "overwrite_output_dir", "save_images_steps", "num_sample_images",
    "sample_inference_steps", "logging_steps", "max_nonfinite_in_a_row", "eval_every", "eval_samples", "eval_steps",
    "keep_best", "inception_weights", "eval_cache_dir", "eval_nll_every", "eval_nll_images", "eval_nll_dataset",
    "eval_nll_split", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_push_every", "report_to", "preset",
)


def config_changes(old: TrainingConfig, new: TrainingConfig) -> Dict[str, list]:
    """{setting: [old, new]} for every setting outside RESUMABLE_SETTINGS that differs."""
    return {f.name: [getattr(old, f.name), getattr(new, f.name)] for f in dataclasses.fields(TrainingConfig)
            if f.name not in RESUMABLE_SETTINGS and getattr(old, f.name) != getattr(new, f.name)}


# Recipes: values that replace the defaults. Each is a complete, named experiment.
RECIPES: Dict[str, Dict[str, Any]] = {
    # The defaults: CIFAR-10 at FID 3.17 / IS 9.46 in the paper.
    "ddpm-cifar10": {},
    # The quick start: recognisable 16x16 digits from the built-in set in under 3 minutes on 2 CPU cores.
    # bf16 autocast: 1.4x the fp32 images/s on a CPU with native bf16, at the same loss and sample quality
    # (benchmarks/bench_train.py); grids with 100 strided DDPM steps, as recognisable as with 1000.
    "digits-cpu": dict(
        dataset="digits", channels=1, resolution=16, random_flip=False, unet_preset="cpu-digits", dropout=0.0,
        learning_rate=2e-3, batch_size=64, lr_scheduler="cosine", lr_warmup_steps=100, max_train_steps=1200,
        ema_decay=0.999, ema_warmup=True, checkpointing_steps=400, save_images_steps=400, logging_steps=25,
        num_sample_images=25, sample_inference_steps=100, mixed_precision="bf16", output_dir="runs/digits",
    ),
}


def _argparse_type(tp):
    """The flag's value type; an Optional field also takes `none` (its None)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        if inner is bool:
            return inner

        def optional(value: str, inner=inner):
            return None if value.lower() == "none" else inner(value)

        optional.__name__ = inner.__name__  # argparse names the type in its error messages
        return optional
    return tp


def build_parser() -> argparse.ArgumentParser:
    from .arguments import Parser
    from .unets import UNET_PRESETS

    parser = Parser(
        description="Train a DDPM (Ho et al. 2020). Defaults are the paper's CIFAR-10 recipe; --preset replaces them with "
                    "another recipe, and flags given win over both. Run with `accelerate launch train_ddpm.py ...` for "
                    "several GPUs or processes.",
        prog="train_ddpm.py",
    )
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        tp = _argparse_type(hints[f.name])
        choices = {"preset": sorted(RECIPES), "unet_preset": sorted(UNET_PRESETS)}.get(f.name, f.metadata.get("choices"))
        # the default is shown, not set: flags left out stay out of the namespace, so a --preset can fill them
        kwargs = dict(help=f"{f.metadata['help']} (default: {f.default})", default=argparse.SUPPRESS)
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        elif choices:
            parser.add_argument(f"--{f.name}", type=tp, choices=choices, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=tp, metavar=f.name.upper(), **kwargs)
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and the parameter count, then exit")
    parser.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: HF_TOKEN or the `hf auth login` "
                        "token, which other users of this machine cannot see in the process list); never saved or printed")
    return parser


def resolve_config(overrides: Dict[str, Any], preset: Optional[str] = None) -> TrainingConfig:
    """Defaults, then the recipe `preset`, then `overrides` (the flags given)."""
    values: Dict[str, Any] = {}
    preset = overrides.get("preset", preset)
    if preset is not None:
        if preset not in RECIPES:
            raise ValueError(f"Unknown --preset {preset!r}; choose one of {', '.join(sorted(RECIPES))}.")
        values.update(RECIPES[preset])
    values.update(overrides)
    values["preset"] = preset
    if "num_epochs" in overrides:
        if "max_train_steps" in overrides:
            raise ValueError("Give one of --max_train_steps or --num_epochs, not both.")
        values["max_train_steps"] = None
    config = TrainingConfig(**values)
    config.validate()
    return config


def parse_args(argv: Optional[Sequence[str]] = None):
    """(config, options) from command-line arguments; options holds what is not part of the run's config:
    `dry_run` and `hub_token` (a secret, so never in the config that is saved)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)  # the command wrapper reads --debug itself
    options = argparse.Namespace(dry_run=args.pop("dry_run", False), hub_token=args.pop("hub_token", None))
    return resolve_config(args), options
