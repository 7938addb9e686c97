"""The variational bound in bits/dim (ddpm_hf.diffusion.likelihood) against closed forms and an independent float64
implementation; the vlb/hybrid training losses; the importance sampler of t."""

import math

import numpy as np
import pytest
import scipy.special
import torch
from cuda_stand_in import HostReads

from ddpm_hf import DDPMScheduler, build_unet
from ddpm_hf.choices import LEARNED_VARIANCE_TYPES
from ddpm_hf.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl, prior_bpd, vb_terms_bpd
from ddpm_hf.measuring.bound import bits_per_dim, bits_per_dim_of_share
from ddpm_hf.diffusion.losses import DiffusionLoss
from ddpm_hf.diffusion.timestep_samplers import LossSecondMomentSampler, UniformSampler, make_timestep_sampler

LN2 = math.log(2)
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 256 pixel levels in [-1, 1]


def random_images(n, c=1, size=8, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def tiny_unet(variance_type, channels=1, size=8, seed=0):
    torch.manual_seed(seed)
    out = 2 * channels if variance_type in LEARNED_VARIANCE_TYPES else channels
    return build_unet("cpu-tiny", sample_size=size, in_channels=channels, out_channels=out).double().eval()


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.37, -6.0), (-0.99, -1.0), (1.7, 0.5), (-3.0, -4.0),
                                             (0.5, 3.0), (0.0, -9.0), (2.0, -7.0)])
def test_decoder_bins_sum_to_one_for_any_mean_and_scale(mean, log_scale):
    logp = discretized_gaussian_log_likelihood(GRID, torch.full_like(GRID, mean), torch.full_like(GRID, log_scale))
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_decoder_bins_are_normal_cdf_differences():
    """Each bin's probability is Φ(upper edge) - Φ(lower edge) of the exact normal CDF, outer bins open."""
    mean, sigma = 0.2, 0.05
    logp = discretized_gaussian_log_likelihood(GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(sigma)))
    x = GRID.numpy()
    lower = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mean) / sigma)
    upper = np.where(x > 0.999, np.inf, (x + 1 / 255 - mean) / sigma)
    # above the mean the upper-tail form keeps its digits (1 - Φ cancels there)
    expected = np.where(lower + upper > 0, scipy.special.ndtr(-lower) - scipy.special.ndtr(-upper),
                        scipy.special.ndtr(upper) - scipy.special.ndtr(lower))
    ok = expected > 1e-200
    np.testing.assert_allclose(logp.numpy()[ok], np.log(expected[ok]), rtol=1e-9)
    # far in a tail, where a difference of CDFs is 0 in float64, the log stays exact: -log Φ(-z) ~ z²/2
    f64 = lambda v: torch.tensor([v], dtype=torch.float64)
    far = discretized_gaussian_log_likelihood(f64(-1.0), f64(1.0), f64(math.log(0.01)))
    z = (1.0 - (-1.0 + 1 / 255)) / 0.01
    assert far.item() == pytest.approx(scipy.special.log_ndtr(-z), rel=1e-10)


def test_gaussian_kl_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-14)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15


def test_prior_term_closed_form():
    s = DDPMScheduler()
    images = random_images(3, c=3)
    x0 = images.double() / 127.5 - 1
    ab = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    per_pixel = 0.5 * (-1 - math.log(1 - ab) + (1 - ab) + ab * x0**2)  # KL(N(√ᾱ x0, 1-ᾱ) || N(0, 1))
    torch.testing.assert_close(prior_bpd(s, x0), per_pixel.flatten(1).mean(1) / LN2, rtol=1e-10, atol=0)
    assert 0 < prior_bpd(s, x0).max() < 1e-4  # tiny for the paper's schedule (ᾱ_T = 4e-5)


