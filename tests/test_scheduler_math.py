"""Closed-form checks of our scheduler against the paper, its errors, and its config contract."""

import json
import math

import diffusers
import numpy as np
import pytest
import torch

from ddpm_hf import DDPMScheduler
from ddpm_hf.diffusion.scheduler import BETA_SCHEDULES, extract_into_tensor


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_alpha_bar_strictly_decreasing_in_unit_interval(beta_schedule):
    ab = DDPMScheduler(beta_schedule=beta_schedule).tables().alphas_cumprod
    assert ab.dtype == torch.float64
    assert torch.all((ab > 0) & (ab < 1))
    assert torch.all(ab[1:] < ab[:-1])


def test_linear_schedule_closed_form():
    s = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    expected = np.cumprod([1 - b for b in betas])
    np.testing.assert_allclose(s.tables().alphas_cumprod.numpy(), expected, rtol=1e-14)
    # ᾱ_T for the paper's schedule: tiny, so x_T is nearly pure noise (SNR ≈ 4e-5)
    assert 4.0e-5 < float(s.tables().alphas_cumprod[-1]) < 4.1e-5


def test_cosine_schedule_closed_form():
    s = DDPMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=100)
    f = lambda t: math.cos((t / 100 + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [min(1 - f(i + 1) / f(i), 0.999) for i in range(100)]
    np.testing.assert_allclose(s.betas.double().numpy(), expected, rtol=1e-6)


def test_add_noise_with_zero_noise_is_scaled_x0():
    s = DDPMScheduler()
    x0 = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 998, 999])
    out = s.add_noise(x0, torch.zeros_like(x0), t)
    ab = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))[t]
    torch.testing.assert_close(out, ab.sqrt().reshape(-1, 1, 1, 1) * x0, atol=1e-15, rtol=0)


def test_add_noise_marginal_statistics():
    """x_t over many draws of ε has mean sqrt(ᾱ_t) x_0 and variance 1 - ᾱ_t (Eq. 4)."""
    s = DDPMScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7, dtype=torch.float64)
    for t in (50, 400, 900):
        xt = s.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.full((200_000,), t))
        ab = float(s.tables().alphas_cumprod[t])
        assert abs(xt.mean().item() - math.sqrt(ab) * 0.7) < 5 * math.sqrt((1 - ab) / 200_000)
        assert abs(xt.var().item() - (1 - ab)) < 0.01 * (1 - ab)


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_posterior_coefficients_equal_paper_formulas(beta_schedule):
    """Eq. 7 for every t, and independently the product-of-Gaussians derivation of q(x_{t-1} | x_t, x_0)."""
    s = DDPMScheduler(beta_schedule=beta_schedule)
    ab = s.tables().alphas_cumprod.numpy()
    for t in range(1000):
        ab_prev = ab[t - 1] if t > 0 else 1.0
        beta_t = 1 - ab[t] / ab_prev
        c0, ct, var, beta = s.posterior_coefficients(t)
        assert beta == pytest.approx(beta_t, rel=1e-12)
        assert c0 == pytest.approx(math.sqrt(ab_prev) * beta_t / (1 - ab[t]), rel=1e-12)
        assert ct == pytest.approx(math.sqrt(1 - beta_t) * (1 - ab_prev) / (1 - ab[t]), rel=1e-12)
        assert var == pytest.approx((1 - ab_prev) / (1 - ab[t]) * beta_t, rel=1e-12, abs=1e-300)
        if t > 0:
            # q(x_t | x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t), q(x_{t-1} | x_0) = N(sqrt(ᾱ_{t-1}) x_0, 1 - ᾱ_{t-1})
            precision = (1 - beta_t) / beta_t + 1 / (1 - ab_prev)
            assert var == pytest.approx(1 / precision, rel=1e-9)
            assert ct == pytest.approx(math.sqrt(1 - beta_t) / beta_t / precision, rel=1e-9)
            assert c0 == pytest.approx(math.sqrt(ab_prev) / (1 - ab_prev) / precision, rel=1e-9)


