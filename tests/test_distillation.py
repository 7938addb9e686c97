"""Progressive distillation's math (#48), against oracles: the grid against diffusers' DDIM, the target against the
teacher's two DDIM steps written out in float64 from the paper's Algorithm 2, and a student that matches its target
landing, in one of diffusers' own DDIM steps, where the teacher's two land."""

import diffusers
import numpy as np
import pytest
import torch

from ddpm_hf import DDPMScheduler
from ddpm_hf.diffusion.distillation import (
    Coefficients,
    DistillationLoss,
    grid,
    rounds,
    steps_problem,
    student_scheduler_config,
    target,
)

T = 1000


def teacher_eps(z, tau):
    """A fixed smooth 'teacher' ε̂(z, τ) in float64 (no network: the math is what is checked)."""
    return torch.tanh(0.7 * z + 0.2) * (1 + 0.3 * tau.double().view(-1, *[1] * (z.dim() - 1)) / T)


def by_hand(z, j, N, alphas_cumprod):
    """Algorithm 2, lines 5-9, written out in float64 for one sample: the N-grid's step j, the teacher's two DDIM
    steps through the 2N-grid's midpoint, and x̃."""
    ab = np.append(alphas_cumprod, 1.0)  # index -1: the clean image

    def tau(k, n):
        return T - 1 - int(round(k * T / n))

    t, t1, t2 = tau(j, N), tau(2 * j + 1, 2 * N), tau(j + 1, N)
    a, s = np.sqrt(ab[t]), np.sqrt(1 - ab[t])
    a1, s1 = np.sqrt(ab[t1]), np.sqrt(1 - ab[t1])
    a2, s2 = np.sqrt(ab[t2]), np.sqrt(max(1 - ab[t2], 0.0))
    x = (z - s * teacher_eps(torch.tensor(z)[None], torch.tensor([t]))[0].numpy()) / a
    z1 = a1 * x + s1 / s * (z - a * x)
    x1 = (z1 - s1 * teacher_eps(torch.tensor(z1)[None], torch.tensor([t1]))[0].numpy()) / a1
    z2 = a2 * x1 + s2 / s1 * (z1 - a1 * x1)
    return (z2 - s2 / s * z) / (a2 - s2 / s * a), z2


def eps_teacher_x0(z, tau, a, s):
    return (z - s * teacher_eps(z, tau)) / a


@pytest.mark.parametrize("N", [1, 2, 4, 8, 16, 64, 256])
def test_each_grid_point_of_n_steps_is_every_other_point_of_2n(N):
    coarse, fine = grid(N, T), grid(2 * N, T)
    assert coarse == fine[::2] and coarse[0] == T - 1 and coarse[-1] == -1 and len(set(fine)) == len(fine)


