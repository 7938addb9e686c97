"""Our DDPMScheduler against the installed diffusers.DDPMScheduler, over the product of options.

Two oracles:
* stock diffusers (float32 tables) for everything float32 can hold to 1e-6: betas, ᾱ_t, timesteps,
  add_noise, get_velocity, single steps away from t≈0, strided loops;
* diffusers' own step code run on our float64 ᾱ table (diffusers computes its coefficients from
  whatever table it holds) for every step of full 1000-step and strided loops: this isolates the one
  difference, float32 roundoff in diffusers' 1 - ᾱ_t/ᾱ_{t-1}, which test_more_accurate_than_diffusers
  shows is diffusers' error, not ours.
"""

import itertools

import diffusers
import numpy as np
import pytest
import torch
from conftest import dummy_model, dummy_sample_deter

from ddpm_hf import DDPMScheduler

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
# fixed_large_log is a diffusers bug (NaN): see test_scheduler_math.py::test_fixed_large_log_is_fixed_large
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]
CLIPPING = ["clip", "threshold", "none"]


def make_config(beta_schedule, variance_type, prediction_type, spacing, clipping):
    return dict(
        beta_schedule=beta_schedule,
        variance_type=variance_type,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        clip_sample=clipping == "clip",
        clip_sample_range=0.8,
        thresholding=clipping == "threshold",
        sample_max_value=1.5,
    )


def float64_diffusers(config, ours):
    ref = diffusers.DDPMScheduler(**config)
    ref.alphas_cumprod = ours.tables().alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def model_output(sample, t, variance_type, diffusers_reading=False):
    out = dummy_model(sample, t)
    if variance_type == "learned":  # the second half is log σ² (ours, improved DDPM) or σ² itself (diffusers' reading)
        # a spread of log σ² (not 0, where the two readings agree): each scheduler gets the same σ in its own reading
        log_variance = torch.linspace(-3.0, 0.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        return torch.cat([out, log_variance.exp() if diffusers_reading else log_variance], dim=1)
    if variance_type == "learned_range":  # the second half interpolates log β̃ .. log β
        return torch.cat([out, torch.linspace(-1, 1, out.numel()).reshape(out.shape)], dim=1)
    return out


def tolerance(variance_type: str, otherwise: float) -> float:
    """How far the two chains may drift: "learned" gives each scheduler σ in its own reading (exp(v/2) against
    √σ²), two float32 roundings of σ that compound over the chain (measured: 3e-5 over 50 steps, 1.5e-4 over 1000);
    reading the other convention would be off by O(1), or NaN."""
    return 5e-4 if variance_type == "learned" else otherwise


def run_lockstep(ours, ref, variance_type, num_inference_steps=None):
    """Run both schedulers side by side from the same sample and generator seed; return the largest
    difference of prev_sample and pred_original_sample over the chain."""
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        ref.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x_ours = x_ref = dummy_sample_deter()
    g_ours, g_ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    worst = 0.0
    timesteps = ours.timesteps.tolist()
    for i, t in enumerate(timesteps):
        last = i == len(timesteps) - 1
        a = ours.step(model_output(x_ours, t, variance_type), t, x_ours, generator=g_ours)
        b = ref.step(model_output(x_ref, t, variance_type, diffusers_reading=True), t, x_ref, generator=g_ref)
        worst = max(worst, (a.pred_original_sample - b.pred_original_sample).abs().max().item())
        if last and t > 0:
            # diffusers adds noise on a last step that lands on x_0 from t > 0 (trailing spacing); we
            # follow Algorithm 2 and add none. With ᾱ_{t'} = 1 the posterior mean is x̂_0 itself.
            worst = max(worst, (a.prev_sample - b.pred_original_sample).abs().max().item())
            again = ours.step(model_output(x_ours, t, variance_type), t, x_ours, generator=torch.Generator().manual_seed(9))
            assert torch.equal(again.prev_sample, a.prev_sample)
            break
        worst = max(worst, (a.prev_sample - b.prev_sample).abs().max().item())
        x_ours, x_ref = a.prev_sample, b.prev_sample
    return worst


ALL = list(itertools.product(BETA_SCHEDULES, VARIANCE_TYPES, PREDICTION_TYPES, SPACINGS, CLIPPING))


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_tables_match_diffusers(beta_schedule):
    for rescale in (False, True):
        ours = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
        ref = diffusers.DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
        for name in ("betas", "alphas", "alphas_cumprod"):
            got, want = getattr(ours, name), getattr(ref, name)
            assert got.dtype == want.dtype == torch.float32
            # Rescaled betas near T are ratios of ᾱ ~ 1e-5, where diffusers' float32 loses ~3e-6 relative.
            rtol = 1e-5 if rescale and name != "alphas_cumprod" else 0
            torch.testing.assert_close(got, want, atol=1e-6, rtol=rtol, msg=f"{name} {beta_schedule} rescale={rescale}")


def test_trained_betas_match_diffusers():
    betas = np.linspace(1e-4, 0.05, 200) ** 1.1
    ours, ref = DDPMScheduler(num_train_timesteps=200, trained_betas=betas), diffusers.DDPMScheduler(num_train_timesteps=200, trained_betas=betas)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 50, 333, 999, 1000])
def test_timesteps_match_diffusers(spacing, steps):
    ours, ref = DDPMScheduler(timestep_spacing=spacing), diffusers.DDPMScheduler(timestep_spacing=spacing)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.timesteps.dtype == ref.timesteps.dtype
    for t in ours.timesteps.tolist():
        assert ours.previous_timestep(t) == int(ref.previous_timestep(t))


