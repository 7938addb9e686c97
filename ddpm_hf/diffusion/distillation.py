"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student that takes in one DDIM step what its teacher
takes in two, round after round, from many steps down to a handful. The math only, on a DDPM's discrete time; the
objective is one more loss of the training step (`DistillationLoss`, the same calling convention as `DiffusionLoss`).

1. The grid (Alg. 2 line 5: t = i/N). N steps on T training timesteps: τ_j = T - 1 - round(j·T/N), j = 0..N, where
   τ_N = -1 is the clean image (ᾱ = 1). Point j of the N-grid is point 2j of the 2N-grid, so each student step is
   exactly two teacher steps, every round. Where N divides T it is diffusers' DDIM with timestep_spacing "trailing" and
   set_alpha_to_one (each step to t - T//N, the last to ᾱ = 1): the saved student samples there in plain diffusers.
2. The teacher's two DDIM steps (η = 0; Song et al. 2021, Eq. 12; Alg. 2 lines 7-8), t → t' → t'':
   z_t' = α_t'·x̂(z_t) + (σ_t'/σ_t)·(z_t - α_t·x̂(z_t)), with α² = ᾱ and σ² = 1 - ᾱ.
   x̂ is clipped to [-c, c] where the teacher's own scheduler clips (clip_sample, c = clip_sample_range), as its sampler
   does (the step's z_t - α_t·x̂ then takes the clipped x̂: ε re-derived from it, as ddpm_hf's pipeline steps a DDIM
   that clips), and unclipped where it does not (every student: v's x̂ = α z - σ v is well-conditioned). The paper's teachers
   predict v or x and step unclipped; an ε-teacher's x̂ = (z - σ ε̂)/α multiplies ε̂'s error by 1/α (156 at t = 999 on
   the linear schedule): unclipped, x̃ there is that error (RMS 5.8 on the digits model, whose pixels are in [-1, 1])
   and the first round cannot fit it (docs/distillation.md).
3. The target (Alg. 2 line 9): the x̃ from which one DDIM step t → t'' lands on z_t'':
   x̃ = (z_t'' - (σ_t''/σ_t)·z_t) / (α_t'' - (σ_t''/σ_t)·α_t); at t'' = -1 (σ = 0, α = 1) it is z_t'' itself.
   Written out, x̃ = λ·x̂(z_t) + (1 - λ)·x̂(z_t') with λ = σ_t''(α_t'/σ_t' - α_t/σ_t) / (α_t'' - (σ_t''/σ_t)·α_t) in
   [0, 1] while α/σ grows along the chain: x̃ lies between the teacher's two x̂, so within [-c, c] where they are.
4. The weight (Sec. 4): "truncated SNR", max(‖x - x̂‖², ‖ε - ε̂‖²) = max(SNR_t, 1)·‖x - x̂‖², which stays sound at
   the pure-noise end where SNR → 0; or "SNR+1", (1 + SNR_t)·‖x - x̂‖², which is v-prediction's own MSE.
5. The student's parameterization: the student predicts v (or x); an ε-prediction's x̂ = (z - σ·ε̂)/α divides by
   α → 0 at t = T - 1, where a 1-step student must still give an image.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ddpm_hf.choices import DISTILL_WEIGHTINGS, STUDENT_PREDICTIONS  # 5. what a student may predict
from ddpm_hf.diffusion.scheduler import parameterization
from ddpm_hf.errors import UsageError

# 4. the loss weights of ‖x̃ - x̂‖², by name (Salimans & Ho 2022, Sec. 4)
WEIGHTINGS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "truncated-snr": lambda snr: torch.clamp(snr, min=1.0),  # max(SNR, 1)
    "snr+1": lambda snr: snr + 1.0,  # v's own MSE
}
assert tuple(WEIGHTINGS) == DISTILL_WEIGHTINGS


def grid(num_steps: int, num_train_timesteps: int) -> List[int]:
    """1. τ_0 > τ_1 > ... > τ_N = -1: the N-step grid on T training timesteps."""
    return [num_train_timesteps - 1 - round(j * num_train_timesteps / num_steps) for j in range(num_steps + 1)]


def rounds(from_steps: int, to_steps: int) -> List[int]:
    """The student step counts, one per round: from_steps/2, from_steps/4, ..., to_steps."""
    steps, out = from_steps, []
    while steps > to_steps:
        steps //= 2
        out.append(steps)
    return out


def steps_problem(from_steps: int, to_steps: int, num_train_timesteps: int) -> Optional[str]:
    """Why these step counts cannot be distilled (one line), or None."""
    T = num_train_timesteps
    if to_steps < 1 or from_steps <= to_steps:
        return f"--from_steps {from_steps} must be more than --to_steps {to_steps}, which is at least 1"
    ratio = from_steps // to_steps
    if from_steps % to_steps or ratio & (ratio - 1):
        return (f"--from_steps {from_steps} is not --to_steps {to_steps} times a power of two: each round halves the "
                f"steps (e.g. --from_steps {to_steps * 2 ** max(1, (ratio - 1).bit_length())})")
    if from_steps > T:
        return (f"--from_steps {from_steps} is more than the teacher's {T} training timesteps: its grid would repeat "
                "timesteps; choose at most " + str(to_steps * 2 ** ((T // to_steps).bit_length() - 1)))
    if T % to_steps:
        return (f"--to_steps {to_steps} does not divide the teacher's {T} training timesteps: plain diffusers' DDIM "
                f"steps by T // N and would leave the student's grid; choose a divisor of {T} (1, 2, 4, 5, 8, 10, ...)")
    return None


class Coefficients:
    """α_τ and σ_τ of the grid's timesteps in float64, with τ = -1 the clean image (α = 1, σ = 0). Indexed on the
    device of the timesteps (a copy of the table per device, made once): no host sync, so a CUDA graph captures it."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ab = torch.cat([alphas_cumprod.double().cpu(), torch.ones(1, dtype=torch.float64)])  # index -1: ᾱ = 1
        self.tables = {torch.device("cpu"): (ab.sqrt(), (1 - ab).clamp(min=0).sqrt())}

    def on(self, device) -> tuple:
        device = torch.device(device)
        if device not in self.tables:
            self.tables[device] = tuple(t.to(device) for t in self.tables[torch.device("cpu")])
        return self.tables[device]

    def __call__(self, tau: torch.Tensor, like: torch.Tensor):
        """(α, σ) at the timesteps `tau` (one per sample, -1 allowed), shaped to broadcast against `like`, in float64."""
        shape = (-1,) + (1,) * (like.dim() - 1)
        alpha, sigma = self.on(like.device)
        index = tau.to(like.device).long()
        return alpha[index].view(shape), sigma[index].view(shape)


def ddim_step(x0: torch.Tensor, z: torch.Tensor, a: torch.Tensor, s: torch.Tensor, a_to: torch.Tensor,
              s_to: torch.Tensor) -> torch.Tensor:
    """2. One DDIM step (η = 0) from z at (a, s) to (a_to, s_to), given x̂_0 (Eq. 12)."""
    return a_to * x0 + (s_to / s) * (z - a * x0)


def target(x0_hat: Callable[..., torch.Tensor], z: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
           t_end: torch.Tensor, coefficients: Coefficients, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """3. x̃ (float64) of the teacher whose x̂(z, τ, a, s) is `x0_hat` (x̂(z, τ, a, s, labels) given class labels): two
    DDIM steps z_t → z_t' → z_t'', then the x̃ one step t → t'' would need."""
    z = z.double()
    given = () if labels is None else (labels,)
    a, s = coefficients(t, z)
    a1, s1 = coefficients(t_mid, z)
    a2, s2 = coefficients(t_end, z)
    z1 = ddim_step(x0_hat(z, t, a, s, *given), z, a, s, a1, s1)
    z2 = ddim_step(x0_hat(z1, t_mid, a1, s1, *given), z1, a1, s1, a2, s2)
    ratio = s2 / s
    return (z2 - ratio * z) / (a2 - ratio * a)


def teacher_clip(scheduler_config) -> Optional[float]:
    """2. c, where a teacher's x̂ is clipped to [-c, c] as its own scheduler clips it; None where it is not."""
    return float(scheduler_config.get("clip_sample_range", 1.0)) if scheduler_config.get("clip_sample") else None


def network_x0(unet: Callable, prediction_type: str, channels: int,
               forward: Optional[Callable] = None, clip: Optional[float] = None) -> Callable:
    """x̂(z, τ, a, s) of a network predicting `prediction_type` (its first `channels` outputs: a learned variance's
    are not used), run in the network's own dtype, clipped to [-clip, clip] where `clip` is given (2.);
    `forward(z, τ)` replaces `unet(z, τ).sample`, and a class-conditional teacher's `forward(z, τ, labels)` (guided,
    say) makes it x̂(z, τ, a, s, labels)."""
    to_x0 = parameterization(prediction_type).x0
    run = forward or (lambda z, tau: unet(z, tau).sample)
    dtype = next(unet.parameters()).dtype if hasattr(unet, "parameters") else torch.float32  # once, not per call

    def x0_hat(z, tau, a, s, *labels):
        out = run(z.to(dtype), tau, *labels)[:, :channels].double()
        x0 = to_x0(out, z, a, s)
        return x0 if clip is None else x0.clamp(-clip, clip)

    return x0_hat


class DistillationLoss:
    """The student's loss of one batch, per sample: `loss(model, x0, noise, j) -> [B]` (float32), as `DiffusionLoss`
    is called, where j (drawn by the t-sampler over 0..N-1) names the student's step τ_j → τ_{j+1}: z = α x0 + σ ε at
    τ_j, the teacher's target x̃ (no gradient), and w(SNR)·‖x̃ - x̂_θ(z)‖² with x̂_θ from the student's prediction.
    A class-conditional step calls it with `model` = functools.partial(network, labels=...) (the training step's
    form): the teacher is given the same labels."""

    def __init__(self, teacher_x0: Callable, alphas_cumprod: torch.Tensor, num_steps: int, student_prediction: str,
                 weighting: str = "truncated-snr"):
        if student_prediction not in STUDENT_PREDICTIONS:
            raise UsageError(f"a student predicts one of {', '.join(STUDENT_PREDICTIONS)}, not {student_prediction!r}: "
                             "an ε-prediction's x̂ divides by α, which vanishes at the pure-noise end.")
        if weighting not in WEIGHTINGS:
            raise UsageError(f"--distill_weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}.")
        T = len(alphas_cumprod)
        self.teacher_x0, self.num_steps, self.weighting = teacher_x0, num_steps, weighting
        self.student_x0 = parameterization(student_prediction).x0
        self.coefficients = Coefficients(alphas_cumprod)
        self.student_grid = torch.tensor(grid(num_steps, T))
        self.teacher_grid = torch.tensor(grid(2 * num_steps, T))

    def timesteps(self, j: torch.Tensor) -> tuple:
        """(τ_j, the teacher's midpoint, τ_{j+1}) of the student's step j, on j's device."""
        if self.student_grid.device != j.device:
            self.student_grid, self.teacher_grid = self.student_grid.to(j.device), self.teacher_grid.to(j.device)
        j = j.long()
        return self.student_grid[j], self.teacher_grid[2 * j + 1], self.student_grid[j + 1]

    def __call__(self, model: Callable, x0: torch.Tensor, noise: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        t, t_mid, t_end = self.timesteps(j)
        a, s = self.coefficients(t, x0)
        z = (a * x0.double() + s * noise.double()).float()  # q(z_t | x), Alg. 2 line 6
        labels = getattr(model, "keywords", {}).get("labels")
        with torch.no_grad():
            x_tilde = target(self.teacher_x0, z, t, t_mid, t_end, self.coefficients, labels)
        output = model(z, t)
        x_hat = self.student_x0(output[:, : x0.shape[1]].double(), z.double(), a, s)
        snr = (a / s).pow(2).flatten()
        weight = WEIGHTINGS[self.weighting](snr)
        return (weight * (x_hat - x_tilde).pow(2).flatten(1).mean(1)).float()


def student_scheduler_config(teacher_config: dict, num_steps: int, prediction_type: str,
                             clip: Optional[float] = None) -> dict:
    """The saved student's scheduler: diffusers' DDIMScheduler on the teacher's betas, whose set_timesteps(num_steps)
    gives exactly the student's grid (1.): trailing spacing, each step to t - T//N and the last to ᾱ = 1. Unclipped
    (its x̂ lies between its teacher's, 3.), and so the same images in plain diffusers' DDPMPipeline, which steps DDIM
    with its defaults, and in ddpm_hf's. `clip`: the teacher's own DDIM on that grid instead, clipped as it clips."""
    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    config = {k: teacher_config[k] for k in keep if k in teacher_config}
    clipping = {"clip_sample": False} if clip is None else {"clip_sample": True, "clip_sample_range": clip}
    return {**config, "prediction_type": prediction_type, "timestep_spacing": "trailing", "set_alpha_to_one": True,
            "steps_offset": 0, "thresholding": False, **clipping}


def student_scheduler(teacher_config: dict, num_steps: int, prediction_type: str, clip: Optional[float] = None):
    """The DDIMScheduler of `student_scheduler_config`: ddpm_hf's (`diffusion.ddim`, saved as diffusers' own), which
    also follows the grid of an intermediate round whose N does not divide T (diffusers' steps by T // N)."""
    from ddpm_hf.diffusion.ddim import DDIMScheduler

    return DDIMScheduler.from_config(student_scheduler_config(teacher_config, num_steps, prediction_type, clip))

