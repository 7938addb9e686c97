import json

import pytest
import torch
from diffusers import UNet2DModel

from ddpm_hf import UNET_PRESETS, build_unet, unet_config

# The keys and values of the Hub's google/ddpm-cifar10-32/config.json (diffusers 0.1.x era).
HUB_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.1.1",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar10_preset_has_paper_parameter_count():
    assert n_params(build_unet("ddpm-cifar10-32")) == 35_746_307


@pytest.mark.slow
def test_cifar10_preset_matches_hub_config_key_for_key(tmp_path):
    preset = unet_config("ddpm-cifar10-32")
    for key, value in HUB_CIFAR10_CONFIG.items():
        if not key.startswith("_"):
            assert preset[key] == value, key
    assert preset["dropout"] == 0.1  # the paper's training dropout; the Hub config (inference) omits it
    (tmp_path / "config.json").write_text(json.dumps(HUB_CIFAR10_CONFIG))
    hub = UNet2DModel.from_config(UNet2DModel.load_config(tmp_path))
    ours = build_unet("ddpm-cifar10-32")
    assert {k: v.shape for k, v in hub.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    # same weights -> same function (in eval mode, where dropout is off)
    ours.load_state_dict(hub.state_dict())
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x, t).sample, hub.eval()(x, t).sample)


def test_256_presets_are_the_paper_networks():
    cfg = unet_config("ddpm-celebahq-256")
    assert cfg["block_out_channels"] == [128, 128, 256, 256, 512, 512]
    assert cfg["down_block_types"][4] == "AttnDownBlock2D"  # attention at 16x16
    for name in ("ddpm-lsun-church-256", "ddpm-lsun-bedroom-256", "ddpm-lsun-cat-256"):
        assert unet_config(name) == cfg
    with torch.device("meta"):
        assert n_params(UNet2DModel.from_config(cfg)) == 113_673_219


def test_small_presets_run_on_any_size_and_channel_count():
    unet = build_unet("cpu-tiny", sample_size=8, in_channels=1)
    assert unet.config.out_channels == 1
    assert unet(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).sample.shape == (2, 1, 8, 8)
    assert n_params(build_unet("cpu-small")) < 2_000_000


def test_unknown_preset_and_key_raise():
    with pytest.raises(ValueError, match=r"Unknown UNet preset 'ddpm-cifar'; choose one of .*ddpm-cifar10-32"):
        unet_config("ddpm-cifar")
    with pytest.raises(ValueError, match=r"Unknown UNet2DModel config keys \['blocks'\]"):
        unet_config("cpu-tiny", blocks=3)


def test_presets_are_not_shared_mutable_state():
    cfg = unet_config("ddpm-cifar10-32")
    cfg["block_out_channels"].append(1)
    assert UNET_PRESETS["ddpm-cifar10-32"]["block_out_channels"] == [128, 256, 256, 256]
