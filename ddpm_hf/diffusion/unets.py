"""Named `UNet2DModel` configurations: the paper's networks and small ones that train on a CPU.

`ddpm-cifar10-32` is key for key the config of the Hub repo `google/ddpm-cifar10-32` (35,746,307
parameters) plus the paper's training dropout of 0.1; the 256x256 presets are those of
`google/ddpm-celebahq-256` and the LSUN repos (one architecture, 113,673,219 parameters).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional

from ddpm_hf.sizes import canonical, sample_size, size_of, size_problem
from ddpm_hf.errors import UsageError, first_line

if TYPE_CHECKING:  # diffusers loads only when a network is built: the command lines read the presets first
    from diffusers import UNet2DModel

# The paper's conventions, shared by every preset: sinusoidal embedding without flip and with shift 1,
# GroupNorm eps 1e-6, no padding before the strided downsampling conv, single-head attention.
_PAPER_CONVENTIONS: Dict[str, Any] = dict(
    act_fn="silu",
    attention_head_dim=None,
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
)

_DDPM_256 = dict(
    _PAPER_CONVENTIONS,
    sample_size=256,
    block_out_channels=[128, 128, 256, 256, 512, 512],
    down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    dropout=0.0,
)

# Three levels, attention at the lowest, one ResNet block per level: the small CPU networks.
_CPU_SMALL = dict(
    _PAPER_CONVENTIONS,
    sample_size=32,
    block_out_channels=[32, 64, 64],
    down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    layers_per_block=1,
    norm_num_groups=8,
    dropout=0.0,
)

UNET_PRESETS: Dict[str, Dict[str, Any]] = {
    # Ho et al. 2020, Appendix B: 35.7M parameters, attention at 16x16, dropout 0.1 on CIFAR-10.
    "ddpm-cifar10-32": dict(
        _PAPER_CONVENTIONS,
        sample_size=32,
        block_out_channels=[128, 256, 256, 256],
        down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        dropout=0.1,
    ),
    "ddpm-celebahq-256": _DDPM_256,
    "ddpm-lsun-church-256": _DDPM_256,
    "ddpm-lsun-bedroom-256": _DDPM_256,
    "ddpm-lsun-cat-256": _DDPM_256,
    # 1.1M parameters: learns 32x32 digits in minutes on 2 CPU cores.
    "cpu-small": _CPU_SMALL,
    # 0.69M parameters: the quick start's 16x16 digits, 1.7x faster per step than cpu-small there.
    "cpu-digits": dict(_CPU_SMALL, sample_size=16, block_out_channels=[16, 32, 64]),
    # diffusers' train_unconditional.py example's default network (64x64 by default; 113.7M parameters).
    # The network of the 256x256 checkpoints, with diffusers' UNet2DModel defaults, which the example keeps.
    "diffusers-example": dict(
        _DDPM_256,
        sample_size=64,
        attention_head_dim=8, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5,
    ),
    # 0.18M parameters: for tests.
    "cpu-tiny": dict(
        _PAPER_CONVENTIONS,
        sample_size=16,
        block_out_channels=[16, 32],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        norm_num_groups=8,
        dropout=0.0,
    ),
}


def unet_config(
    preset: str,
    sample_size: Optional[int] = None,
    in_channels: Optional[int] = None,
    **overrides: Any,
) -> Dict[str, Any]:
    """The `UNet2DModel` config of a preset, with `sample_size`, `in_channels` (which also sets
    `out_channels`) and any other key overridden."""
    if preset not in UNET_PRESETS:
        raise UsageError(f"Unknown UNet preset {preset!r}; choose one of {', '.join(sorted(UNET_PRESETS))}.")
    config = copy.deepcopy(UNET_PRESETS[preset])
    if sample_size is not None:
        config["sample_size"] = sample_size
    if in_channels is not None:
        config["in_channels"] = config["out_channels"] = in_channels
    from diffusers import UNet2DModel

    unknown = set(overrides) - set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    if unknown:
        raise UsageError(f"Unknown UNet2DModel config keys {sorted(unknown)}; see diffusers' UNet2DModel.")
    config.update(overrides)
    return config


def downsampling_factor(config: Dict[str, Any]) -> int:
    """How much a UNet2DModel config shrinks its input: 2 per down block but the last."""
    return 2 ** (len(config["block_out_channels"]) - 1)


# Beyond these a config is a typo: diffusers builds it for minutes, then fails or fills the memory.
MAX_LAYERS_PER_BLOCK = 64
MAX_CHANNELS = 16384


def unet_config_problem(config: Dict[str, Any]) -> Optional[str]:
    """What makes a UNet2DModel config one that cannot be built or run (a count that is not positive, heads of no
    channels, groups that do not divide the channels, block lists of other lengths, sizes beyond any GPU); None when
    it is sound. Checked before anything is built, as diffusers would only fail (or run for minutes) on it."""
    from diffusers import UNet2DModel

    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}
    full = {**defaults, **config}

    def counts(value) -> list:
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def whole(value, low: int, high: Optional[int] = None) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)

    channels = full["block_out_channels"]
    if not isinstance(channels, (list, tuple)) or not channels or not all(whole(c, 1, MAX_CHANNELS) for c in channels):
        return f"block_out_channels={list(counts(channels))} must be positive numbers of channels (at most {MAX_CHANNELS})"
    for key in ("in_channels", "out_channels"):
        if not whole(full[key], 1, MAX_CHANNELS):
            return f"{key}={full[key]} must be a positive number of channels"
    if not all(whole(n, 1, MAX_LAYERS_PER_BLOCK) for n in counts(full["layers_per_block"])):
        return f"layers_per_block={full['layers_per_block']} must be from 1 to {MAX_LAYERS_PER_BLOCK}"
    heads = full.get("attention_head_dim")
    if heads is not None and not all(whole(n, 1) for n in counts(heads)):
        return f"attention_head_dim={heads} must be a whole number of channels per head, at least 1"
    groups = full.get("norm_num_groups")
    if groups is not None and (not whole(groups, 1) or any(c % groups for c in channels)):
        return f"norm_num_groups={groups} must divide every block_out_channels ({list(channels)})"
    for key in ("down_block_types", "up_block_types"):
        if len(full[key]) != len(channels):
            return f"{key} has {len(full[key])} blocks but block_out_channels {len(channels)}; give one per level"
    return None


def build_unet(preset: str, **kwargs: Any) -> "UNet2DModel":
    """A freshly initialised `UNet2DModel` from a preset (see `unet_config` for the arguments)."""
    from diffusers import UNet2DModel

    return UNet2DModel.from_config(unet_config(preset, **kwargs))


def resolve_unet_config(source: str, subfolder: Optional[str] = None) -> Dict[str, Any]:
    """A UNet2DModel config from `source`: a config.json file, a folder holding one (or unet/config.json, or the
    config.json of a google/ddpm-* root layout), or a Hub repo id (cached ones work offline), read through
    diffusers' `load_config`. `subfolder` picks the folder inside a pipeline (default: `unet`, else the root).
    Raises a one-line ValueError when it cannot be read or is not a UNet2DModel config."""
    from diffusers import UNet2DModel

    tries = [subfolder] if subfolder is not None else ["unet", None]
    if Path(source).is_file():
        tries = [None]
    errors = []
    import warnings

    for folder in tries:
        try:
            with warnings.catch_warnings():  # huggingface_hub's deprecation notes about diffusers' own arguments
                warnings.simplefilter("ignore")
                config = dict(UNet2DModel.load_config(source, subfolder=folder))
        except (OSError, ValueError, EnvironmentError) as e:
            errors.append(first_line(e, limit=10**6))
            continue
        name = config.get("_class_name", "UNet2DModel")
        if name != "UNet2DModel":
            raise UsageError(f"--unet_config {source}: its config is a {name}'s; ddpm_hf trains a UNet2DModel.")
        return {k: v for k, v in config.items() if not k.startswith("_")}
    where = f" (subfolder {subfolder})" if subfolder else ""
    raise UsageError(f"--unet_config {source}{where}: no UNet2DModel config.json there ({errors[-1]}); give a config.json, "
                     "a folder holding one, or a Hub repo id.")


def check_unet_config(config: Dict[str, Any], channels: int, out_channels: int, resolution, source: str) -> Dict[str, Any]:
    """`config` against the run: in/out channels and sample_size; the resolution divisible by its downsampling.
    Each mismatch is one line naming the key; returns the config with sample_size set."""
    from diffusers import UNet2DModel

    defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items() if k != "self"}
    full = {**defaults, **config}
    for key, want, flag in (("in_channels", channels, f"--channels {channels}"),
                            ("out_channels", out_channels, f"--channels {channels} with this --variance_type")):
        if full[key] != want:
            raise UsageError(f"--unet_config {source}: {key}={full[key]}, but {flag} needs {want}; set {key} in the config "
                             "or change the flag.")
    if full.get("sample_size") is not None and size_of(full["sample_size"]) != size_of(resolution):
        raise UsageError(f"--unet_config {source}: sample_size={full['sample_size']}, but --resolution is "
                         f"{canonical(resolution)}; set sample_size in the config or change --resolution.")
    problem = size_problem(resolution, downsampling_factor(full), where=f" (its {len(full['block_out_channels'])} levels)")
    if problem:
        raise UsageError(f"--unet_config {source}: {problem}.")
    return {**config, "sample_size": sample_size(resolution)}
