"""DDPMPipeline: parity with diffusers' pipeline, loading every layout, other schedulers, exact samplers."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from common import write_google_layout

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet, denoise

REPO = Path(__file__).resolve().parents[1]


def tiny_pipeline(**scheduler_kwargs):
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8), DDPMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, steps, batch_size=2, seed=0, **kwargs):
    kwargs.setdefault("output_type", "np")
    return pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, **kwargs).images


# ---------------------------------------------------------------- save and load


def test_save_load_gives_identical_images(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDPMScheduler
    np.testing.assert_array_equal(images(pipe, 20), images(loaded, 20))


def test_model_index_names_only_diffusers_classes(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_swapped_scheduler_is_recorded(tmp_path):
    pipe = tiny_pipeline()
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert type(DDPMPipeline.from_pretrained(tmp_path).scheduler) is diffusers.DDIMScheduler


@pytest.mark.slow
def test_saved_pipeline_loads_in_plain_diffusers_without_ddpm_hf(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    script = textwrap.dedent(
        f"""
        import sys
        class Block:  # make ddpm_hf unimportable, as on a machine where it is not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ddpm_hf":
                    raise ModuleNotFoundError("No module named " + repr(name))
        sys.meta_path.insert(0, Block())
        import numpy as np, torch, diffusers
        pipe = diffusers.DiffusionPipeline.from_pretrained({str(tmp_path / 'pipe')!r})
        assert type(pipe) is diffusers.DDPMPipeline, type(pipe)
        assert type(pipe.scheduler) is diffusers.DDPMScheduler, type(pipe.scheduler)
        assert not any(m.startswith("ddpm_hf") for m in sys.modules)
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np").images
        np.save({str(tmp_path / 'out.npy')!r}, out)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), images(pipe, 20), atol=1e-5, rtol=0)


def test_loads_google_hub_layout_with_our_scheduler(tmp_path):
    pipe = tiny_pipeline()
    write_google_layout(tmp_path / "repo", pipe.unet)
    loaded = DDPMPipeline.from_pretrained(tmp_path / "repo")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDPMScheduler
    assert loaded.scheduler.config.prediction_type == "epsilon"
    np.testing.assert_array_equal(images(pipe, 10), images(loaded, 10))


@pytest.mark.slow
def test_loads_repo_id_from_hf_cache_offline(tmp_path):
    pipe = tiny_pipeline()
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hf" / "hub" / "models--google--ddpm-cifar10-32"
    write_google_layout(cache / "snapshots" / commit, pipe.unet)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(commit)
    np.save(tmp_path / "expected.npy", images(pipe, 10))
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from ddpm_hf import DDPMPipeline, DDPMScheduler
        pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
        assert type(pipe.scheduler) is DDPMScheduler
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np").images
        np.testing.assert_array_equal(out, np.load({str(tmp_path / 'expected.npy')!r}))
        try:
            DDPMPipeline.from_pretrained("google/ddpm-celebahq-256")
        except OSError as e:
            print("ERROR:", e)
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True, text=True).stdout
    error = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(error) == 1
    assert "Cannot load 'google/ddpm-celebahq-256': it is not a local folder, not in the Hugging Face cache" in error[0]
    assert "hf download google/ddpm-celebahq-256" in error[0]


# ---------------------------------------------------------------- parity with diffusers' DDPMPipeline


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1000, 50])
def test_images_match_diffusers_pipeline(steps):
    """Same UNet, scheduler config and generator. Against diffusers' pipeline and scheduler code given our
    float64 ᾱ table: to 1e-5. Against stock diffusers (float32 coefficients, see the scheduler parity
    tests): to 1e-5 for 50 steps, 1e-4 for 1000 steps."""
    pipe = tiny_pipeline()
    ours = images(pipe, steps, batch_size=3)
    ref64_scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
    ref64_scheduler.alphas_cumprod = pipe.scheduler.tables().alphas_cumprod.clone()
    ref64_scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    for scheduler, tol in ((ref64_scheduler, 1e-5), (diffusers.DDPMScheduler.from_config(pipe.scheduler.config), 1e-5 if steps == 50 else 1e-4)):
        ref = diffusers.DDPMPipeline(unet=pipe.unet, scheduler=scheduler)
        ref.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(ours, images(ref, steps, batch_size=3), atol=tol, rtol=0)


@pytest.mark.slow
def test_generator_list_makes_each_image_its_own():
    pipe = tiny_pipeline()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = pipe(batch_size=4, generator=gens([5, 6, 7, 8]), num_inference_steps=20, output_type="np").images
    for i, seed in enumerate([5, 6, 7, 8]):
        single = pipe(batch_size=1, generator=gens([seed]), num_inference_steps=20, output_type="np").images
        np.testing.assert_allclose(batch[i], single[0], atol=1e-5, rtol=0)
    assert np.abs(batch[0] - batch[1]).max() > 0.05


def test_output_types():
    pipe = tiny_pipeline()
    pt = images(pipe, 5, output_type="pt")
    np_ = images(pipe, 5, output_type="np")
    pil = images(pipe, 5, output_type="pil")
    assert pt.shape == (2, 3, 8, 8) and np_.shape == (2, 8, 8, 3)
    assert 0 <= pt.min() and pt.max() <= 1
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), np_)
    assert pil[0].size == (8, 8) and np.array_equal(np.asarray(pil[1]), (np_[1] * 255).round().astype(np.uint8))
    out = pipe(batch_size=1, num_inference_steps=2, return_dict=False)
    assert isinstance(out, tuple) and len(out[0]) == 1