def test_leading_steps_offset_and_custom_timesteps_match_diffusers():
    ours, ref = DDPMScheduler(steps_offset=1), diffusers.DDPMScheduler(steps_offset=1)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    custom = [999, 800, 500, 250, 100, 20, 3]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == ref.timesteps.tolist() == custom
    assert [ours.previous_timestep(t) for t in custom] == [int(ref.previous_timestep(t)) for t in custom]


@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule):
    """float32: within 1e-6 of stock diffusers once 1 - ᾱ_t is far from a float32 cancellation (t >= 250), and
    within 1e-6 of the float64 closed form everywhere; float64: diffusers' code on our float64 table."""
    ours, ref = DDPMScheduler(beta_schedule=beta_schedule), diffusers.DDPMScheduler(beta_schedule=beta_schedule)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 2, 10, 20, 100, 250, 487, 500, 700, 900, 990, 995, 997, 998, 999])
    ab = ours.tables().alphas_cumprod[t].reshape(-1, 1, 1, 1)
    exact = {
        "add_noise": ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double(),
        "get_velocity": ab.sqrt() * noise.double() - (1 - ab).sqrt() * x0.double(),
    }
    late = t >= 250
    ref64 = float64_diffusers({"beta_schedule": beta_schedule}, ours)
    for fn in ("add_noise", "get_velocity"):
        got = getattr(ours, fn)(x0, noise, t)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact[fn], atol=1e-6, rtol=0)
        torch.testing.assert_close(got[late], getattr(ref, fn)(x0, noise, t)[late], atol=1e-6, rtol=0)
        torch.testing.assert_close(got, getattr(ref, fn)(x0, noise, t), atol=1e-5, rtol=0)
        got64 = getattr(ours, fn)(x0.double(), noise.double(), t)
        torch.testing.assert_close(got64, getattr(ref64, fn)(x0.double(), noise.double(), t), atol=1e-12, rtol=0)


@pytest.mark.parametrize("config", ALL, ids=lambda c: "-".join(c))
def test_strided_loop_matches_diffusers(config):
    """50 of 1000 steps, every option: diffusers' step on float64 tables to 1e-6; stock diffusers (whose
    float32 coefficients are off by up to 1e-3 relative near t = 0) to 1e-4."""
    beta_schedule, variance_type, prediction_type, spacing, clipping = config
    cfg = make_config(*config)
    ours = DDPMScheduler(**cfg)
    assert run_lockstep(ours, float64_diffusers(cfg, ours), variance_type, 50) <= tolerance(variance_type, 1e-6)
    if beta_schedule == "linear" and clipping == "clip":
        assert run_lockstep(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg), variance_type, 50) <= 1e-4


FULL = list(itertools.product(BETA_SCHEDULES, VARIANCE_TYPES, PREDICTION_TYPES, ["leading"], CLIPPING))


@pytest.mark.slow
@pytest.mark.parametrize("config", FULL, ids=lambda c: "-".join(c))
def test_full_loop_matches_diffusers(config):
    """All 1000 steps (spacing is irrelevant for the full chain)."""
    cfg = make_config(*config)
    ours = DDPMScheduler(**cfg)
    assert run_lockstep(ours, float64_diffusers(cfg, ours), config[1]) <= tolerance(config[1], 1e-6)


@pytest.mark.parametrize("prediction_type, total, mean", [("epsilon", 258.9606, 0.3372), ("v_prediction", 202.0296, 0.2631)])
def test_full_loop_published_values(prediction_type, total, mean):
    """diffusers' published full-loop values for the dummy model on the arange sample."""
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    sample, generator = dummy_sample_deter(), torch.manual_seed(0)
    for t in reversed(range(len(scheduler))):
        sample = scheduler.step(dummy_model(sample, t), t, sample, generator=generator).prev_sample
    assert abs(sample.abs().sum().item() - total) < 1e-2
    assert abs(sample.abs().mean().item() - mean) < 1e-3


def test_published_variances():
    scheduler = DDPMScheduler(variance_type="fixed_small")
    assert abs(float(scheduler._get_variance(0))) < 1e-5
    assert abs(float(scheduler._get_variance(487)) - 0.00979) < 1e-5
    assert abs(float(scheduler._get_variance(999)) - 0.02) < 1e-5


def exact_loop(scheduler, num_inference_steps, noise_draws):
    """The paper's Algorithm 2 in float64 throughout, on the same float32 random draws."""
    scheduler.set_timesteps(num_inference_steps)
    ab = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))
    x = next(noise_draws).double()
    ts = scheduler.timesteps.tolist()
    for t, tp in zip(ts, ts[1:] + [-1]):
        a_t, a_p = ab[t], (ab[tp] if tp >= 0 else torch.tensor(1.0, dtype=torch.float64))
        eps = dummy_model(x, t)
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        beta = 1 - a_t / a_p
        mean = a_p.sqrt() * beta / (1 - a_t) * x0 + (a_t / a_p).sqrt() * (1 - a_p) / (1 - a_t) * x
        x = mean + (((1 - a_p) / (1 - a_t) * beta).sqrt() * next(noise_draws).double() if tp >= 0 else 0)
    return x


@pytest.mark.parametrize("steps", [1000, 50])
def test_more_accurate_than_diffusers(steps):
    """Against a float64 oracle on the same random draws, our float32 chain is closer than diffusers'."""

    def draws():
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.randn(4, 3, 8, 8, generator=g)

    exact = exact_loop(DDPMScheduler(), steps, draws())

    def run(scheduler):
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 3, 8, 8, generator=g)
        for t in scheduler.timesteps:
            x = scheduler.step(dummy_model(x, t), t, x, generator=g).prev_sample
        return (x.double() - exact).abs().max().item()

    ours, theirs = run(DDPMScheduler()), run(diffusers.DDPMScheduler())
    assert ours < 1e-5
    assert ours <= theirs
