"""A training run's config resolved once: from the defaults, a preset, a starting point or a saved run, and the flags
given, diffusers' train_unconditional.py flag names taken with their meaning (the whole translation is here; the
command line itself is `commands.train_flags`).

Precedence: the dataclass defaults < a `--preset` recipe < (resuming) the checkpoint's settings or (--init_from) the
starting pipeline's < the flags given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, Optional

from ddpm_hf.choices import LEARNED_VARIANCE_TYPES
from ddpm_hf.sizes import canonical
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.run_folder import (
    ROOT_LAYOUT_SCHEDULER_CONFIG,
    ROOT_LAYOUT_UNET_CONFIG,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
)
from ddpm_hf.recipes.config import HUB_SETTINGS, RECIPES, TrainingConfig

# diffusers' train_unconditional.py flag names, taken as aliases: alias -> our setting (same meaning)
DIFFUSERS_ALIASES = {
    "dataset_name": "dataset",
    "train_data_dir": "dataset",
    "dataset_config_name": "dataset_config",
    "model_config_name_or_path": "unet_config",
    "logger": "report_to",
    "ddpm_num_steps": "num_train_timesteps",
    "ddpm_beta_schedule": "beta_schedule",
    "ddpm_num_inference_steps": "sample_inference_steps",
    "ema_max_decay": "ema_decay",
    "eval_batch_size": "num_sample_images",
}


def saved_run_config(output_dir, which: str) -> Optional[Dict[str, Any]]:
    """The settings of the run a resume continues: the config saved in the checkpoint (`latest`: the newest whose
    state reads) or else in the output folder; None if none reads (the resume then reports why)."""
    from ddpm_hf.outputs.run_folder import saved_config_files

    for path in saved_config_files(output_dir, which):
        try:
            return dataclasses.asdict(TrainingConfig.load(path))
        except (OSError, ValueError, TypeError):
            continue
    return None


def starting_point(source: str) -> Dict[str, Any]:
    """The settings a run started from the pipeline `source` (--init_from) takes from it unless given: its scheduler's
    diffusion settings, and its UNet (as --unet_config), resolution and channels."""
    from ddpm_hf.saved.weights import read_pipeline_json  # torch: not before the flags are parsed

    scheduler = read_pipeline_json(source, (SCHEDULER_CONFIG, ROOT_LAYOUT_SCHEDULER_CONFIG))
    unet = read_pipeline_json(source, (UNET_CONFIG, ROOT_LAYOUT_UNET_CONFIG))
    if scheduler.get("trained_betas") is not None:
        raise UsageError(f"--init_from {source}: its scheduler has trained_betas, which a training run cannot take; give "
                         "--beta_schedule and its values instead.")
    values = {k: scheduler[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
              if k in scheduler}
    variance = scheduler.get("variance_type", "fixed_small").replace("_log", "")
    values.update(variance_type=variance, unet_config=source, channels=unet["in_channels"])
    if variance in LEARNED_VARIANCE_TYPES:
        values["loss"] = "hybrid"  # what trains a learned variance
    size = unet.get("sample_size")
    if size is not None:
        values["resolution"] = canonical(size)
    return values


def resolve_config(overrides: Dict[str, Any], preset: Optional[str] = None) -> TrainingConfig:
    """Defaults, then the recipe `preset`, then (resuming) the checkpoint's settings or (--init_from) the starting
    pipeline's, then `overrides` (the flags given). diffusers' flag names arrive as `alias:NAME` keys."""
    overrides = translate_aliases(dict(overrides))
    given = set(overrides) - {"per_device_batch_size", "use_ema"}
    preset = overrides.get("preset", preset)
    values: Dict[str, Any] = {}
    if preset is not None:
        if preset not in RECIPES:
            raise UsageError(f"Unknown --preset {preset!r}; choose one of {', '.join(sorted(RECIPES))}.")
        values.update(RECIPES[preset])
    if overrides.get("resume_from_checkpoint") is not None:  # the flags left out keep the checkpoint's values
        output_dir = overrides.get("output_dir", values.get("output_dir", TrainingConfig.output_dir))
        saved = saved_run_config(output_dir, overrides["resume_from_checkpoint"]) or {}
        values.update({k: v for k, v in saved.items() if k not in ("allow_config_change", "overwrite_output_dir")})
        preset = preset if preset is not None else saved.get("preset")
    elif overrides.get("init_from"):
        values.update({k: v for k, v in starting_point(overrides["init_from"]).items() if k not in given})
    per_device, use_ema = overrides.pop("per_device_batch_size", None), overrides.pop("use_ema", None)
    values.update(overrides)
    values["preset"] = preset
    for one, other in (("max_train_steps", "num_epochs"), ("unet_preset", "unet_config"),
                       ("save_images_steps", "save_images_epochs"), ("checkpointing_steps", "save_model_epochs")):
        if one in given and other in given:
            raise UsageError(f"Give one of --{one} or --{other}, not both.")
    for name in ("label_column", "label_dropout"):
        if name in given and not values.get("class_conditional"):
            raise UsageError(f"--{name} is for a class-conditional run; add --class_conditional, or drop --{name}.")
    if "num_epochs" in given:  # the one given says how long
        values["max_train_steps"] = None
    elif "max_train_steps" in given:
        values["num_epochs"] = None
    if "unet_preset" in given:
        values["unet_config"] = None
    if "push_to_hub" in given and not values["push_to_hub"]:  # no push: the Hub settings a resume inherited go too
        defaults = {f.name: f.default for f in dataclasses.fields(TrainingConfig)}
        values.update({k: defaults[k] for k in HUB_SETTINGS if k not in given})
    translate_alias_values(values, given, per_device, use_ema)
    config = TrainingConfig(**values)
    config.validate()
    return config


def translate_aliases(args: Dict[str, Any]) -> Dict[str, Any]:
    """diffusers' train_unconditional.py flags (parsed as `alias:NAME`) to ours; refuses one given twice."""
    out = {k: v for k, v in args.items() if not k.startswith(("alias:", "ignored:"))}
    for key in [k for k in args if k.startswith("ignored:")]:
        logging.getLogger(__name__).warning("--%s has nothing to do in ddpm_hf and is ignored.", key.split(":", 1)[1])
    for key, value in args.items():
        if not key.startswith("alias:"):
            continue
        alias = key.split(":", 1)[1]
        if alias == "train_batch_size":
            target, value = "per_device_batch_size", value
        elif alias == "use_ema":
            target = "use_ema"
        elif alias == "adam_weight_decay":
            target, out["optimizer"] = "weight_decay", out.get("optimizer", "adamw")
        else:
            target = DIFFUSERS_ALIASES[alias]
        if target in out:
            raise UsageError(f"--{alias} and --{target} say the same thing; give one of them.")
        out[target] = value
    return out


def translate_alias_values(values: Dict[str, Any], given: set, per_device: Optional[int], use_ema: Optional[bool]) -> None:
    """The two diffusers flags whose value depends on the other settings, once those are resolved: --train_batch_size
    (per device: times processes and accumulation) and --use_ema (EMA with warmup; --no-use_ema: none)."""
    if per_device is not None:
        values["batch_size"] = per_device * int(os.environ.get("WORLD_SIZE", "1")) * values.get("gradient_accumulation_steps", 1)
    if use_ema is not None:
        values["ema_warmup"] = use_ema
        if not use_ema:
            values["ema_decay"] = 0.0  # every update copies the weights: the saved weights are the trained ones
        elif "ema_decay" not in given and values.get("ema_decay", 0.9999) == 0.0:
            values["ema_decay"] = 0.9999  # the example's --ema_max_decay default


