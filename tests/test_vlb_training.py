"""Training on the bound (hybrid loss, learned variance, importance-sampled t), bits/dim during training, and
the ddpm-nll command (1 and 2 processes, a kill and a restart, provenance)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from common import TINY, launch_two, run_in_process
from PIL import Image

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet, denoise
from ddpm_hf.diffusion.likelihood import TERMS
from ddpm_hf.measuring.bound import bits_per_dim_of_share
from ddpm_hf.measuring.nll_folder import image_file
from ddpm_hf.publishing.model_card import write_model_card
from ddpm_hf.sampling.samplers import use_scheduler
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import train


def held_out_digits(folder: Path, n: int = 8) -> Path:
    """The last n of scikit-learn's digits as PNGs: images TINY's 40 training images do not include."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    images = load_digits().images
    for i in range(n):
        Image.fromarray((images[-1 - i] * 255 / 16).round().astype(np.uint8), mode="L").save(folder / f"{i:02d}.png")
    return folder


def uint8_images(folder: Path, size: int = 8) -> torch.Tensor:
    from ddpm_hf.data.decoding import build_image_bank
    from ddpm_hf.data.sources import load_image_dataset

    return build_image_bank(load_image_dataset(str(folder)), "image", 1, size, progress=False).images


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path_factory.mktemp("hybrid")
    config = resolve_config({**TINY, "output_dir": str(out), "max_train_steps": 4, "checkpointing_steps": 4,
                             "loss": "hybrid", "variance_type": "learned_range", "num_train_timesteps": 50})
    train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_hybrid_learned_range_run_saves_a_2c_unet_and_a_learned_range_scheduler(hybrid_run):
    pipe = DDPMPipeline.from_pretrained(hybrid_run)
    assert pipe.unet.config.in_channels == 1 and pipe.unet.config.out_channels == 2
    assert json.loads((hybrid_run / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    history = json.loads((hybrid_run / "checkpoint-4" / "trainer_state.json").read_text())["history"]
    assert len(history) == 4 and all(np.isfinite(h["loss"]) for h in history)


def sample(pipe, steps=10, **kw):
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    return pipe(batch_size=2, generator=gens, num_inference_steps=steps, output_type="np", **kw).images


def test_learned_variance_pipeline_samples_with_its_sigma_and_with_other_samplers(hybrid_run):
    pipe = DDPMPipeline.from_pretrained(hybrid_run)
    learned = sample(pipe)
    assert learned.shape == (2, 8, 8, 1) and np.isfinite(learned).all()
    fixed = DDPMPipeline(pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config, variance_type="fixed_small"))
    first_c = lambda: sample(fixed)  # a fixed-variance scheduler is given the first C channels
    assert np.abs(learned - first_c()).max() > 1e-3  # so the learned Σ is what the DDPM sampler used

    first_c_unet = lambda x, t: type("Out", (), {"sample": pipe.unet(x, t).sample[:, :1]})()
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    for name in ("ddim", "dpm-solver"):
        other = use_scheduler(DDPMPipeline.from_pretrained(hybrid_run), name).scheduler
        extra = {"eta": 0.0} if name == "ddim" else {}
        with torch.no_grad():
            got = denoise(pipe.unet, other, noise, 10, **extra)
            want = denoise(first_c_unet, other, noise, 10, **extra)  # the UNet cut to its first C outputs
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_learned_range_pipeline_samples_in_plain_diffusers(hybrid_run, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        class Block:  # ddpm_hf unimportable, as where it is not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ddpm_hf":
                    raise ModuleNotFoundError("No module named " + repr(name))
        sys.meta_path.insert(0, Block())
        import numpy as np, torch, diffusers
        pipe = diffusers.DiffusionPipeline.from_pretrained({str(hybrid_run)!r})
        assert type(pipe) is diffusers.DDPMPipeline and type(pipe.scheduler) is diffusers.DDPMScheduler
        assert pipe.scheduler.config.variance_type == "learned_range"
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        np.save({str(tmp_path / 'out.npy')!r}, pipe(batch_size=2, generator=gens, num_inference_steps=10, output_type="np").images)
        """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), sample(DDPMPipeline.from_pretrained(hybrid_run)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("overrides, match", [
    (dict(variance_type="learned_range"), r"--variance_type learned_range is trained by the bound.*--loss hybrid"),
    (dict(loss="hybrid"), r"--loss hybrid adds the bound to train a learned variance"),
    (dict(loss="vlb", snr_gamma=5.0), r"--snr_gamma weights L_simple's MSE"),
    (dict(vlb_weight=0.0), r"--vlb_weight=0.0 must be positive"),
])
def test_objective_settings_that_cannot_train_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        resolve_config({**TINY, **overrides})


# ---------------------------------------------------------------- bits/dim during training


@pytest.mark.slow
def test_nll_during_training_is_the_bound_of_the_ema_model_on_held_out_images(tmp_path):
    held_out = held_out_digits(tmp_path / "held_out", 5)
    config = resolve_config({**TINY, "output_dir": str(tmp_path / "run"), "max_train_steps": 4, "checkpointing_steps": 4,
                             "num_train_timesteps": 10, "eval_nll_every": 2, "eval_nll_images": 5,
                             "eval_nll_dataset": str(held_out), "batch_size": 4, "max_train_samples": 16})
    train(config)
    nll = json.loads((tmp_path / "run" / "train_summary.json").read_text())["nll"]
    assert [e["step"] for e in nll] == [2, 4] and all(e["images"] == 5 for e in nll)
    pipe = DDPMPipeline.from_pretrained(tmp_path / "run")  # the EMA weights at step 4
    per_image = {term: [] for term in TERMS}
    for _, terms in bits_per_dim_of_share(pipe.unet, pipe.scheduler, uint8_images(held_out), range(5), config.seed, 2):
        for term in TERMS:
            per_image[term] += terms[term].tolist()
    for term in TERMS:  # to float32 network precision: the training evaluation ran other batch sizes
        assert nll[-1][term]["mean"] == pytest.approx(np.mean(per_image[term]), rel=1e-6, abs=1e-9)
    assert nll[-1]["total"]["sem"] == pytest.approx(np.std(per_image["total"], ddof=1) / np.sqrt(5), rel=1e-4)
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| {nll[-1]['total']['mean']:.4f} ± {nll[-1]['total']['sem']:.4f} |" in card
    assert "during training, at step 4, on 5 held-out images" in card


@pytest.mark.slow
def test_eval_dtype_bf16_measures_a_bf16_copy_of_the_ema_model_and_leaves_the_ema_in_float32(tmp_path, monkeypatch):
    from common import stand_in_network

    from ddpm_hf.sampling.samplers import cast_network
    from ddpm_hf.training import watch as training_watch

    held_out = held_out_digits(tmp_path / "held_out", 5)
    sampled_with = []
    pipeline_for = training_watch.pipeline_for
    monkeypatch.setattr(training_watch, "pipeline_for",
                        lambda unet, *a, **k: sampled_with.append(unet.dtype) or pipeline_for(unet, *a, **k))
    config = resolve_config({**TINY, "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "checkpointing_steps": 2,
                             "num_train_timesteps": 10, "eval_nll_every": 2, "eval_nll_images": 5, "eval_every": 2,
                             "eval_samples": 10, "eval_steps": 2, "eval_cache_dir": str(tmp_path / "cache"),
                             "eval_nll_dataset": str(held_out), "batch_size": 4, "max_train_samples": 16,
                             "eval_dtype": "bf16"})
    train(config, feature_network=stand_in_network())
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert torch.bfloat16 in sampled_with and len(summary["evals"]) == 1  # the FID's samples: a bf16 network
    pipe = DDPMPipeline.from_pretrained(tmp_path / "run")
    assert pipe.unet.dtype == torch.float32  # the EMA weights were saved as they were averaged
    oracle = {precision: [] for precision in ("fp32", "bf16")}
    for precision in oracle:
        if precision == "bf16":
            cast_network(pipe.unet, "bf16")
        for _, terms in bits_per_dim_of_share(pipe.unet, pipe.scheduler, uint8_images(held_out), range(5), config.seed, 2):
            oracle[precision] += terms["total"].tolist()
    measured = summary["nll"][-1]["total"]["mean"]
    # bf16's own chain, to well within the bf16-fp32 gap: on a CPU without native bf16 (AMD EPYC, emulated) the
    # copy cast during training and the reloaded pipeline cast here round 2e-6 apart; the gap is 1.7e-4
    bf16_gap = abs(np.mean(oracle["bf16"]) - np.mean(oracle["fp32"]))
    assert abs(measured - np.mean(oracle["bf16"])) < 0.1 * bf16_gap
    assert measured != pytest.approx(np.mean(oracle["fp32"]), rel=1e-6)  # bf16 is measurably not fp32 ...
    assert measured == pytest.approx(np.mean(oracle["fp32"]), abs=0.05)  # ... and close to it
    with pytest.raises(ValueError, match=r"--eval_dtype fp16 needs a GPU .* use --eval_dtype bf16 or fp32"):
        train(dataclasses.replace(config, output_dir=str(tmp_path / "fp16"), eval_dtype="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_nll_during_training_refuses_the_training_data_as_held_out_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"--eval_nll_every needs held-out images.*give --eval_nll_dataset"):
        train(resolve_config({**TINY, "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "eval_nll_every": 1,
                              "eval_nll_split": "train"}))
    folder = held_out_digits(tmp_path / "images", 8)  # a local folder is one set: it cannot hold its own held-out images
    with pytest.raises(ValueError, match=r"--eval_nll_every needs held-out images.*give --eval_nll_dataset"):
        train(resolve_config({**TINY, "dataset": str(folder), "output_dir": str(tmp_path / "run"), "max_train_steps": 2,
                              "max_train_samples": None, "eval_nll_every": 1}))
    assert not (tmp_path / "run" / "checkpoint-1").exists()


def test_nll_during_training_on_the_built_in_digits_uses_their_held_out_split(tmp_path):
    from ddpm_hf.data.decoding import build_image_bank
    from ddpm_hf.data.sources import load_image_dataset
    from ddpm_hf.training.watch import load_held_out_images

    config = resolve_config({**TINY, "output_dir": str(tmp_path), "eval_nll_every": 2, "eval_nll_images": 3})
    test = build_image_bank(load_image_dataset("digits", split="test"), "image", 1, config.resolution, progress=False)
    assert torch.equal(load_held_out_images(config).images, test.images[:3])


# ---------------------------------------------------------------- ddpm-nll


@pytest.fixture(scope="module")
def nll_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("nll")
    torch.manual_seed(0)
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=2),
                 DDPMScheduler(num_train_timesteps=40, variance_type="learned_range")).save_pretrained(root / "pipe")
    return root / "pipe", held_out_digits(root / "images", 7)


def nll_cli(pipe, out, images, *extra, processes=1):
    launch = launch_two() if processes == 2 else [sys.executable]
    return launch + ["-m", "ddpm_hf.commands.nll", str(pipe), str(out), "--dataset", str(images), "--num_images", "7", *map(str, extra)]


def per_image(out: Path, n: int = 7) -> np.ndarray:
    return np.array([[np.load(image_file(out, k))[term] for term in TERMS] for k in range(n)])


@pytest.mark.slow
def test_ddpm_nll_gives_the_same_numbers_with_one_and_two_processes(nll_setup, tmp_path):
    pipe, images = nll_setup
    one = run_in_process(nll_cli(pipe, tmp_path / "one", images, "--batch_size", 3), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(nll_cli(pipe, tmp_path / "two", images, "--batch_size", 2, processes=2), capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    # the same noise per image; the float32 network rounds a little differently in other batch compositions
    np.testing.assert_allclose(per_image(tmp_path / "one"), per_image(tmp_path / "two"), rtol=1e-6, atol=1e-9)
    a, b = (json.loads((tmp_path / d / "nll.json").read_text()) for d in ("one", "two"))
    assert a["bits_per_dim"]["total"]["mean"] == pytest.approx(b["bits_per_dim"]["total"]["mean"], rel=1e-6)
    assert a["num_images"] == 7
    assert "NLL bound:" in one.stdout and one.stdout.count("NLL bound:") == 1 and two.stdout.count("NLL bound:") == 1
    # and they are the library's numbers for image k with noise from (seed, k)
    p = DDPMPipeline.from_pretrained(pipe)
    for ks, terms in bits_per_dim_of_share(p.unet, p.scheduler, uint8_images(images), range(7), 0, 7):
        np.testing.assert_allclose(per_image(tmp_path / "one")[:, 0], terms["total"].numpy(), rtol=1e-6)
    protocol = a["protocol"]
    assert (protocol["num_train_timesteps"], protocol["variance_type"], protocol["clip_denoised"]) == (40, "learned_range", True)
    assert len(protocol["weights_sha256"]) == 64 and len(a["per_timestep_mean"]) == 40
    assert Image.open(tmp_path / "one" / "nll_terms.png").size[0] >= 600


@pytest.mark.slow
def test_ddpm_nll_killed_and_restarted_gives_the_uninterrupted_numbers(nll_setup, tmp_path):
    pipe, images = nll_setup
    out = tmp_path / "killed"
    proc = subprocess.Popen(nll_cli(pipe, out, images, "--batch_size", 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(list((out / "images").glob("*.npz"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = sorted(int(p.stem) for p in (out / "images").glob("*.npz"))
    assert 0 < len(kept) < 7, "the kill should land midway"
    before = {k: image_file(out, k).read_bytes() for k in kept}
    (out / "images" / "000000.npz").write_bytes(b"damaged")  # a damaged result is measured again
    run_in_process(nll_cli(pipe, out, images, "--batch_size", 4), check=True, capture_output=True)
    assert all(image_file(out, k).read_bytes() == before[k] for k in kept if k != 0)  # complete results are kept
    run_in_process(nll_cli(pipe, tmp_path / "whole", images, "--batch_size", 1), check=True, capture_output=True)
    np.testing.assert_allclose(per_image(out), per_image(tmp_path / "whole"), rtol=1e-6)
    assert not list((out / "images").glob(".*tmp-*"))


@pytest.mark.slow
def test_ddpm_nll_refuses_a_folder_measured_otherwise_and_its_result_reaches_the_card(nll_setup, hybrid_run, tmp_path):
    pipe, images = nll_setup
    run_in_process(nll_cli(pipe, tmp_path / "m", images), check=True, capture_output=True)
    proc = run_in_process(nll_cli(pipe, tmp_path / "m", images, "--no-clip_denoised"), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'm'} holds a bits/dim measurement with other settings (clip_denoised); use a new output "
        "folder, or --overwrite to measure again from scratch."]
    again = run_in_process(nll_cli(pipe, tmp_path / "m", images, "--no-clip_denoised", "--overwrite", "--output",
                                   tmp_path / "card" / "nll.json"), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "m" / "nll_protocol.json").read_text())["clip_denoised"] is False
    card_dir = tmp_path / "card"
    for name in ("training_config.json", "model_index.json", "unet", "scheduler"):
        src = hybrid_run / name
        os.symlink(src, card_dir / name, target_is_directory=src.is_dir())
    nll = json.loads((card_dir / "nll.json").read_text())["bits_per_dim"]
    card = write_model_card(card_dir).read_text()
    assert f"| {nll['total']['mean']:.4f} ± {nll['total']['sem']:.4f} | {nll['prior']['mean']:.4f} |" in card
    assert "name: NLL (bits/dim)" in card and "`ddpm-nll` on 7 images" in card
