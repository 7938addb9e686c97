"""The training command line: one flag per `TrainingConfig` field, diffusers' train_unconditional.py flag names
taken with their meaning (the whole translation is here), and the resolution of the flags into one config.

Precedence: the dataclass defaults < a `--preset` recipe < (resuming) the checkpoint's settings or (--init_from) the
starting pipeline's < the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from typing import Any, Dict, Optional, Sequence

from ddpm_hf.choices import LEARNED_VARIANCE_TYPES
from ddpm_hf.data.sizes import canonical
from ddpm_hf.errors import UsageError
from ddpm_hf.outputs.run_folder import (
    ROOT_LAYOUT_SCHEDULER_CONFIG,
    ROOT_LAYOUT_UNET_CONFIG,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
)
from ddpm_hf.training.config import HUB_SETTINGS, RECIPES, TrainingConfig, describe_recipe

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
# ... and those that need a translation: --train_batch_size (per device: times processes and accumulation),
# --use_ema (EMA with warmup; --no-use_ema: none), --adam_weight_decay (AdamW's decoupled weight decay);
# flags with nothing to do here are accepted and said to be ignored.
DIFFUSERS_IGNORED = ("dataloader_num_workers", "logging_dir", "local_rank", "enable_xformers_memory_efficient_attention")


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
    from ddpm_hf.commands.parsing import Parser
    from ddpm_hf.diffusion.unets import UNET_PRESETS

    parser = Parser(
        description="Train a DDPM (Ho et al. 2020). The defaults shown are the paper's CIFAR-10 recipe; --preset replaces "
                    "them with another recipe (listed under --preset), and flags given win over both. Run with "
                    "`accelerate launch train_ddpm.py ...` for several GPUs or processes.",
        prog="train_ddpm.py",
    )
    parser.add_argument("--preset", choices=sorted(RECIPES), default=argparse.SUPPRESS, metavar="PRESET",
                        help="a recipe whose values replace the defaults below (flags still win): " + "; ".join(
                            f"{name}: {describe_recipe(name)}" for name in sorted(RECIPES)))
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        if f.name == "preset" or f.metadata.get("resolved"):
            continue
        tp = f.metadata.get("parse") or _argparse_type(hints[f.name])
        choices = {"preset": sorted(RECIPES), "unet_preset": sorted(UNET_PRESETS)}.get(f.name, f.metadata.get("choices"))
        # the default is shown, not set: flags left out stay out of the namespace, so a --preset can fill them
        shown = "" if "(default:" in f.metadata["help"] else f" (default: {f.default})"
        kwargs = dict(help=f"{f.metadata['help']}{shown}", default=argparse.SUPPRESS)
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        elif choices:
            parser.add_argument(f"--{f.name}", type=tp, choices=choices, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type=tp, metavar=f.name.upper(), **kwargs)
    aliases = parser.add_argument_group("diffusers' train_unconditional.py flags, taken with the same meaning")
    for alias, target in DIFFUSERS_ALIASES.items():
        field_ = next(f for f in dataclasses.fields(TrainingConfig) if f.name == target)
        choices = field_.metadata.get("choices")
        aliases.add_argument(f"--{alias}", dest=f"alias:{alias}", type=_argparse_type(hints[target]), choices=choices,
                             default=argparse.SUPPRESS, help=f"= --{target}", metavar=None if choices else target.upper())
    aliases.add_argument("--train_batch_size", dest="alias:train_batch_size", type=int, default=argparse.SUPPRESS,
                         metavar="N", help="images per process and micro-batch: --batch_size = this x processes x --gradient_accumulation_steps")
    aliases.add_argument("--use_ema", dest="alias:use_ema", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                         help="EMA with warmup up to --ema_max_decay (as the example's EMAModel); --no-use_ema: no EMA")
    aliases.add_argument("--adam_weight_decay", dest="alias:adam_weight_decay", type=float, default=argparse.SUPPRESS,
                         metavar="WEIGHT_DECAY", help="= --weight_decay with --optimizer adamw (the example's AdamW)")
    for ignored in DIFFUSERS_IGNORED:
        kind = dict(action="store_true") if ignored.startswith("enable_") else dict(type=str, metavar="VALUE")
        aliases.add_argument(f"--{ignored}", dest=f"ignored:{ignored}", default=argparse.SUPPRESS, help="accepted and ignored", **kind)
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and the parameter count, then exit")
    parser.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: HF_TOKEN or the `hf auth login` "
                        "token, which other users of this machine cannot see in the process list); never saved or printed")
    return parser


def saved_run_config(output_dir, which: str) -> Optional[Dict[str, Any]]:
    """The settings of the run a resume continues: the config saved in the checkpoint (`latest`: the newest whose
    state reads) or else in the output folder; None if none reads (the resume then reports why)."""
    from ddpm_hf.training.checkpoints import saved_config_files

    for path in saved_config_files(output_dir, which):
        try:
            return dataclasses.asdict(TrainingConfig.load(path))
        except (OSError, ValueError, TypeError):
            continue
    return None


def starting_point(source: str) -> Dict[str, Any]:
    """The settings a run started from the pipeline `source` (--init_from) takes from it unless given: its scheduler's
    diffusion settings, and its UNet (as --unet_config), resolution and channels."""
    from ddpm_hf.outputs.weights import read_pipeline_json  # torch: not before the flags are parsed

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


def parse_args(argv: Optional[Sequence[str]] = None):
    """(config, options) from command-line arguments; options holds what is not part of the run's config:
    `dry_run` and `hub_token` (a secret, so never in the config that is saved)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)  # the command wrapper reads --debug itself
    options = argparse.Namespace(dry_run=args.pop("dry_run", False), hub_token=args.pop("hub_token", None))
    return resolve_config(args), options