class Oracle(torch.nn.Module):
    """Knows x_0: outputs the exact ε, x_0 or v of the x_t it is given."""

    def __init__(self, x0, scheduler):
        super().__init__()
        self.x0, self.scheduler = x0, scheduler

    def forward(self, x_t, t):
        a, s = self.scheduler.coefficients(t, x_t, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        eps = (x_t - a * self.x0) / s
        out = {"epsilon": eps, "sample": self.x0.expand_as(x_t), "v_prediction": a * eps - s * self.x0}
        return type("Output", (), {"sample": out[self.scheduler.config.prediction_type]})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_an_oracle_model_has_zero_kl_and_its_total_is_prior_plus_decoder_by_hand(prediction_type):
    T = 50
    s = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type, variance_type="fixed_small")
    images = random_images(4, c=3)
    images[0, 0, 0, :2] = torch.tensor([0, 255], dtype=torch.uint8)  # both outer bins occur
    x0 = images.double() / 127.5 - 1
    result = bits_per_dim(Oracle(x0, s), s, images, generator=torch.Generator().manual_seed(0))
    assert result["kl"].abs().max() < 1e-9
    # by hand: at t = 0 the posterior mean is x_0 itself (coefficient 1 of x_0, 0 of x_1) and σ² = β̃ at t = 1
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    sigma = math.sqrt(betas[1] * (1 - ab[0]) / (1 - ab[1]))
    half = 1 / 255 / sigma
    inner, outer = scipy.special.ndtr(half) - scipy.special.ndtr(-half), scipy.special.ndtr(half)
    x = x0.numpy()
    nll = -np.where(np.abs(x) > 0.999, np.log(outer), np.log(inner)).reshape(4, -1).mean(1) / LN2
    prior = (0.5 * (-1 - math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x**2)).reshape(4, -1).mean(1) / LN2
    np.testing.assert_allclose(result["decoder"].numpy(), nll, rtol=1e-9)
    np.testing.assert_allclose(result["prior"].numpy(), prior, rtol=1e-9)
    np.testing.assert_allclose(result["total"].numpy(), prior + nll, rtol=1e-9)


# ---------------------------------------------------------------- an independent float64 implementation


def independent_bits_per_dim(unet, T, variance_type, images, noise, clip=True):
    """The bound, from the definitions, in plain per-image, per-timestep, per-pixel float64 NumPy loops."""
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    beta_tilde = betas * (1 - ab_prev) / (1 - ab)
    out = []
    for i in range(images.shape[0]):
        x0 = images[i].double().numpy() / 127.5 - 1
        C = x0.shape[0]
        total = 0.5 * (-1 - math.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x0**2).mean() / LN2  # L_T
        for t in range(T):
            x_t = math.sqrt(ab[t]) * x0 + math.sqrt(1 - ab[t]) * noise[t, i].double().numpy()
            with torch.no_grad():
                o = unet(torch.from_numpy(x_t)[None], torch.tensor([t])).sample[0].double().numpy()
            eps = o[:C]
            x0_hat = (x_t - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
            if clip:
                x0_hat = np.clip(x0_hat, -1, 1)
            mean = math.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]) * x0_hat + math.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]) * x_t
            small = math.log(beta_tilde[1] if t == 0 else beta_tilde[t])
            if variance_type == "fixed_small":
                log_var = np.full_like(x0, small)
            elif variance_type == "fixed_large":
                log_var = np.full_like(x0, math.log(beta_tilde[1] if t == 0 else betas[t]))
            elif variance_type == "learned_range":
                frac = (o[C:] + 1) / 2
                log_var = frac * math.log(betas[t]) + (1 - frac) * small
            else:  # learned: log σ² itself
                log_var = o[C:]
            if t == 0:
                sd = np.exp(0.5 * log_var)
                lo = scipy.special.ndtr((x0 - 1 / 255 - mean) / sd)
                hi = scipy.special.ndtr((x0 + 1 / 255 - mean) / sd)
                p = np.where(x0 < -0.999, hi, np.where(x0 > 0.999, 1 - lo, hi - lo))
                total += (-np.log(p)).mean() / LN2
            else:
                true_mean = math.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]) * x0 + math.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t]) * x_t
                var_q, var_p = beta_tilde[t], np.exp(log_var)
                kl = 0.5 * np.log(var_p / var_q) + (var_q + (true_mean - mean) ** 2) / (2 * var_p) - 0.5
                total += kl.mean() / LN2
        out.append(total)
    return np.array(out)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range", "learned"])
