
import pytest
import torch

from ddpm_hf import DDPMScheduler
from ddpm_hf.diffusion.ema import EMA
from ddpm_hf.diffusion.losses import diffusion_loss, min_snr_weight, snr, training_target


def test_targets_per_prediction_type():
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([5, 500, 900])
    assert torch.equal(training_target(DDPMScheduler(), x0, noise, t), noise)
    assert torch.equal(training_target(DDPMScheduler(prediction_type="sample"), x0, noise, t), x0)
    v = training_target(DDPMScheduler(prediction_type="v_prediction"), x0, noise, t)
    ab = DDPMScheduler().tables().alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0)


def test_loss_is_per_sample_mse():
    out, target = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    target[1] *= 2
    assert diffusion_loss(out, target).tolist() == [1.0, 4.0]
    assert diffusion_loss(out, target, torch.tensor([0.5, 0.25])).tolist() == [0.5, 1.0]


def test_min_snr_weights_closed_form():
    s = DDPMScheduler()
    t = torch.tensor([0, 100, 999])
    snr_t = snr(s, t, torch.zeros(1))
    ab = s.tables().alphas_cumprod[t]
    torch.testing.assert_close(snr_t.double(), ab / (1 - ab), rtol=1e-6, atol=0)
    gamma = 5.0
    eps_w = min_snr_weight(snr_t, gamma, "epsilon")
    assert eps_w[0] == pytest.approx(gamma / snr_t[0].item(), rel=1e-6)  # high SNR: down-weighted
    assert eps_w[2] == pytest.approx(1.0)  # low SNR: unchanged
    torch.testing.assert_close(min_snr_weight(snr_t, gamma, "v_prediction"), torch.clamp(snr_t, max=gamma) / (snr_t + 1))
    torch.testing.assert_close(min_snr_weight(snr_t, gamma, "sample"), torch.clamp(snr_t, max=gamma))
    with pytest.raises(ValueError, match="prediction_type='x0'"):
        min_snr_weight(snr_t, gamma, "x0")


def test_ema_constant_decay_closed_form():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(5):
        ema.update(model.parameters())
    # θ_ema = 1 - 0.9^5 after five updates towards 1 from 0
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 1 - 0.9**5))
    assert not ema.model.weight.requires_grad


def test_ema_warmup_and_update_after_step():
    model = torch.nn.Linear(1, 1)
    ema = EMA(model, decay=0.999, warmup=True, inv_gamma=1.0, power=0.75, update_after_step=2)
    decays = []
    for _ in range(6):
        decays.append(ema.current_decay())
        ema.update(model.parameters())
    assert decays[:2] == [0.0, 0.0]  # copies until update_after_step
    assert decays[2] == pytest.approx(1 - 2 ** -0.75)
    assert decays[3] == pytest.approx(1 - 3 ** -0.75)
    assert all(a < b for a, b in zip(decays[2:], decays[3:]))
    with pytest.raises(ValueError, match=r"ema decay=1.0 must be in \[0, 1\)"):
        EMA(model, decay=1.0)
