"""The training command line: one flag per `TrainingConfig` field, and diffusers' train_unconditional.py flag names
taken with their meaning (translated by `recipes.resolve`), parsed into one resolved config."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional, Sequence

from ddpm_hf.recipes.config import describe_recipe, RECIPES, TrainingConfig
from ddpm_hf.recipes.resolve import DIFFUSERS_ALIASES, resolve_config


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

    parser = Parser(
        description="Train a DDPM (Ho et al. 2020). The defaults shown are the paper's CIFAR-10 recipe; --preset replaces "
                    "them with another recipe (listed under --preset), and flags given win over both. Run with "
                    "`accelerate launch train_ddpm.py ...` for several GPUs or processes.",
        prog="train_ddpm.py",
    )
    add_training_flags(parser)
    parser.add_argument("--dry_run", action="store_true", help="print the resolved config and the parameter count, then exit")
    parser.add_argument("--hub_token", default=None, help="Hub token for --push_to_hub (default: HF_TOKEN or the `hf auth login` "
                        "token, which other users of this machine cannot see in the process list); never saved or printed")
    return parser


def add_training_flags(parser: argparse.ArgumentParser, leave_out: Sequence[str] = ()) -> None:
    """One flag per TrainingConfig field (but `leave_out`), and diffusers' names for them: what train_ddpm.py takes,
    spelled and checked alike wherever a command trains. A flag left out of the command line stays out of the
    namespace (its default is shown, not set), so that a --preset can fill it."""
    from ddpm_hf.diffusion.unets import UNET_PRESETS

    parser.add_argument("--preset", choices=sorted(RECIPES), default=argparse.SUPPRESS, metavar="PRESET",
                        help="a recipe whose values replace the defaults below (flags still win): " + "; ".join(
                            f"{name}: {describe_recipe(name)}" for name in sorted(RECIPES)))
    hints = typing.get_type_hints(TrainingConfig)
    for f in dataclasses.fields(TrainingConfig):
        if f.name == "preset" or f.metadata.get("resolved") or f.name in leave_out:
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
        if target in leave_out:
            continue
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


def parse_args(argv: Optional[Sequence[str]] = None):
    """(config, options) from command-line arguments; options holds what is not part of the run's config:
    `dry_run` and `hub_token` (a secret, so never in the config that is saved)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)  # the command wrapper reads --debug itself
    options = argparse.Namespace(dry_run=args.pop("dry_run", False), hub_token=args.pop("hub_token", None))
    config = resolve_config(args)
    parser.check_sources(config)  # the datasets it names, before torch loads (a preset may have named them)
    return config, options
