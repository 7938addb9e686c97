"""diffusers' unconditional example's own tests (examples/unconditional_image_generation/test_unconditional.py), their
argument lists given to train_ddpm.py as they are: a local folder of 6 images stands in for their Hub data
(hf-internal-testing/dummy_image_class_data holds 6) and a tiny UNet config for diffusers/ddpm_dummy."""

import json
import os
import sys

import pytest
from common import REPO, run_in_process
from PIL import Image

TINY_UNET = {"_class_name": "UNet2DModel", "sample_size": 64, "in_channels": 3, "out_channels": 3,
             "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
             "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}


@pytest.fixture
def stand_ins(tmp_path):
    data = tmp_path / "dummy_image_class_data"
    data.mkdir()
    for k in range(6):
        Image.new("RGB", (64, 64), (40 * k, 255 - 40 * k, 128)).save(data / f"{k}.png")
    (tmp_path / "ddpm_dummy.json").write_text(json.dumps(TINY_UNET))
    return data, tmp_path / "ddpm_dummy.json"


def their_args(data, unet, out, extra: str) -> list:
    """The example test's argument list, with the stand-ins for its Hub names."""
    return f"""
        --dataset_name {data}
        --model_config_name_or_path {unet}
        --resolution 64
        --output_dir {out}
        --train_batch_size 1
        --num_epochs 1
        --gradient_accumulation_steps 1
        --ddpm_num_inference_steps 2
        --learning_rate 1e-3
        --lr_warmup_steps 5
        {extra}
        """.split()


def train(args) -> None:
    proc = run_in_process([sys.executable, str(REPO / "train_ddpm.py"), *args, "--eval_batch_size", "2",
                           "--no-card_figures", "--mixed_precision", "no"])
    assert proc.returncode == 0, proc.stderr[-3000:]


def checkpoints(out) -> set:
    return {x for x in os.listdir(out) if "checkpoint" in x and not x.startswith(".")}


@pytest.mark.slow
def test_train_unconditional_saves_the_pipeline_as_the_example_does(stand_ins, tmp_path):
    data, unet = stand_ins
    train(their_args(data, unet, tmp_path / "out", ""))
    assert (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").is_file()


@pytest.mark.slow
def test_the_examples_total_limit_and_resume_from_a_bare_checkpoint_name(stand_ins, tmp_path):
    data, unet = stand_ins
    out = tmp_path / "out"
    train(their_args(data, unet, out, "--checkpointing_steps=2 --checkpoints_total_limit=2"))
    assert checkpoints(out) == {"checkpoint-4", "checkpoint-6"}  # checkpoint-2 was removed

    again = tmp_path / "again"
    train(their_args(data, unet, again, "--checkpointing_steps=2"))
    assert checkpoints(again) == {"checkpoint-2", "checkpoint-4", "checkpoint-6"}
    resumed = their_args(data, unet, again, "--checkpointing_steps=2 --resume_from_checkpoint=checkpoint-6 "
                                            "--checkpoints_total_limit=2")
    resumed[resumed.index("--num_epochs") + 1] = "2"
    train(resumed)
    assert checkpoints(again) == {"checkpoint-10", "checkpoint-12"}