def test_bits_per_dim_equals_an_independent_float64_implementation(variance_type):
    T = 12
    s = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type)
    unet = tiny_unet(variance_type)
    images = random_images(3)
    images[1, 0, 2, :3] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    noise = torch.randn(T, 3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours = bits_per_dim(unet, s, images, noise=noise)
    np.testing.assert_allclose(ours["total"].numpy(), independent_bits_per_dim(unet, T, variance_type, images, noise), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["total"], ours["prior"] + ours["kl"] + ours["decoder"], rtol=0, atol=1e-12)


def test_noise_reproduces_a_generator_draw_and_image_k_does_not_depend_on_the_batch():
    T = 6
    s = DDPMScheduler(num_train_timesteps=T)
    unet = tiny_unet("fixed_small")
    images = random_images(5)
    shares = {}
    for batch in (1, 2, 5):
        for ks, terms in bits_per_dim_of_share(unet, s, images, [4, 0, 2], seed=3, batch_size=batch):
            for i, k in enumerate(ks):
                shares.setdefault(k, []).append(terms["total"][i].item())
    for k, values in shares.items():
        assert max(values) - min(values) < 1e-12, k
    # the same draws given as `noise`: the generator draws x_t for t = T-1 down to 0
    g = torch.Generator().manual_seed(11)
    drawn = [torch.randn(5, 1, 8, 8, generator=g) for _ in range(T)][::-1]
    a = bits_per_dim(unet, s, images, generator=torch.Generator().manual_seed(11))
    b = bits_per_dim(unet, s, images, noise=torch.stack(drawn))
    torch.testing.assert_close(a["total"], b["total"], rtol=0, atol=1e-12)
    # counter-based: the x_t of term t of image k is seeded_normal of its seed at step t, as given `noise`
    from ddpm_hf.pipelines.counter_noise import seeded_normal

    seeds = [5, 6, 7, 8, 9]
    c = bits_per_dim(unet, s, images, seeds=seeds)
    d = bits_per_dim(unet, s, images, noise=torch.stack([seeded_normal(seeds, (1, 8, 8), t, "bound") for t in range(T)]))
    torch.testing.assert_close(c["total"], d["total"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"noise has shape \(6, 5, 1, 8\); bits_per_dim needs \[T, N, C, H, W\]"):
        bits_per_dim(unet, s, images, noise=torch.zeros(6, 5, 1, 8))
    with pytest.raises(ValueError, match=r"bits_per_dim takes uint8 images"):
        bits_per_dim(unet, s, images.float())


# ---------------------------------------------------------------- training objectives


def loss_inputs(variance_type="learned_range", T=20):
    s = DDPMScheduler(num_train_timesteps=T, variance_type=variance_type)
    unet = tiny_unet(variance_type).float()
    x0 = random_images(4).float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    return s, unet, x0, noise


def test_vlb_loss_averages_to_the_bound_over_t():
    """With the same x_t per t, the mean over t of the vlb loss (T·L_t) is the bound less its prior (x̂_0 unclipped)."""
    T = 8
    s, unet, x0, _ = loss_inputs("learned_range", T)
    images = ((x0 + 1) * 127.5).round().to(torch.uint8)
    noise = torch.randn(T, 4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loss = DiffusionLoss(s, "vlb")
    model = lambda x_t, t: unet(x_t, t).sample
    per_t = torch.stack([loss(model, x0, noise[t], torch.full((4,), t)) for t in range(T)]).detach()
    bound = bits_per_dim(unet, s, images, noise=noise, clip_denoised=False)
    torch.testing.assert_close(per_t.mean(0).double(), bound["kl"] + bound["decoder"], rtol=1e-4, atol=1e-4)


def test_hybrid_bound_term_trains_the_variance_and_not_the_mean():
    s, unet, x0, noise = loss_inputs()
    t = torch.tensor([0, 3, 10, 19])
    output = unet(s.add_noise(x0, noise, t), t).sample.detach().requires_grad_(True)
    simple, hybrid = DiffusionLoss(s, "simple"), DiffusionLoss(s, "hybrid", vlb_weight=0.5)
    (hybrid(lambda *_: output, x0, noise, t) - simple(lambda *_: output[:, :1], x0, noise, t)).sum().backward()
    assert output.grad[:, :1].abs().max() == 0  # the stop-gradient on the mean
    assert output.grad[:, 1:].abs().max() > 0
    # and the bound term is λ·T·L_t
    expected = 0.5 * 20 * vb_terms_bpd(s, output.detach(), x0, s.add_noise(x0, noise, t), t, clip_denoised=False)
    got = (hybrid(lambda *_: output.detach(), x0, noise, t) - simple(lambda *_: output[:, :1].detach(), x0, noise, t))
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match=r"loss='kl' is not one of 'simple', 'vlb', 'hybrid'"):
        DiffusionLoss(DDPMScheduler(), "kl")


# ---------------------------------------------------------------- the importance sampler of t


class SequentialResampler:
    """improved DDPM's LossSecondMomentResampler, transcribed: shift histories, a Python loop."""

    def __init__(self, T, history=10, uniform_prob=0.001):
        self.T, self.h, self.u = T, history, uniform_prob
        self.hist, self.counts = np.zeros((T, history)), np.zeros(T, dtype=int)

    def weights(self):
        if not (self.counts == self.h).all():
            return np.ones(self.T) / self.T
        w = np.sqrt(np.mean(self.hist**2, axis=-1))
        w /= w.sum()
        return w * (1 - self.u) + self.u / self.T

    def update(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self.counts[t] == self.h:
                self.hist[t, :-1] = self.hist[t, 1:]
                self.hist[t, -1] = loss
            else:
                self.hist[t, self.counts[t]] = loss
                self.counts[t] += 1


def test_loss_second_moment_sampler_matches_improved_ddpm():
    T = 5
    ours, ref = LossSecondMomentSampler(T), SequentialResampler(T)
    rng = np.random.default_rng(0)
    for step in range(12):
        # skewed batches: one t appears up to 25 times in a batch, more than a history holds
        ts = np.concatenate([rng.integers(0, T, 6), np.full(rng.integers(0, 25), step % T)])
        losses = rng.random(len(ts)) * (1 + ts)
        ours.update(torch.from_numpy(ts), torch.from_numpy(losses).float())
        ref.update(ts, losses.astype(np.float32))
        np.testing.assert_allclose(ours.probabilities().numpy(), ref.weights(), rtol=1e-5)
    assert not np.allclose(ref.weights(), 1 / T)  # warmed up: no longer uniform
    t, w = ours.sample(10_000, torch.Generator().manual_seed(0), "cpu")
    p = ours.probabilities()
    torch.testing.assert_close(w, 1 / (T * p[t]))
    np.testing.assert_allclose(np.bincount(t.numpy(), minlength=T) / 10_000, p.numpy(), atol=0.02)
    again = LossSecondMomentSampler(T)
    again.load_state_dict(ours.state_dict())
    torch.testing.assert_close(again.probabilities(), ours.probabilities(), rtol=0, atol=0)


def test_the_samplers_draw_and_update_without_host_synchronisation():
    sampler = LossSecondMomentSampler(50)
    g = torch.Generator().manual_seed(0)
    with HostReads() as reads:
        for _ in range(3):
            t, w = sampler.sample(64, g, "cpu")
            sampler.update(t, torch.rand(64, generator=g))
    assert not reads.found
    assert isinstance(make_timestep_sampler("uniform", 10), UniformSampler)
    with pytest.raises(ValueError, match=r"--timestep_sampler 'importance' is not one of uniform, loss-second-moment"):
        make_timestep_sampler("importance", 10)
