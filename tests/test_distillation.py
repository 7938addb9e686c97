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


@pytest.mark.parametrize("N", [1, 2, 4, 5, 50])
def test_a_student_matching_its_target_lands_in_one_diffusers_ddim_step_where_the_teacher_lands_in_two(N):
    """The teacher's two steps by diffusers' DDIM at 2N steps (ε-prediction, unclipped); the student's one step by
    diffusers' DDIM at N steps, given x̃ as its x-prediction: the same z_t''. (Where 2N divides T: diffusers' DDIM
    steps by T // 2N, which is the grid's own step only there.)"""
    config = student_scheduler_config(dict(DDPMScheduler().config), 2 * N, "epsilon")
    teacher = diffusers.DDIMScheduler.from_config({**config, "clip_sample": False})
    student = diffusers.DDIMScheduler.from_config({**config, "clip_sample": False, "prediction_type": "sample"})
    teacher.set_timesteps(2 * N)
    student.set_timesteps(N)
    # the schedulers' own float32 ᾱ, so that both sides use the same table
    coefficients = Coefficients(teacher.alphas_cumprod)
    loss = DistillationLoss(eps_teacher_x0, teacher.alphas_cumprod, N, "sample")
    for j in range(N):
        z = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(j))
        t, t_mid, t_end = loss.timesteps(torch.tensor([j]))
        assert int(teacher.timesteps[2 * j]) == int(t) and int(teacher.timesteps[2 * j + 1]) == int(t_mid)
        z1 = teacher.step(teacher_eps(z, t).float(), int(t), z).prev_sample
        z2 = teacher.step(teacher_eps(z1, t_mid).float(), int(t_mid), z1).prev_sample
        x_tilde = target(eps_teacher_x0, z, t, t_mid, t_end, coefficients)
        one = student.step(x_tilde.float(), int(t), z).prev_sample
        torch.testing.assert_close(one, z2, rtol=1e-4, atol=1e-5)


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