@pytest.mark.parametrize("N", [1, 2, 4, 5, 8, 10, 25])
def test_the_saved_students_scheduler_gives_its_grid_in_plain_diffusers(N):
    config = student_scheduler_config(dict(DDPMScheduler().config), N, "v_prediction")
    theirs = diffusers.DDIMScheduler.from_config(config)
    theirs.set_timesteps(N)
    assert theirs.timesteps.tolist() == grid(N, T)[:-1]
    # each step goes to the next grid point, the last to ᾱ = 1 (the clean image)
    assert [int(t) - T // N for t in theirs.timesteps] == grid(N, T)[1:] and theirs.final_alpha_cumprod == 1.0


@pytest.mark.parametrize("N", [1, 2, 4])
def test_the_target_is_algorithm_2_written_out_in_float64(N):
    scheduler = DDPMScheduler()
    alphas_cumprod = scheduler.tables().alphas_cumprod.double().numpy()
    z = torch.randn(N, 2, 3, 3, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    loss = DistillationLoss(eps_teacher_x0, scheduler.tables().alphas_cumprod, N, "v_prediction")
    j = torch.arange(N)
    ours = target(eps_teacher_x0, z, *loss.timesteps(j), Coefficients(scheduler.tables().alphas_cumprod))
    for k in range(N):
        expected, _ = by_hand(z[k].numpy(), k, N, alphas_cumprod)
        np.testing.assert_allclose(ours[k].numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("N", [1, 2, 4, 5, 50])
def test_a_student_matching_its_target_lands_in_one_diffusers_ddim_step_where_the_teacher_lands_in_two(N, clip):
    """The teacher's two steps by diffusers' DDIM at 2N steps (ε-prediction, its x̂ clipped to [-1, 1] as its own
    scheduler would, or unclipped); the student's one step by diffusers' DDIM at N steps, given x̃ as its
    x-prediction: the same z_t''. (Where 2N divides T: diffusers' DDIM steps by T // 2N, which is the grid's own step
    only there.) A clipped teacher's x̃ lies within the clip, as the two x̂ it lies between do."""
    from ddpm_hf.diffusion.distillation import network_x0

    config = student_scheduler_config(dict(DDPMScheduler().config), 2 * N, "epsilon")
    clipping = {"clip_sample": clip is not None, "clip_sample_range": clip or 1.0}
    teacher = diffusers.DDIMScheduler.from_config({**config, **clipping})
    student = diffusers.DDIMScheduler.from_config({**config, "clip_sample": False, "prediction_type": "sample"})
    teacher.set_timesteps(2 * N)
    student.set_timesteps(N)
    # the schedulers' own float32 ᾱ, so that both sides use the same table
    coefficients = Coefficients(teacher.alphas_cumprod)
    x0_hat = network_x0(None, "epsilon", 2, forward=teacher_eps, clip=clip)  # as a round runs its teacher
    loss = DistillationLoss(x0_hat, teacher.alphas_cumprod, N, "sample")
    for j in range(N):
        z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(j))
        t, t_mid, t_end = loss.timesteps(torch.tensor([j]))
        assert int(teacher.timesteps[2 * j]) == int(t) and int(teacher.timesteps[2 * j + 1]) == int(t_mid)
        # ε re-derived from the clipped x̂, as ddpm_hf's pipeline steps a DDIM that clips (no-op where none does)
        z1 = teacher.step(teacher_eps(z, t).float(), int(t), z, use_clipped_model_output=True).prev_sample
        z2 = teacher.step(teacher_eps(z1, t_mid).float(), int(t_mid), z1, use_clipped_model_output=True).prev_sample
        x_tilde = target(x0_hat, z, t, t_mid, t_end, coefficients)
        one = student.step(x_tilde.float(), int(t), z).prev_sample
        torch.testing.assert_close(one, z2, rtol=1e-4, atol=1e-5)
        if clip is not None:
            assert x_tilde.abs().max() <= clip + 1e-9
    # the pure-noise end: an ε-teacher's unclipped x̂ is far outside the data's range, so the clip is what is tested
    a, s = coefficients(torch.tensor([T - 1]), z)
    assert eps_teacher_x0(z.double(), torch.tensor([T - 1]), a, s).abs().max() > 10


def test_the_loss_is_zero_on_the_target_and_the_weighted_error_elsewhere():
    scheduler = DDPMScheduler()
    ab = scheduler.tables().alphas_cumprod
    N = 4
    loss = DistillationLoss(eps_teacher_x0, ab, N, "v_prediction", "truncated-snr")
    x0 = torch.rand(N, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(N, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    j = torch.arange(N)
    t, t_mid, t_end = loss.timesteps(j)
    a, s = Coefficients(ab)(t, x0)
    z = (a * x0.double() + s * noise.double()).float()
    x_tilde = target(eps_teacher_x0, z, t, t_mid, t_end, Coefficients(ab))
    v_exact = (a * z.double() - x_tilde) / s  # x̂ = a z - s v (v-prediction) gives x̃
    assert loss(lambda zz, tt: v_exact.float(), x0, noise, j).abs().max() < 1e-6
    off = v_exact + 0.01
    expected = torch.clamp((a / s).flatten() ** 2, min=1.0) * ((s * 0.01) ** 2).flatten()  # x̂ moves by s·0.01
    torch.testing.assert_close(loss(lambda zz, tt: off.float(), x0, noise, j).double(), expected, rtol=1e-3, atol=1e-9)
    snr_plus_one = DistillationLoss(eps_teacher_x0, ab, N, "v_prediction", "snr+1")
    torch.testing.assert_close(snr_plus_one(lambda zz, tt: off.float(), x0, noise, j).double(),
                               ((a / s).flatten() ** 2 + 1) * ((s * 0.01) ** 2).flatten(), rtol=1e-3, atol=1e-9)


def test_an_epsilon_student_and_an_unknown_weighting_are_refused_by_name():
    ab = DDPMScheduler().tables().alphas_cumprod
    with pytest.raises(ValueError, match=r"a student predicts one of v_prediction, sample, not 'epsilon'"):
        DistillationLoss(eps_teacher_x0, ab, 4, "epsilon")
    with pytest.raises(ValueError, match=r"--distill_weighting 'snr' is not one of truncated-snr, snr\+1"):
        DistillationLoss(eps_teacher_x0, ab, 4, "v_prediction", "snr")


@pytest.mark.parametrize("from_steps, to_steps, said", [
    (512, 4, None),
    (12, 4, r"is not --to_steps 4 times a power of two"),
    (4, 4, r"must be more than --to_steps 4"),
    (2048, 4, r"more than the teacher's 1000 training timesteps: its grid would repeat timesteps; choose at most 512"),
    (48, 3, r"--to_steps 3 does not divide the teacher's 1000 training timesteps"),
])
def test_step_counts_that_cannot_be_distilled_are_named(from_steps, to_steps, said):
    problem = steps_problem(from_steps, to_steps, T)
    if said is None:
        assert problem is None and rounds(from_steps, to_steps) == [256, 128, 64, 32, 16, 8, 4]
    else:
        assert problem is not None and __import__("re").search(said, problem), problem


# ---------------------------------------------------------------- a round: the training loop with the teacher's target


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny ε-prediction teacher (cpu-tiny, 8x8, one channel, T = 1000), saved as a pipeline."""
    from ddpm_hf import DDPMPipeline, build_unet

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("teacher")
    DDPMPipeline(build_unet("cpu-tiny", sample_size=8, in_channels=1, out_channels=1), DDPMScheduler()).save_pretrained(folder)
    return folder


def round_config(out, teacher, **overrides):
    from common import tiny_config

    return tiny_config(out, distill_teacher=str(teacher), distill_steps=2, prediction_type="v_prediction",
                       init_from=str(teacher), ema_decay=0.0, ema_warmup=False, dropout=0.0, lr_scheduler="linear",
                       lr_warmup_steps=0, learning_rate=1e-4, max_train_steps=4, checkpointing_steps=2,
                       card_figures=False, **overrides)


@pytest.mark.slow
def test_a_rounds_student_is_a_pipeline_plain_diffusers_samples_at_its_steps_as_ddpm_hf_does(teacher, tmp_path):
    from ddpm_hf import DDPMPipeline
    from ddpm_hf.training.loop import train

    out = tmp_path / "round-2"
    train(round_config(out, teacher))
    plain = diffusers.DDPMPipeline.from_pretrained(out)
    assert type(plain.scheduler) is diffusers.DDIMScheduler
    assert plain.scheduler.config.prediction_type == "v_prediction"
    plain.scheduler.set_timesteps(2)
    assert plain.scheduler.timesteps.tolist() == grid(2, T)[:-1]
    theirs = plain(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np").images
    ours_pipe = DDPMPipeline.from_pretrained(out)
    ours_pipe.set_progress_bar_config(disable=True)
    ours = ours_pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # the student moved from its teacher (it started from the teacher's weights)
    from safetensors.torch import load_file

    start = DDPMPipeline.from_pretrained(teacher).unet.state_dict()
    trained = load_file(str(out / "checkpoint-4" / "unet.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)


@pytest.mark.slow
def test_a_round_resumes_mid_round_bit_for_bit(teacher, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from ddpm_hf.training.loop import train

    train(round_config(tmp_path / "a", teacher))
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    train(round_config(tmp_path / "b", teacher, resume_from_checkpoint="latest"))
    a, b = (load_file(str(tmp_path / x / "checkpoint-4" / "unet.safetensors")) for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_round_step_trains_on_the_students_grid_and_the_teachers_target(teacher, tmp_path, monkeypatch):
    """The loss the step computes is DistillationLoss of the teacher (its own ε-prediction), at the student's step j."""
    from ddpm_hf.diffusion.distillation import DistillationLoss
    from ddpm_hf.training.loop import resume, setup

    run = setup(round_config(tmp_path / "r", teacher))
    resume(run)
    assert isinstance(run.loss, DistillationLoss) and run.loss.num_steps == 2
    draws = torch.cat([run.t_sampler.sample(64, torch.Generator().manual_seed(0), "cpu")[0] for _ in range(4)])
    assert set(draws.tolist()) == {0, 1}  # the student's two steps
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    noise = torch.randn(2, 1, 8, 8)
    j = torch.tensor([0, 1])
    from ddpm_hf import DDPMPipeline

    teacher_unet = DDPMPipeline.from_pretrained(teacher).unet.eval()
    assert DDPMPipeline.from_pretrained(teacher).scheduler.config.clip_sample  # so its x̂ is clipped to [-1, 1]

    def teacher_x0(c):
        return lambda z, tau, a, s: ((z - s * teacher_unet(z.float(), tau).sample.double()) / a).clamp(-c, c)

    by_hand, unclipped = (DistillationLoss(teacher_x0(c), DDPMScheduler().tables().alphas_cumprod, 2, "v_prediction")
                          for c in (1.0, float("inf")))
    student = run.raw_unet.eval()
    with torch.no_grad():
        got = run.loss(lambda z, t: student(z, t).sample, x0, noise, j)
        expected = by_hand(lambda z, t: student(z, t).sample, x0, noise, j)
        not_expected = unclipped(lambda z, t: student(z, t).sample, x0, noise, j)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, not_expected, rtol=1e-2)


@pytest.fixture(scope="module")
def conditional_teacher(tmp_path_factory):
    """A tiny class-conditional teacher of the ten digits (ε-prediction, 8x8, T = 1000): one training step of TINY."""
    from common import tiny_config

    from ddpm_hf.training.loop import train

    out = tmp_path_factory.mktemp("conditional-teacher") / "run"
    return train(tiny_config(out, class_conditional=True, max_train_steps=1, checkpointing_steps=1, card_figures=False))


@pytest.mark.slow
@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_a_conditional_teachers_target_is_its_two_ddim_steps_guided_at_w(conditional_teacher, tmp_path, w):
    """Oracle: the teacher's conditional and unconditional passes run apart and combined by hand (Ho & Salimans 2021,
    Eq. 6: ε(∅) + w·(ε(c) - ε(∅))), then DistillationLoss on that; the round's loss must equal it, given the labels."""
    import functools

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.training.loop import resume, setup

    run = setup(round_config(tmp_path / "r", conditional_teacher, class_conditional=True, distill_guidance_scale=w,
                             label_dropout=0.0))
    resume(run)
    teacher_pipe = DDPMPipeline.from_pretrained(conditional_teacher)
    teacher_unet = teacher_pipe.unet.eval()
    assert teacher_pipe.scheduler.config.clip_sample and teacher_pipe.scheduler.config.clip_sample_range == 1.0
    null = teacher_unet.config.num_class_embeds - 1

    def guided_x0(scale):
        def x0(z, tau, a, s, labels):
            e_c = teacher_unet(z.float(), tau, class_labels=labels).sample.double()
            e_u = teacher_unet(z.float(), tau, class_labels=torch.full_like(labels, null)).sample.double()
            return ((z - s * (e_u + scale * (e_c - e_u))) / a).clamp(-1, 1)  # as the teacher's scheduler clips
        return x0

    x0 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    j, labels = torch.tensor([0, 1, 0, 1]), torch.tensor([3, 3, 7, 9])
    student = run.raw_unet.eval()
    model = functools.partial(lambda z, t, labels: student(z, t, class_labels=labels).sample, labels=labels)
    with torch.no_grad():
        got = run.loss(model, x0, noise, j)
        expected = {scale: DistillationLoss(guided_x0(scale), DDPMScheduler().tables().alphas_cumprod, 2,
                                            "v_prediction")(model, x0, noise, j) for scale in {w, 2.0}}
    torch.testing.assert_close(got, expected[w], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, expected[2.0], rtol=1e-3)  # the scale matters


@pytest.mark.slow
def test_ddpm_distill_distills_a_conditional_teacher_at_its_guidance_into_a_student_of_one_pass_a_step(
        conditional_teacher, tmp_path):
    import json
    import sys

    from common import run_in_process

    from ddpm_hf import DDPMPipeline

    out = tmp_path / "distilled"
    proc = run_in_process(distill_cli(conditional_teacher, out, "--to_steps", 1, "--from_steps", 2, "--steps_per_round",
                                      2, "--guidance_scale", 3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "round-1" / "training_config.json").read_text())
    assert (config["class_conditional"], config["distill_guidance_scale"], config["label_dropout"]) == (True, 3.0, 0.0)
    student = DDPMPipeline.from_pretrained(out)
    assert student.class_names == DDPMPipeline.from_pretrained(conditional_teacher).class_names
    calls = []
    student.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    student.set_progress_bar_config(disable=True)
    images = student(batch_size=2, class_labels=[4, 5], num_inference_steps=1, seeds=[0, 1], output_type="np").images
    assert images.shape == (2, 8, 8, 1) and calls == [2]  # one step, one pass of the batch: no guidance doubling
    assert diffusers.DDPMPipeline.from_pretrained(out).unet.config.num_class_embeds == 11
    drawn = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", out, tmp_path / "drawn", "--num_images", 2,
                            "--class_labels", "balanced"])
    assert drawn.returncode == 0, drawn.stderr[-3000:]
    assert json.loads((tmp_path / "drawn" / "sampling.json").read_text())["num_inference_steps"] == 1


# ---------------------------------------------------------------- ddpm-distill: the rounds


def distill_cli(teacher, out, *more, data=True):
    import sys

    from common import TINY, cli_args

    from ddpm_hf.recipes.config import DISTILLATION_SETS

    flags = {k: v for k, v in TINY.items() if k not in DISTILLATION_SETS and k not in ("dropout", "ema_decay", "ema_warmup",
                                                                                      "learning_rate", "lr_scheduler", "lr_warmup_steps")}
    if not data:  # --teacher_samples draws it
        flags.pop("dataset")
    return [sys.executable, "-m", "ddpm_hf.commands.distill", teacher, out, *cli_args(flags), "--checkpointing_steps", "2",
            *map(str, more)]


def assert_drawn_by_the_teachers_ddim(teacher, samples, count: int, steps: int) -> None:
    """samples/ holds `count` images, image k as the teacher's DDIM (trailing, `steps` steps) draws it from seed k."""
    from PIL import Image

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.sampling.samplers import use_scheduler, with_spacing

    assert sorted(p.name for p in samples.glob("*.png")) == [f"{k:06d}-seed{k}.png" for k in range(count)]
    by_ddim = with_spacing(use_scheduler(DDPMPipeline.from_pretrained(teacher), "ddim"), "trailing")
    by_ddim.set_progress_bar_config(disable=True)
    images = by_ddim(batch_size=count, seeds=list(range(count)), num_inference_steps=steps, output_type="np").images
    for k in range(count):
        saved = np.asarray(Image.open(samples / f"{k:06d}-seed{k}.png"), dtype=np.float64) / 255
        np.testing.assert_allclose(saved, images[k, ..., 0], atol=1 / 255 + 1e-6)


@pytest.mark.slow
def test_ddpm_distill_runs_its_rounds_and_leaves_the_last_student_on_top_for_plain_diffusers(teacher, tmp_path):
    import json
    import os
    import sys

    from common import run_in_process

    out = tmp_path / "distilled"
    proc = run_in_process(distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 4, "--steps_per_round", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "distill.json").read_text())
    assert (record["rounds"], record["complete"], record["from_steps"], record["to_steps"]) == ([2, 1], True, 4, 1)
    for steps, teacher_of_round in ((2, str(teacher)), (1, str(out / "round-2"))):
        config = json.loads((out / f"round-{steps}" / "training_config.json").read_text())
        assert (config["distill_steps"], config["distill_teacher"], config["prediction_type"]) == \
            (steps, teacher_of_round, "v_prediction")
        assert (config["learning_rate"], config["lr_scheduler"], config["ema_decay"]) == (5e-5, "linear", 0.0)
    plain = diffusers.DDPMPipeline.from_pretrained(out)
    assert type(plain.scheduler) is diffusers.DDIMScheduler
    plain.scheduler.set_timesteps(1)
    assert plain.scheduler.timesteps.tolist() == [999]
    top = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").state_dict()
    last = diffusers.UNet2DModel.from_pretrained(out / "round-1", subfolder="unet").state_dict()
    assert all(torch.equal(top[k], last[k]) for k in top)
    # a rerun has nothing left to train: every round is kept as it was
    stamps = {p: os.stat(p).st_mtime_ns for p in out.glob("round-*/checkpoint-*/unet.safetensors")}
    again = run_in_process(distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 4, "--steps_per_round", 2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps
    # ddpm-sample draws each student at the steps it was made for unless told otherwise; any other pipeline at 1000
    from ddpm_hf.outputs.run_folder import distilled_steps

    for folder, steps in ((out, 1), (out / "round-2", 2)):
        drawn = run_in_process([sys.executable, "-m", "ddpm_hf.commands.sample", folder, tmp_path / f"drawn-{steps}",
                                "--num_images", 1])
        assert drawn.returncode == 0, drawn.stderr[-3000:]
        assert json.loads((tmp_path / f"drawn-{steps}" / "sampling.json").read_text())["num_inference_steps"] == steps
    assert distilled_steps(teacher) is None and distilled_steps(tmp_path / "nowhere") is None
    # the card: the student's grid beside its teacher's DDIM grid at the same steps (image i from seed i), and the cost
    from PIL import Image

    from ddpm_hf import DDPMPipeline
    from ddpm_hf.outputs.plots import image_grid
    from ddpm_hf.outputs.run_folder import card_is_ours

    card = (out / "README.md").read_text()
    assert card_is_ours(out / "README.md") and f"A 1-step student of `{teacher}`" in card
    assert ("| ![the student at 1 step](student_samples.png) | ![its teacher by DDIM at 1 step](teacher_ddim_samples.png) |"
            in card)
    by_ddim = diffusers.DDPMPipeline.from_pretrained(teacher)  # its own DDIM (it clips), on the student's grid
    by_ddim.scheduler = diffusers.DDIMScheduler.from_config(by_ddim.scheduler.config, timestep_spacing="trailing")
    assert by_ddim.scheduler.config.clip_sample and by_ddim.scheduler.config.set_alpha_to_one
    pairs = ((DDPMPipeline.from_pretrained(out), "student_samples.png"),
             (DDPMPipeline(by_ddim.unet, by_ddim.scheduler), "teacher_ddim_samples.png"))
    for pipe, picture in pairs:
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=16, seeds=list(range(16)), num_inference_steps=1, output_type="pt").images
        assert np.array_equal(np.asarray(Image.open(out / picture)), np.asarray(image_grid(images))), picture
    for steps in (2, 1):
        seconds = json.loads((out / f"round-{steps}" / "train_summary.json").read_text())["training_seconds"]
        assert seconds < 60 and f"| {steps} | 2 | {int(round(seconds))} s |" in card  # the round's own summary
    assert "## What it cost" in card and "of training steps" in card