def test_strided_posterior_uses_the_jump():
    s = DDPMScheduler()
    s.set_timesteps(50)
    assert s.previous_timestep(980) == 960
    c0, ct, var, beta = s.posterior_coefficients(980, 960)
    ab = s.tables().alphas_cumprod
    assert beta == pytest.approx(1 - float(ab[980] / ab[960]), rel=1e-12)
    assert var == pytest.approx((1 - float(ab[960])) / (1 - float(ab[980])) * beta, rel=1e-12)


def test_step_with_true_noise_recovers_x0_and_posterior_mean():
    """Fed the true ε, x̂_0 is x_0 and the step's mean is the true posterior mean."""
    s = DDPMScheduler(clip_sample=False)
    x0 = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = 600
    xt = s.add_noise(x0, eps, torch.tensor([t]))
    out = s.step(eps, t, xt, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-12, rtol=0)
    c0, ct, var, _ = s.posterior_coefficients(t)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(out.prev_sample, c0 * x0 + ct * xt + math.sqrt(var) * z, atol=1e-12, rtol=0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_other_parameterisations_recover_x0(prediction_type):
    s = DDPMScheduler(clip_sample=False, prediction_type=prediction_type)
    x0, eps = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([321])
    xt = s.add_noise(x0, eps, t)
    target = x0 if prediction_type == "sample" else s.get_velocity(x0, eps, t)
    torch.testing.assert_close(s.step(target, 321, xt).pred_original_sample, x0, atol=1e-12, rtol=0)


def test_last_step_adds_no_noise_even_off_zero():
    """Algorithm 2 sets z = 0 on the step to x_0; diffusers adds noise unless t == 0 (trailing spacing
    ends at t = 19 for 50 steps), which with fixed_large is a full β-sized kick."""
    cfg = dict(timestep_spacing="trailing", variance_type="fixed_large", clip_sample=False)
    ours, ref = DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    t = int(ours.timesteps[-1])
    assert t == 19
    x = torch.randn(1, 3, 8, 8)
    eps = torch.randn(1, 3, 8, 8)
    outs = [ours.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample for k in (1, 2)]
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], ours.step(eps, t, x).pred_original_sample)
    refs = [ref.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample for k in (1, 2)]
    assert (refs[0] - refs[1]).abs().max() > 0.1  # diffusers: the final image depends on the last draw