def test_sampling_uses_eval_mode_and_restores_training():
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8, dropout=0.5), DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.train()
    np.testing.assert_array_equal(images(pipe, 5), images(pipe, 5))  # dropout would make these differ
    assert pipe.unet.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(output_type="tensor"), r"output_type='tensor' is not one of \('pil', 'np', 'pt'\)"),
        (dict(generator=[torch.Generator()], batch_size=2), r"Got 1 generators for batch_size=2"),
        (dict(eta=0.5), r"eta=0.5 was given but DDPMScheduler.step takes no eta; use DDIMScheduler"),
        (dict(num_inference_steps=5000), r"num_inference_steps=5000 must be between 1 and num_train_timesteps=1000"),
    ],
)
def test_bad_call_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline()(**{"num_inference_steps": 2, **kwargs})


# ---------------------------------------------------------------- other schedulers, exact samplers


@pytest.mark.slow
def test_ddim_with_eta_one_is_strided_ddpm():
    """DDIM's σ_t(η=1) is the posterior std of the jump t -> t', so with unclipped x̂_0 DDIM(η=1) and our
    strided DDPM are the same sampler, draw for draw."""
    pipe = tiny_pipeline(clip_sample=False)
    ddpm = images(pipe, 50)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    np.testing.assert_allclose(images(pipe, 50, eta=1.0), ddpm, atol=1e-4, rtol=0)
    assert np.abs(images(pipe, 50, eta=0.0) - ddpm).max() > 1e-2


class GaussianDataDenoiser(torch.nn.Module):
    """The exact ε-predictor E[ε | x_t] for data x_0 ~ N(mu, s²) in every pixel."""

    def __init__(self, alphas_cumprod64, mu, s):
        super().__init__()
        self.ab, self.mu, self.s = alphas_cumprod64, mu, s

    def forward(self, x, t):
        ab = float(self.ab[int(t)])
        eps = math.sqrt(1 - ab) * (x - math.sqrt(ab) * self.mu) / (ab * self.s**2 + 1 - ab)
        return type("Out", (), {"sample": eps})


MU, S = 0.3, 0.2


def ancestral_samples(variance_type, mu, s, n=16):
    scheduler = DDPMScheduler(clip_sample=False, variance_type=variance_type)
    model = GaussianDataDenoiser(scheduler.tables().alphas_cumprod, mu, s)
    g = torch.Generator().manual_seed(0)
    return denoise(model, scheduler, torch.randn(n, 1, 32, 32, generator=g, dtype=torch.float64), 1000, generator=g)


def test_fixed_large_is_exact_for_unit_variance_data():
    """For x_0 ~ N(mu, 1), x_t ~ N(sqrt(ᾱ_t) mu, 1) and the true reverse variance is exactly β_t (Ho et al.
    Sec. 3.2): the samples are N(mu, 1)."""
    x = ancestral_samples("fixed_large", MU, 1.0)
    n = x.numel()
    assert abs(x.mean().item() - MU) < 4 / math.sqrt(n)
    assert abs(x.std().item() - 1.0) < 4 / math.sqrt(2 * n)


@pytest.mark.slow
def test_fixed_small_is_exact_for_point_data_and_variances_bracket_the_truth():
    x = ancestral_samples("fixed_small", MU, 0.0, n=2)
    torch.testing.assert_close(x, torch.full_like(x, MU), atol=1e-12, rtol=0)
    # in between, β̃_t (the lower bound on the reverse variance) under-disperses, β_t less so
    small, large = ancestral_samples("fixed_small", MU, S), ancestral_samples("fixed_large", MU, S)
    n = small.numel()
    assert abs(small.mean().item() - MU) < 4 * S / math.sqrt(n) and abs(large.mean().item() - MU) < 4 * S / math.sqrt(n)
    assert small.std().item() < large.std().item() and small.std().item() < S


@pytest.mark.parametrize(
    "make, few, many, tol",
    [
        (lambda cfg: diffusers.DDIMScheduler.from_config(cfg), 100, 1000, 1e-2),
        (lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"), 10, 50, 5e-2),
    ],
    ids=["ddim-eta0", "dpm-solver++"],
)
def test_ode_samplers_converge_to_the_exact_transport_map(make, few, many, tol):
    """For Gaussian data the probability-flow ODE maps x_T to mu + s·(x_T - sqrt(ᾱ_T)·mu)/σ_T. Swapped-in
    diffusers ODE solvers, built from our config, converge to it as steps grow."""
    ours = DDPMScheduler(clip_sample=False)
    model = GaussianDataDenoiser(ours.tables().alphas_cumprod, MU, S)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ab_T = float(ours.tables().alphas_cumprod[-1])
    exact = MU + S * (z - math.sqrt(ab_T) * MU) / math.sqrt(ab_T * S**2 + 1 - ab_T)
    error = {n: (denoise(model, make(ours.config), z, n) - exact).abs().max().item() for n in (few, many)}
    assert error[many] < tol
    assert error[many] < error[few] / 4