@pytest.mark.slow
def test_edit_visualize_and_evaluate_draw_a_distilled_student_at_its_own_steps_unless_told(teacher, tmp_path,
                                                                                           quick_frechet):
    """A student learned only its grid's timesteps: every command that draws from a pipeline takes a distilled one at
    the steps it was made for, as ddpm-sample does, and at --num_inference_steps where given."""
    import json
    import sys

    from common import one_error_line, run_in_process
    from PIL import Image
    from test_evaluate_command import StandInInception

    out = tmp_path / "distilled"
    assert run_in_process(distill_cli(teacher, out, "--to_steps", 2, "--from_steps", 4, "--steps_per_round", 2)).returncode == 0
    (tmp_path / "inputs").mkdir()
    for k in range(2):
        Image.new("L", (8, 8), 60 + 100 * k).save(tmp_path / "inputs" / f"{k}.png")
    for more, steps in (([], 2), (["--num_inference_steps", 4], 4)):
        edited = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", out, tmp_path / "inputs",
                                 tmp_path / f"edited-{steps}", "--strength", 0.5, *more])
        assert edited.returncode == 0, edited.stderr[-3000:]
        assert json.loads((tmp_path / f"edited-{steps}" / "edit.json").read_text())["num_inference_steps"] == steps
        shown = run_in_process([sys.executable, "-m", "ddpm_hf.commands.visualize", out, tmp_path / f"figures-{steps}",
                                "--figures", "progressive", "--seeds", 0, 1, *more])
        assert shown.returncode == 0, shown.stderr[-3000:]
        figures = json.loads((tmp_path / f"figures-{steps}" / "figures.json").read_text())
        assert [entry["num_inference_steps"] for entry in figures.values()] == [steps]
    # SDEdit that runs none of the student's steps is refused with what fits it (not more steps: it never learned them)
    refused = run_in_process([sys.executable, "-m", "ddpm_hf.commands.edit", out, tmp_path / "inputs",
                              tmp_path / "edited-none", "--strength", 0.2])
    assert ("--strength 0.2 runs none of the 2 DDIM step(s)" in one_error_line(refused)
            and "give a --strength above 0.25, or edit with its teacher" in one_error_line(refused))
    assert not (tmp_path / "edited-none").exists()
    torch.jit.script(StandInInception()).save(str(tmp_path / "stand-in.pt"))
    evaluated = run_in_process([sys.executable, "-m", "ddpm_hf.commands.evaluate", out, tmp_path / "eval",
                                "--num_images", 10, "--modes", "clean", "--nll_images", 0, "--reference", "digits",
                                "--reference_split", "test", "--inception_weights", tmp_path / "stand-in.pt",
                                "--cache_dir", tmp_path / "cache", "--fid_se_rounds", 0])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    drawn = [json.loads(p.read_text()) for p in (tmp_path / "eval").rglob("sampling.json")]
    assert [record["num_inference_steps"] for record in drawn] == [2]


