"""The training loop's stages: no host synchronisation in a step, device-side skips, the order of periodic
work, the saved state, and the one-of-each definitions it relies on."""

import dataclasses
import json

import numpy as np
import pytest
from cuda_stand_in import HostReads
import torch
from common import TINY

from ddpm_hf import DDPMPipeline, DDPMScheduler, build_unet
from ddpm_hf.choices import LR_SCHEDULES, PREDICTION_TYPES
from ddpm_hf.diffusion.losses import min_snr_weight, snr, training_target
from ddpm_hf.diffusion.scheduler import PARAMETERIZATIONS, parameterization
from ddpm_hf.sampling.samplers import draw_share
from ddpm_hf.training import loop as training
from ddpm_hf.training import watch as training_watch
from ddpm_hf.outputs.run_folder import list_checkpoints
from ddpm_hf.training.checkpoints import STATE_HASH
from ddpm_hf.recipes.resolve import resolve_config
from ddpm_hf.training.loop import resume, run_step, setup
from ddpm_hf.training.state import TrainState


def host_syncs_outside_the_optimizer(fn) -> tuple:
    """(host reads outside torch.optim, inside) of `fn()`: every read CUDA would wait for (`cuda_stand_in.HostReads`:
    .item(), bool(), .tolist(), .numpy(), boolean masks, outputs sized by values)."""
    with HostReads() as reads:
        fn()
    return reads.outside_and_inside_the_optimizer()


@pytest.fixture
def run_and_state(tmp_path):
    config = resolve_config({**TINY, "output_dir": str(tmp_path), "max_train_steps": 10, "logging_steps": 5,
                             "checkpointing_steps": 100, "gradient_accumulation_steps": 2, "dropout": 0.1})
    run = setup(config)
    return run, resume(run)


def test_the_config_is_resolved_once_and_the_run_is_frozen_after_setup(run_and_state):
    """What setup learned (here: the resolution's one form) is in the config the Run holds; neither can change later."""
    run, _ = run_and_state
    assert run.config.resolution == 8 and resolve_config({**TINY, "resolution": "8x8"}).resolution == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.config.learning_rate = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.loss = None


@pytest.mark.slow
def test_a_training_step_waits_for_the_device_only_inside_the_optimizer(run_and_state):
    run, state = run_and_state
    for step in range(2):
        run_step(run, step)
    outside, inside = host_syncs_outside_the_optimizer(lambda: run_step(run, 2))
    assert outside == 0
    assert inside > 0  # the detector sees the optimizer's own reads of its CPU step counters
    # and it sees what the step used to do: a finite check read by the host, a reduced flag's .item()
    loss = torch.ones(3)
    assert host_syncs_outside_the_optimizer(lambda: bool(torch.isfinite(loss).all()) and loss.sum().item()) == (2, 0)


def test_a_step_with_a_non_finite_gradient_changes_no_weight_and_no_adam_moment(run_and_state):
    run, _ = run_and_state
    run_step(run, 0)
    before = {k: v.clone() for k, v in run.raw_unet.state_dict().items()}
    moments = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), s["step"].clone()) for s in run.optimizer.state.values()]
    finite_loss = run.loss
    run_step(dataclasses.replace(run, loss=lambda *args: finite_loss(*args) * float("nan")), 1)
    for k, v in run.raw_unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    for (m, v, n), s in zip(moments, run.optimizer.state.values()):
        assert torch.equal(m, s["exp_avg"]) and torch.equal(v, s["exp_avg_sq"]) and torch.equal(n, s["step"])
    assert run.meters.read_counters() == (1, 1, 1)
    run_step(run, 2)  # a finite step trains again and ends the run of skips
    assert not torch.equal(next(iter(run.raw_unet.state_dict().values())), next(iter(before.values())))
    assert run.meters.read_counters() == (1, 0, 1)