def test_fixed_large_log_is_fixed_large():
    """diffusers' fixed_large_log takes the square root of log β (NaN); ours is the same variance as fixed_large."""
    x, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    outs = []
    for vt in ("fixed_large", "fixed_large_log"):
        s = DDPMScheduler(variance_type=vt)
        outs.append(s.step(eps, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    assert torch.equal(outs[0], outs[1])
    ref = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    assert torch.isnan(ref.step(eps, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()


def test_dynamic_thresholding_closed_form():
    s = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.5, sample_max_value=3.0)
    x = torch.tensor([[-4.0, -2.0, 0.0, 2.0, 4.0]]).reshape(1, 1, 1, 5)
    # the median of |x| is 2 -> clamp to [-2, 2] and divide by 2
    torch.testing.assert_close(s._threshold_sample(x), torch.tensor([[-1.0, -1.0, 0.0, 1.0, 1.0]]).reshape(1, 1, 1, 5))
    small = torch.full((1, 1, 1, 4), 0.5)  # s clamps up to 1: plain clipping, values unchanged
    torch.testing.assert_close(s._threshold_sample(small), small)


def test_extract_into_tensor_broadcasts_per_sample():
    table = torch.arange(10, dtype=torch.float64)
    out = extract_into_tensor(table, torch.tensor([3, 7]), (2, 3, 4, 4), torch.float32, "cpu")
    assert out.shape == (2, 1, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == [3.0, 7.0]


def test_math_is_ours_not_inherited():
    """Every method diffusers' DDPMScheduler defines is overridden by ours: no call reaches its DDPM math."""
    theirs = {k for k, v in vars(diffusers.DDPMScheduler).items() if callable(v) and not k.startswith("__")} | {"__init__", "__len__"}
    ours = set(vars(DDPMScheduler))
    assert theirs <= ours, f"inherited from diffusers: {sorted(theirs - ours)}"
    assert issubclass(DDPMScheduler, diffusers.DDPMScheduler)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta_schedule="cosine"), r"beta_schedule='cosine' is not supported; use one of 'linear'"),
        (dict(beta_start=0.02, beta_end=0.01), r"0 < beta_start < beta_end < 1"),
        (dict(beta_start=0.02, beta_end=0.02), r"beta_start=0.02 and beta_end=0.02 must satisfy"),
        (dict(beta_end=1.5), r"0 < beta_start < beta_end < 1"),
        (dict(trained_betas=[0.1, 1.2, 0.3], num_train_timesteps=3), r"betas must lie in \(0, 1\), but beta\[1\]=1.2"),
        (dict(trained_betas=[0.0, 0.1], num_train_timesteps=2), r"beta\[0\]=0.0"),
        (dict(trained_betas=[0.1, 0.2], num_train_timesteps=3), r"trained_betas has 2 values but num_train_timesteps=3"),
        (dict(variance_type="fixed"), r"variance_type='fixed' is not supported; use one of 'fixed_small'"),
        (dict(prediction_type="eps"), r"prediction_type='eps' is not supported; use one of 'epsilon', 'sample', 'v_prediction'"),
        (dict(timestep_spacing="uniform"), r"timestep_spacing='uniform' is not supported; use one of 'leading'"),
        (dict(num_train_timesteps=0), r"num_train_timesteps=0 must be a positive integer"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPMScheduler(**kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(num_inference_steps=1001), r"num_inference_steps=1001 must be between 1 and num_train_timesteps=1000"),
        (dict(num_inference_steps=0), r"num_inference_steps=0 must be between 1"),
        (dict(timesteps=[10, 500, 999]), r"timesteps must be strictly descending"),
        (dict(timesteps=[500, 500, 1]), r"timesteps must be strictly descending"),
        (dict(timesteps=[1000, 500]), r"timesteps must lie in \[0, 999\]"),
        (dict(timesteps=[500, -1]), r"timesteps must lie in \[0, 999\]"),
        (dict(num_inference_steps=10, timesteps=[5, 1]), r"exactly one of num_inference_steps or timesteps"),
        (dict(), r"exactly one of num_inference_steps or timesteps"),
    ],
)
def test_invalid_timesteps_raise(call, match):
    with pytest.raises(ValueError, match=match):
        DDPMScheduler().set_timesteps(**call)


def test_steps_offset_past_the_end_raises():
    with pytest.raises(ValueError, match=r"steps_offset=1 pushes timestep 1000 past num_train_timesteps=1000"):
        DDPMScheduler(steps_offset=1).set_timesteps(1000)


def test_learned_variance_needs_doubled_channels():
    with pytest.raises(ValueError, match=r"needs a model output of 6 channels .* got 3"):
        DDPMScheduler(variance_type="learned_range").step(torch.zeros(1, 3, 4, 4), 10, torch.zeros(1, 3, 4, 4))


def test_timestep_outside_chain_raises():
    s = DDPMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match=r"timestep 5 is not in the chain set by set_timesteps"):
        s.step(torch.zeros(1, 3, 4, 4), 5, torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- config contract


def test_config_keys_are_exactly_diffusers():
    ours, theirs = dict(DDPMScheduler().config), dict(diffusers.DDPMScheduler().config)
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {k: v for k, v in theirs.items() if not k.startswith("_")}


def test_config_round_trips_through_diffusers(tmp_path):
    cfg = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", variance_type="fixed_large",
               prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False, rescale_betas_zero_snr=True)
    DDPMScheduler(**cfg).save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler"
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path / "ours")
    assert all(theirs.config[k] == v for k, v in cfg.items())
    theirs.save_pretrained(tmp_path / "theirs")
    back = DDPMScheduler.from_pretrained(tmp_path / "theirs")
    assert type(back) is DDPMScheduler
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    assert public(back.config) == public(DDPMScheduler(**cfg).config)
    torch.testing.assert_close(back.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0)