@pytest.mark.slow
def test_a_signal_in_a_round_leaves_its_checkpoint_and_says_to_rerun_ddpm_distill_which_carries_on(teacher, tmp_path,
                                                                                                  monkeypatch):
    import json
    import signal

    from common import run_in_process

    from ddpm_hf.training import loop

    out = tmp_path / "distilled"
    args = distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 4, "--steps_per_round", 2)
    # the stop flag as the loop reads it after a step: raised after the first step of the first round
    monkeypatch.setattr(loop, "stop_requested", lambda run, step, signals: signal.SIGUSR1 if step == 1 else None)
    stopped = run_in_process(args)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"stopped: SIGUSR1 received: stopped after step 1 of 2 with {out / 'round-2' / 'checkpoint-1'} written; resume "
        f"with the same `ddpm-distill ... {out}` command (it carries on with round-2 from that checkpoint).")
    assert json.loads((out / "distill.json").read_text())["rounds"] == []
    monkeypatch.undo()
    again = run_in_process(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resumed from {out / 'round-2' / 'checkpoint-1'} at step 1." in again.stderr
    assert json.loads((out / "distill.json").read_text())["rounds"] == [2, 1]


@pytest.mark.slow
def test_two_processes_share_the_teacher_samples_and_train_every_round_together(teacher, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): each teacher sample is drawn once, by one process, as one process
    draws it (seed k for image k); each round trains with the batch split over both; the rounds end, and the command
    says so, once (a training run ending inside the rounds left the processes' group in place)."""
    import json
    import subprocess

    from common import launch_two

    out = tmp_path / "distilled"
    cli = distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 4, "--steps_per_round", 2, "--teacher_samples", 8,
                      "--batch_size", 4, data=False)
    proc = subprocess.run(launch_two(*cli[1:]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "distill.json").read_text())
    assert (record["rounds"], record["complete"]) == ([2, 1], True)
    assert_drawn_by_the_teachers_ddim(teacher, out / "teacher-samples", 8, 4)
    for steps in (2, 1):
        summary = json.loads((out / f"round-{steps}" / "train_summary.json").read_text())
        assert (summary["hardware"]["processes"], summary["steps"], summary["images_seen"]) == (2, 2, 2 * 4)
    # --batch_size is the global batch, as training's: each round splits it over the processes, its line said once
    assert proc.stderr.count("Training 2 steps of 4 images (2 per process x 2 processes x 1 accumulation)") == 2
    assert proc.stdout.count("to 1 DDIM steps:") == 1  # the closing line once, not once per process


@pytest.mark.parametrize("more, said", [
    (["--to_steps", 3], r"--to_steps 3 does not divide the teacher's 1000 training timesteps"),
    (["--to_steps", 4, "--from_steps", 12], r"--from_steps 12 is not --to_steps 4 times a power of two"),
    (["--to_steps", 4, "--steps_per_round", 0], r"--steps_per_round 0 must be at least 1"),
    (["--to_steps", 4, "--max_train_steps", 5], r"--max_train_steps is set by ddpm-distill for each round: use "
                                                 r"--steps_per_round instead"),
    (["--to_steps", 4, "--resolution", 16], r"--resolution is set by ddpm-distill for each round: use the teacher"),
    (["--to_steps", 4, "--guidance_scale", 2], r"--guidance_scale 2.0 guides a class-conditional teacher, and .* is "
                                               r"unconditional; drop it"),
    (["--to_steps", 4, "--guidance_scale", "nan"], r"--guidance_scale nan: give a scale from 0 to 100"),
    (["--to_steps", 4, "--class_conditional"], r"--class_conditional is set by ddpm-distill for each round: use the "
                                               r"teacher \(a class-conditional teacher makes class-conditional rounds\)"),
])
def test_ddpm_distill_refuses_what_cannot_be_distilled_in_one_line_before_any_work(teacher, tmp_path, more, said):
    from common import one_error_line, run_in_process

    proc = run_in_process(distill_cli(teacher, tmp_path / "out", *more))
    assert __import__("re").search(said, one_error_line(proc))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_without_data_the_rounds_train_on_images_the_teacher_drew_first_by_its_ddim(teacher, tmp_path):
    """--teacher_samples N: N images of the teacher by its DDIM at --from_steps (as ddpm_hf's pipeline draws them from
    seeds 0..N-1), recorded as ddpm-sample records them, are the dataset of every round; the card says so."""
    import json

    from common import run_in_process

    out = tmp_path / "distilled"
    proc = run_in_process(distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 2, "--steps_per_round", 2,
                                      "--teacher_samples", 6, "--batch_size", 6, data=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = out / "teacher-samples"
    drawn = json.loads((samples / "sampling.json").read_text())
    assert (drawn["scheduler"], drawn["num_inference_steps"], drawn["num_images"], drawn["complete"]) == ("ddim", 2, 6, True)
    assert_drawn_by_the_teachers_ddim(teacher, samples, 6, 2)
    config = json.loads((out / "round-1" / "training_config.json").read_text())
    assert config["dataset"] == str(samples)
    assert json.loads((out / "distill.json").read_text())["teacher_samples"] == 6
    assert "trained on 6 images its teacher drew first (DDIM at 2 steps" in (out / "README.md").read_text()
    # a rerun on data is another distillation: refused before any work, the folder as it was
    again = run_in_process(distill_cli(teacher, out, "--to_steps", 1, "--from_steps", 2, "--steps_per_round", 2))
    assert again.returncode != 0 and "distill again from scratch" in again.stderr


@pytest.mark.parametrize("more, said", [
    (["--teacher_samples", 8, "--dataset", "digits"], r"--teacher_samples 8 draws the images the rounds train on: drop "
                                                      r"--dataset, or drop --teacher_samples to train on that data"),
    (["--teacher_samples", 8, "--train_data_dir", "folder"], r"--teacher_samples 8 draws the images the rounds train "
                                                             r"on: drop --dataset"),
    (["--teacher_samples", 0], r"--teacher_samples 0: give at least 1 image"),
    (["--teacher_samples", 10**8], r"--teacher_samples 100000000 is more than one folder of PNGs holds well \(at "
                                   r"most 10,000,000\): draw fewer"),
    (["--teacher_samples", 6], r"--teacher_samples 6 is fewer than one batch of 8: draw at least 8, or lower --batch_size"),
    (["--hub_model_id", "x"], r"--hub_model_id and --hub_private_repo need --push_to_hub"),
])
def test_teacher_samples_refuses_data_beside_it_and_no_images_in_one_line(teacher, tmp_path, more, said):
    from common import one_error_line, run_in_process

    proc = run_in_process(distill_cli(teacher, tmp_path / "out", "--to_steps", 4, *more, data=False))
    assert __import__("re").search(said, one_error_line(proc))
    assert not (tmp_path / "out").exists()


def test_teacher_samples_of_a_class_conditional_teacher_are_refused_in_one_line(conditional_teacher, tmp_path):
    from common import one_error_line, run_in_process

    proc = run_in_process(distill_cli(conditional_teacher, tmp_path / "out", "--to_steps", 4, "--teacher_samples", 8,
                                      data=False))
    assert "--teacher_samples draws unlabelled images, and" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_ddpm_distill_refuses_a_teacher_whose_scheduler_thresholds_in_one_line(teacher, tmp_path):
    import json
    import shutil

    from common import one_error_line, run_in_process

    thresholding = tmp_path / "thresholding"
    shutil.copytree(teacher, thresholding)
    config = thresholding / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "thresholding": True}))
    proc = run_in_process(distill_cli(thresholding, tmp_path / "out", "--to_steps", 4))
    assert "its scheduler thresholds x̂ dynamically (thresholding: true)" in one_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_the_default_first_teacher_reaches_128_steps_within_t():
    from ddpm_hf.commands.distill import default_from_steps

    assert [default_from_steps(n, 1000) for n in (1, 2, 4, 8)] == [128, 128, 128, 128]
    assert default_from_steps(4, 100) == 64  # no more than T