def test_the_checkpoint_is_written_before_the_grid(tmp_path, monkeypatch):
    """A kill during a long grid must not lose the training since the last checkpoint."""

    def killed_while_drawing(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_watch, "sample_images", killed_while_drawing)
    config = resolve_config({**TINY, "output_dir": str(tmp_path), "max_train_steps": 6, "checkpointing_steps": 3,
                             "save_images_steps": 3})
    with pytest.raises(KeyboardInterrupt):
        training.train(config)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]


def test_train_state_is_what_the_checkpoint_holds(tmp_path):
    config = resolve_config({**TINY, "output_dir": str(tmp_path), "max_train_steps": 4, "checkpointing_steps": 4})
    training.train(config)
    saved = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    files = saved.pop("files")  # the checkpoint writer's: the SHA-256 of every other file it holds
    saved.pop(STATE_HASH)  # ... and of the state itself
    assert sorted(files) == sorted(p.name for p in (tmp_path / "checkpoint-4").iterdir() if p.name != "trainer_state.json")
    state = TrainState.from_dict(saved)
    assert state.to_dict() == saved
    assert state.step == 4 and [h["step"] for h in state.history] == [1, 2, 3, 4]
    assert state.ema == {"num_updates": 4} and state.lr_scheduler["last_epoch"] == 4


# ---------------------------------------------------------------- per-timestep tables on the device


def test_add_noise_copies_no_timesteps_to_the_host():
    """On the meta device a tensor has no data: copying timesteps to the host (or a .item()) raises. The
    tables are copied to a device once and kept."""
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x = torch.empty(4, 3, 8, 8, device="meta")
    t = torch.empty(4, dtype=torch.long, device="meta")
    assert scheduler.add_noise(x, x, t).device.type == "meta"
    assert scheduler.get_velocity(x, x, t).shape == x.shape
    assert training_target(scheduler, x, x, t).device.type == "meta"
    assert min_snr_weight(snr(scheduler, t, x), 5.0, "v_prediction").shape == (4,)
    assert scheduler.tables("meta") is scheduler.tables("meta")
    assert scheduler.tables("meta").alphas_cumprod.device.type == "meta"
    with pytest.raises(NotImplementedError, match="meta"):  # what the old per-call index copy did
        torch.as_tensor(t, device="cpu")


def test_tables_are_float64_closed_forms():
    s = DDPMScheduler()
    tab = s.tables()
    betas = np.linspace(1e-4, 0.02, 1000)
    ab = np.cumprod(1 - betas)
    assert tab.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(tab.alphas_cumprod.numpy(), ab, rtol=1e-14)
    np.testing.assert_allclose(tab.snr.numpy(), ab / (1 - ab), rtol=1e-12)
    for t in (1, 10, 999):
        c0, ct, var, _ = s.posterior_coefficients(t)
        assert tab.posterior_mean_coef1[t].item() == pytest.approx(c0, rel=1e-12)
        assert tab.posterior_mean_coef2[t].item() == pytest.approx(ct, rel=1e-12)
        assert tab.posterior_variance[t].item() == pytest.approx(var, rel=1e-12)
    assert tab.posterior_log_variance_clipped[0] == tab.posterior_log_variance_clipped[1]
    assert tab.log_betas_clipped[0] == tab.posterior_log_variance_clipped[1]


# ---------------------------------------------------------------- one of each


def test_every_prediction_type_has_one_parameterization_whose_x0_inverts_its_target():
    assert tuple(PARAMETERIZATIONS) == PREDICTION_TYPES
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64).reshape(-1, 1, 1, 1)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = a * x0 + s * eps
    for name in PREDICTION_TYPES:
        p = parameterization(name)
        torch.testing.assert_close(p.x0(p.target(x0, eps, a, s), x_t, a, s), x0, rtol=0, atol=1e-12)
        # the MSE on the target is snr_factor · the MSE on x_0 (for the x̂_0 the output implies)
        out = p.target(x0, eps, a, s) + 0.01
        snr_t = ab / (1 - ab)
        torch.testing.assert_close(((out - p.target(x0, eps, a, s)) ** 2),
                                   p.snr_factor(snr_t) * (p.x0(out, x_t, a, s) - x0) ** 2, rtol=1e-9, atol=1e-15)
    with pytest.raises(ValueError, match=r"prediction_type='x0' is not one of 'epsilon', 'sample', 'v_prediction'"):
        parameterization("x0")