def test_old_hub_config_loads_with_defaults(tmp_path):
    """A 2022 scheduler_config.json (diffusers 0.1.1, as in google/ddpm-cifar10-32) fills the newer keys with defaults."""
    (tmp_path / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
        "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
        "variance_type": "fixed_small"}))
    s = DDPMScheduler.from_pretrained(tmp_path)
    assert s.config.prediction_type == "epsilon" and s.config.timestep_spacing == "leading"


def test_other_diffusers_schedulers_build_from_our_config():
    cfg = DDPMScheduler(beta_schedule="linear").config
    ddim = diffusers.DDIMScheduler.from_config(cfg)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
    torch.testing.assert_close(ddim.alphas_cumprod, diffusers.DDPMScheduler().alphas_cumprod)
    assert dpm.config.algorithm_type == "dpmsolver++"


def test_learned_variance_channels_are_log_sigma_squared():
    """`learned`: the second C channels are log σ² (improved DDPM, and what ddpm_hf.diffusion.likelihood evaluates); the
    step adds exp(log σ² / 2)·z to the posterior mean."""
    s = DDPMScheduler(variance_type="learned", clip_sample=False)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    log_var = torch.full_like(eps, -3.0)
    t = 500
    out = s.step(torch.cat([eps, log_var], dim=1), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    mean = DDPMScheduler(variance_type="fixed_small", clip_sample=False).step(eps, t, x).pred_original_sample
    c0, ct, _, _ = s.posterior_coefficients(t)
    z = torch.randn(eps.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, c0 * mean + ct * x + math.exp(-1.5) * z, atol=1e-6, rtol=0)


def test_the_variance_table_covers_every_variance_type_and_marks_the_learned_ones():
    from ddpm_hf.choices import LEARNED_VARIANCE_TYPES, VARIANCE_TYPES
    from ddpm_hf.diffusion.scheduler import VARIANCES, variance

    assert set(VARIANCES) == set(VARIANCE_TYPES)
    assert {name for name, kind in VARIANCES.items() if kind.learned} == set(LEARNED_VARIANCE_TYPES)
    with pytest.raises(ValueError, match=r"variance_type='fixed_medium' is not one of"):
        variance("fixed_medium")


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned", "learned_range"])
def test_the_step_and_the_bound_read_one_variance_table_alike(variance_type):
    """For t >= 1 of the full chain, the scheduler's σ_t² and the bound's log σ_t² are the same closed form (Sec. 3.2;
    improved DDPM Eq. 15 for learned_range), computed here in float64 from the betas."""
    from ddpm_hf.diffusion.likelihood import model_mean_log_variance

    T = 50
    s = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type)
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    small = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # β̃_t, t = 1..T-1
    v = torch.linspace(-0.9, 0.9, T - 1, dtype=torch.float64)  # the network's variance channel, one value per t
    expected = {"fixed_small": np.log(small), "fixed_large": np.log(betas[1:]), "learned": v.numpy(),
                "learned_range": (v.numpy() + 1) / 2 * np.log(betas[1:]) + (1 - v.numpy()) / 2 * np.log(small)}[variance_type]
    learned = variance_type.startswith("learned")
    step = []
    for t in range(1, T):
        out = s._get_variance(t, predicted_variance=v[t - 1] if learned else None)
        step.append(float(out) if learned else math.log(float(out)))
    np.testing.assert_allclose(step, expected, rtol=1e-12)
    x_t = torch.zeros(T - 1, 1, 2, 2, dtype=torch.float64)
    output = torch.cat([x_t, v.view(-1, 1, 1, 1).expand_as(x_t)], 1) if learned else x_t
    _, log_variance, _ = model_mean_log_variance(s, output, x_t, torch.arange(1, T))
    np.testing.assert_allclose(log_variance[:, 0, 0, 0].numpy(), expected, rtol=1e-12)
