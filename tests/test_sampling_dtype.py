"""Sampling in half precision: the network in bf16 (fp16 on a GPU), the chain in float32; what ddpm-sample records."""

import json
import sys

import numpy as np
import pytest
import torch
from common import run_in_process
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet


def fixed_small_pipe() -> DDPMPipeline:
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=1), DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_bf16_samples_of_a_fixed_small_network_stay_close_to_fp32_and_the_chain_stays_float32():
    pipe = fixed_small_pipe()
    call = dict(batch_size=8, seeds=list(range(8)), num_inference_steps=50, output_type="pt")
    fp32 = pipe(**call).images
    torch.nn.Module.to(pipe.unet, torch.bfloat16)
    chain = []
    bf16 = pipe(**call, callback=chain.append).images
    assert chain[-1].model_output.dtype == chain[-1].prev_sample.dtype == bf16.dtype == torch.float32
    difference = (fp32 - bf16).abs()
    # measured: max 0.015, mean 0.00075 (images in [0, 1]); the quick start's trained model: 0.021 and 0.0014 at 100
    # steps, 0.0017 and 0.00028 at 1000
    assert difference.max() < 0.05 and difference.mean() < 0.003
    assert difference.max() > 0  # the network did run in bf16


def sample_cli(pipe_dir, out, *extra):
    return run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", str(pipe_dir), str(out), "--num_images", "2",
                           "--num_inference_steps", "2", *extra], capture_output=True, text=True)


@pytest.mark.slow
def test_ddpm_sample_records_the_dtype_refuses_another_in_the_same_folder_and_fp16_on_a_cpu(tmp_path):
    fixed_small_pipe().save_pretrained(tmp_path / "pipe")
    assert sample_cli(tmp_path / "pipe", tmp_path / "a").returncode == 0
    fp32_hash = json.loads((tmp_path / "a" / "sampling.json").read_text())["weights_sha256"]
    proc = sample_cli(tmp_path / "pipe", tmp_path / "b", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads((tmp_path / "b" / "sampling.json").read_text())
    assert recorded["dtype"] == "bf16" and recorded["weights_sha256"] == fp32_hash  # the hash names the saved weights
    assert len(list((tmp_path / "b").glob("*.png"))) == 2
    drawn = lambda folder: [np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))]  # noqa: E731
    assert any((a != b).any() for a, b in zip(drawn(tmp_path / "a"), drawn(tmp_path / "b")))  # measured: 5 and 3 levels
    proc = sample_cli(tmp_path / "pipe", tmp_path / "b", "--dtype", "fp32")
    assert proc.returncode != 0 and "holds images drawn with other settings (dtype)" in proc.stderr.strip().splitlines()[-1]
    if not torch.cuda.is_available():
        proc = sample_cli(tmp_path / "pipe", tmp_path / "c", "--dtype", "fp16")
        assert proc.returncode != 0
        assert proc.stderr.strip().splitlines() == ["error: --dtype fp16 needs a GPU (a CPU has no fast fp16 kernels); on "
                                                    "a CPU use --dtype bf16 or fp32."]
        assert not (tmp_path / "c").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: fp16 sampling runs only on a GPU")
def test_fp16_samples_on_a_gpu_stay_close_to_fp32():
    pipe = fixed_small_pipe().to("cuda")
    call = dict(batch_size=8, seeds=list(range(8)), num_inference_steps=50, output_type="pt")
    fp32 = pipe(**call).images
    torch.nn.Module.to(pipe.unet, torch.float16)
    assert (fp32 - pipe(**call).images).abs().max() < 0.05


@pytest.mark.slow
def test_ddpm_nll_and_ddpm_visualize_run_the_network_in_bf16_and_record_it(tmp_path):
    pipe = fixed_small_pipe()
    pipe.scheduler = DDPMScheduler(num_train_timesteps=40)
    pipe.save_pretrained(tmp_path / "pipe")
    nll = {}
    for dtype in ("fp32", "bf16"):
        proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.nll", str(tmp_path / "pipe"), str(tmp_path / f"nll-{dtype}"),
                               "--dataset", "digits", "--num_images", "3", "--dtype", dtype], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        nll[dtype] = json.loads((tmp_path / f"nll-{dtype}" / "nll.json").read_text())
        assert nll[dtype]["protocol"]["dtype"] == dtype
    assert nll["bf16"]["protocol"]["weights_sha256"] == nll["fp32"]["protocol"]["weights_sha256"]
    fp32, bf16 = (nll[d]["bits_per_dim"]["total"]["mean"] for d in ("fp32", "bf16"))
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.005)  # measured: 0.03% apart
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.visualize", str(tmp_path / "pipe"), str(tmp_path / "fig"),
                           "--num_inference_steps", "4", "--seeds", "0", "1", "--dtype", "bf16"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entry = json.loads((tmp_path / "fig" / "figures.json").read_text())["progressive.png"]
    assert entry["dtype"] == "bf16" and entry["weights_sha256"] == nll["fp32"]["protocol"]["weights_sha256"]
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.visualize", str(tmp_path / "pipe"), str(tmp_path / "fig32"),
                           "--num_inference_steps", "4", "--seeds", "0", "1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figure = lambda folder: np.asarray(Image.open(folder / "progressive.png")).astype(int)  # noqa: E731
    assert (figure(tmp_path / "fig") != figure(tmp_path / "fig32")).any()  # measured: up to 16 levels apart
    proc = run_in_process([sys.executable, "-m", "ddpm_hf.commands.visualize", str(tmp_path / "pipe"), str(tmp_path / "neg"),
                           "--seeds", "0", "-3"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --seeds -3: seeds are integers from 0 (seed s is the image ddpm-sample draws from s) (see ddpm-visualize "
        "--help)"]