def test_every_lr_schedule_choice_is_one_diffusers_builds():
    """Each name builds the schedule it names: the learning rate at each step against its closed form (warmup w = 2 of
    T = 10 steps, then constant, linear or half a cosine down to 0; diffusers' polynomial: power 1 to lr_end 1e-7)."""
    import math

    from diffusers.optimization import get_scheduler

    w, T = 2, 10

    def warm(s, after):
        return s / w if s < w else after((s - w) / (T - w))

    closed = {
        "constant": lambda s: 1.0,
        "constant_with_warmup": lambda s: warm(s, lambda p: 1.0),
        "linear": lambda s: warm(s, lambda p: 1 - p),
        "cosine": lambda s: warm(s, lambda p: 0.5 * (1 + math.cos(math.pi * p))),
        "cosine_with_restarts": lambda s: warm(s, lambda p: 0.5 * (1 + math.cos(math.pi * p)) if p < 1 else 0.0),
        "polynomial": lambda s: warm(s, lambda p: (1 - 1e-7) * (1 - p) + 1e-7),
    }
    assert sorted(closed) == sorted(LR_SCHEDULES)
    for name in LR_SCHEDULES:
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = get_scheduler(name, optimizer, num_warmup_steps=w, num_training_steps=T)
        rates = []
        for _ in range(T):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        assert rates == pytest.approx([closed[name](s) for s in range(T)], abs=1e-9), name


def test_draw_share_splits_images_over_processes_with_the_same_image_per_seed():
    torch.manual_seed(0)
    pipe = DDPMPipeline(build_unet("cpu-tiny", sample_size=8), DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=3, output_type="pt")
    one = {k: img for ks, imgs in draw_share(pipe, 5, lambda k: 100 + k, batch_size=5, **call) for k, img in zip(ks, imgs)}
    shares = [{k: img for ks, imgs in draw_share(pipe, 5, lambda k: 100 + k, rank, 2, batch_size=2, **call)
               for k, img in zip(ks, imgs)} for rank in (0, 1)]
    assert sorted(shares[0]) == [0, 2, 4] and sorted(shares[1]) == [1, 3]
    for share in shares:
        for k, img in share.items():
            torch.testing.assert_close(img, one[k], atol=1e-5, rtol=0)
    skipped = [k for ks, _ in draw_share(pipe, 5, lambda k: 100 + k, 0, 2, batch_size=2, skip={2}, **call) for k in ks]
    assert skipped == [0, 4]


def test_the_hub_pipeline_file_knows_the_learned_variance_types_of_the_library():
    """pipelines/pipeline_ddpm.py also runs on the Hub without ddpm_hf, so it keeps its own copy of the list."""
    from ddpm_hf.pipelines import pipeline_ddpm

    from ddpm_hf.choices import LEARNED_VARIANCE_TYPES

    assert pipeline_ddpm.LEARNED_VARIANCE_TYPES == LEARNED_VARIANCE_TYPES


@pytest.mark.slow
def test_deterministic_turns_on_torchs_deterministic_kernels_for_the_run_only(tmp_path, monkeypatch):
    seen = []
    device_step = training.device_step

    def recording(run, batches, ema_weight=None, labels=None, power_weights=None):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
        device_step(run, batches, ema_weight, labels, power_weights)

    monkeypatch.setattr(training, "device_step", recording)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    settings = {**TINY, "max_train_steps": 2, "checkpointing_steps": 2}
    training.train(resolve_config({**settings, "output_dir": str(tmp_path / "a"), "deterministic": True}))
    assert seen == [(True, False)] * 2
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark is True
    seen.clear()
    training.train(resolve_config({**settings, "output_dir": str(tmp_path / "b")}))
    assert seen == [(False, True)] * 2
