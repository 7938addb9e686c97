"""A from-scratch DDPM scheduler (Ho et al. 2020, https://arxiv.org/abs/2006.11239).

`DDPMScheduler` is a drop-in for `diffusers.DDPMScheduler`: it subclasses it (so every pipeline and
`isinstance` check that accepts diffusers' class accepts ours) and has exactly its config keys (so a
`scheduler_config.json` written by either class loads in the other), but every method is ours: no
call reaches diffusers' DDPM math. The differences are deliberate:

* schedules and all per-timestep coefficients are computed in float64 and cast once to the sample's
  dtype (diffusers computes ᾱ_t and 1 - ᾱ_t/ᾱ_{t'} in float32, which loses ~1e-3 relative accuracy
  in β_t for the first timesteps);
* `variance_type="fixed_large_log"` gives the fixed_large variance (diffusers returns NaN);
* `variance_type="learned"`: the model's second C channels are log σ², as in improved DDPM (Nichol &
  Dhariwal 2021) and `ddpm_hf.diffusion.likelihood` (diffusers reads them as σ² itself, which a network trained on the
  bound does not output); `learned_range` is read alike by both;
* no noise is added on the last step of a chain (the step that lands on x_0), as in Algorithm 2 of
  the paper, also when the chain does not end at t = 0 (diffusers adds noise there unless t == 0);
* invalid configurations raise `ValueError` naming the key and the allowed values.

Equation numbers refer to the DDPM paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDPMScheduler as _DiffusersDDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ddpm_hf.choices import BETA_SCHEDULES, PREDICTION_TYPES, TIMESTEP_SPACINGS, VARIANCE_TYPES
from ddpm_hf.errors import UsageError

__all__ = [
    "DDPMScheduler", "DDPMSchedulerOutput", "DiffusionTables", "FixedLogVariances", "Parameterization",
    "PARAMETERIZATIONS", "PREDICTION_TYPES", "VARIANCES", "Variance", "make_beta_schedule", "extract_into_tensor",
    "parameterization", "variance",
]


@dataclass(frozen=True)
class Parameterization:
    """What the network predicts, as closed forms in a = sqrt(ᾱ_t) and s = sqrt(1 - ᾱ_t), where
    x_t = a·x_0 + s·ε (Eq. 4). `a` and `s` are Python floats (one timestep) or tensors that broadcast
    against the samples (one timestep per sample).

    target(x0, eps, a, s): what the network learns to output;
    x0(output, x_t, a, s): x̂_0 from the network's output;
    snr_factor(snr): the SNR-dependent factor that the MSE on this target carries relative to the MSE on
        x_0 (the weight by which ||x̂_0 - x_0||² is scaled to give ||output - target||²)."""

    name: str
    target: Callable
    x0: Callable
    snr_factor: Callable


# The one dispatch on prediction_type: the scheduler's step, the training target, min-SNR weights and the
# variational bound all go through this table.
PARAMETERIZATIONS: Dict[str, Parameterization] = {
    # ε-prediction, Eq. 11-12 and 14 (the paper); x̂_0 from Eq. 15
    "epsilon": Parameterization("epsilon", lambda x0, eps, a, s: eps, lambda out, x_t, a, s: (x_t - s * out) / a,
                                lambda snr: snr),
    # x_0 itself
    "sample": Parameterization("sample", lambda x0, eps, a, s: x0, lambda out, x_t, a, s: out,
                               lambda snr: torch.ones_like(torch.as_tensor(snr))),
    # v = a·ε - s·x_0 (Salimans & Ho 2022); x_0 = a·x_t - s·v
    "v_prediction": Parameterization("v_prediction", lambda x0, eps, a, s: a * eps - s * x0,
                                     lambda out, x_t, a, s: a * x_t - s * out, lambda snr: snr + 1),
}


def parameterization(prediction_type: str) -> Parameterization:
    if prediction_type in PARAMETERIZATIONS:
        return PARAMETERIZATIONS[prediction_type]
    else:
        raise UsageError(f"prediction_type={prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}.")


class FixedLogVariances(NamedTuple):
    """The logs of a reverse step's fixed variances (Sec. 3.2), floats or tensors that broadcast against the sample:
    `small` = log β̃_t (the posterior variance, Eq. 7), `large` = fixed_large's log β_t, `beta` = log β_t itself (the
    upper end of learned_range). `large` and `beta` differ only in the bound's convention at t = 0, where fixed_large
    borrows β̃_1 (improved DDPM)."""

    small: object
    large: object
    beta: object


class StepCoefficients(NamedTuple):
    """A reverse step's numbers: `a` = √ᾱ_t and `s` = √(1 - ᾱ_t) (x̂_0 from the output), `c0` and `ct` (the posterior
    mean, Eq. 7), the fixed log-variances `log_small` = log β̃_t and `log_large` = log β of the step (what a variance
    type reads, Sec. 3.2), `std` = σ_t of a fixed variance type (0 for a learned one, which the network gives), and
    `noise`: 1 where the step adds σ_t z, 0 on the step that lands on x_0. Floats for one step on the host, or 0-d
    tensors gathered on the device."""

    a: object
    s: object
    c0: object
    ct: object
    log_small: object
    log_large: object
    std: object
    noise: object


@dataclass(frozen=True)
class Variance:
    """A variance type: whether the network predicts it (2C output channels, the second C being `v`), and
    log_variance(fixed, v): log σ_t² from the step's `FixedLogVariances` and `v` (None for a fixed variance)."""

    name: str
    learned: bool
    log_variance: Callable


def _learned_range(fixed: FixedLogVariances, v):
    frac = (v + 1) / 2  # improved DDPM, Eq. 15: v in [-1, 1] interpolates the log-variances
    return frac * fixed.beta + (1 - frac) * fixed.small


# The one dispatch on variance_type: the scheduler's step and the variational bound (ddpm_hf.diffusion.likelihood) both go
# through this table. The `_log` names are diffusers' spellings of the same variances.
VARIANCES: Dict[str, Variance] = {
    "fixed_small": Variance("fixed_small", False, lambda fixed, v: fixed.small),  # σ² = β̃_t
    "fixed_small_log": Variance("fixed_small_log", False, lambda fixed, v: fixed.small),
    "fixed_large": Variance("fixed_large", False, lambda fixed, v: fixed.large),  # σ² = β_t
    "fixed_large_log": Variance("fixed_large_log", False, lambda fixed, v: fixed.large),
    "learned": Variance("learned", True, lambda fixed, v: v),  # v is log σ² itself (improved DDPM)
    "learned_range": Variance("learned_range", True, _learned_range),
}


def variance(variance_type: str) -> Variance:
    if variance_type in VARIANCES:
        return VARIANCES[variance_type]
    else:
        raise UsageError(f"variance_type={variance_type!r} is not one of {', '.join(map(repr, VARIANCE_TYPES))}.")


@dataclass(frozen=True)
class DiffusionTables:
    """Per-timestep quantities of the forward process and its posterior, indexed by the training timestep
    t = 0..T-1 (t = 0 is the paper's x_1, the first noisy step), in float64 (float32 on a device without
    float64, such as MPS). `DDPMScheduler.tables(device)` keeps one copy per device, so that indexing them with
    the timesteps of a batch never copies anything to the host."""

    betas: torch.Tensor  # β_t
    alphas_cumprod: torch.Tensor  # ᾱ_t (Eq. 4)
    alphas_cumprod_prev: torch.Tensor  # ᾱ_{t-1}, with ᾱ_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    snr: torch.Tensor  # ᾱ_t / (1 - ᾱ_t)
    posterior_variance: torch.Tensor  # β̃_t (Eq. 7), 0 at t = 0
    posterior_log_variance_clipped: torch.Tensor  # log β̃_t, with β̃ at t = 0 replaced by β̃ at t = 1
    log_betas_clipped: torch.Tensor  # log β_t, with β at t = 0 replaced by β̃ at t = 1 (fixed_large's log σ²)
    posterior_mean_coef1: torch.Tensor  # coefficient of x_0 in μ̃_t (Eq. 7)
    posterior_mean_coef2: torch.Tensor  # coefficient of x_t in μ̃_t (Eq. 7)

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "DiffusionTables":
        betas = np.asarray(betas, dtype=np.float64)
        ab = np.cumprod(1 - betas)
        ab_prev = np.append(1.0, ab[:-1])
        posterior_variance = betas * (1 - ab_prev) / (1 - ab)
        # improved DDPM's convention: β̃_0 = 0 has no log, so t = 0 borrows β̃_1 (β_1 itself when T = 1)
        first = posterior_variance[1] if len(betas) > 1 else betas[0]
        with np.errstate(divide="ignore"):
            snr = ab / (1 - ab)
        arrays = dict(
            betas=betas, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev, sqrt_alphas_cumprod=np.sqrt(ab),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ab), snr=snr, posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.append(first, posterior_variance[1:])),
            log_betas_clipped=np.log(np.append(first, betas[1:])),
            posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1 - ab),
            posterior_mean_coef2=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab),
        )
        return cls(**{k: torch.from_numpy(v) for k, v in arrays.items()})

    def to(self, device) -> "DiffusionTables":
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return DiffusionTables(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})


def _check_choice(key: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise UsageError(f"{key}={value!r} is not supported; use one of {', '.join(map(repr, allowed))}.")


def make_beta_schedule(
    beta_schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
    """The betas β_1..β_T of a named schedule, in float64."""
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule not in ("squaredcos_cap_v2", "laplace") and not 0 < beta_start < beta_end < 1:
        raise UsageError(
            f"beta_start={beta_start} and beta_end={beta_end} must satisfy 0 < beta_start < beta_end < 1 "
            f"for beta_schedule={beta_schedule!r} (the paper uses beta_start=1e-4, beta_end=0.02)."
        )
    T = num_train_timesteps
    if beta_schedule == "linear":  # the paper's schedule, Sec. 4
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":  # linear in sqrt(beta), as in latent diffusion
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), β_t = 1 - ᾱ(t)/ᾱ(t-1) <= 0.999
        s = 0.008
        t = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    elif beta_schedule == "sigmoid":  # GeoDiff (Xu et al. 2022)
        x = np.linspace(-6, 6, T, dtype=np.float64)
        return 1 / (1 + np.exp(-x)) * (beta_end - beta_start) + beta_start
    elif beta_schedule == "laplace":
        # diffusers' laplace schedule (Hang et al. 2024): λ(t) = -½ sign(½ - t) log(1 - 2|½ - t| + 1e-6), the curve
        # sqrt(e^λ / (1 + e^λ)) discretised as β_t = 1 - f(t/T + 1/T) / f(t/T) <= 0.999, as diffusers defines it
        t = np.arange(T + 1, dtype=np.float64) / T
        lmb = -0.5 * np.sign(0.5 - t) * np.log(1 - 2 * np.abs(0.5 - t) + 1e-6)
        f = np.sqrt(np.exp(lmb) / (1 + np.exp(lmb)))
        return np.minimum(1 - f[1:] / f[:-1], 0.999)
    else:  # unreachable: _check_choice above
        raise UsageError(f"beta_schedule={beta_schedule!r}")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv:2305.08891), Algorithm 1: shift and scale sqrt(ᾱ_t) so that ᾱ_T = 0."""
    sqrt_ab = np.sqrt(np.cumprod(1 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def extract_into_tensor(table: torch.Tensor, timesteps, shape: Sequence[int], dtype, device=None) -> torch.Tensor:
    """Per-timestep coefficients `table[timesteps]`, shaped to broadcast against a batch of `shape`.

    `table` is a float64 tensor indexed by training timestep; `timesteps` an int, a 0-d tensor or one
    timestep per sample. The result has shape `[B, 1, 1, ...]` (or `[1, 1, ...]` for a scalar timestep),
    on `device` (default: the timesteps' device). Tensor timesteps are never copied to the host: a table on
    another device is brought to them (pass a table already there, `DDPMScheduler.tables(device)`, to copy
    nothing at all)."""
    if isinstance(timesteps, torch.Tensor):
        t = timesteps.reshape(-1).long()
        if table.device != t.device:
            table = table.to(t.device)
    else:
        t = torch.as_tensor(timesteps, device=table.device, dtype=torch.long).reshape(-1)
    out = table[t].to(device=device if device is not None else t.device, dtype=dtype)
    return out.reshape(out.shape[0], *([1] * (len(shape) - 1)))


class DDPMScheduler(_DiffusersDDPMScheduler):
    """Denoising diffusion probabilistic model scheduler, written from the paper.

    The constructor's arguments are its config (`scheduler_config.json`), key for key those of
    `diffusers.DDPMScheduler`:

    Args:
        num_train_timesteps: T, the number of diffusion steps the model was trained with.
        beta_start, beta_end: β_1 and β_T of the `linear`, `scaled_linear` and `sigmoid` schedules.
        beta_schedule: `linear` (the paper), `scaled_linear`, `squaredcos_cap_v2` (improved DDPM cosine)
            or `sigmoid`.
        trained_betas: explicit betas (overrides `beta_schedule`), each in (0, 1).
        variance_type: σ_t² of the reverse process: `fixed_small` (β̃_t, the posterior variance),
            `fixed_large` (β_t), their `_log` forms, or `learned` / `learned_range` (the model outputs
            2C channels; the second half is log σ², or an interpolation weight v in [-1, 1]: log σ² =
            (v+1)/2·log β_t + (1-v)/2·log β̃_t, as in improved DDPM).
        clip_sample, clip_sample_range: clamp x̂_0 to [-range, range].
        prediction_type: what the model predicts: `epsilon` (the paper), `sample` (x_0) or
            `v_prediction` (v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0).
        thresholding, dynamic_thresholding_ratio, sample_max_value: Imagen's dynamic thresholding of
            x̂_0 (instead of clipping).
        timestep_spacing: how `set_timesteps(n)` picks n of the T timesteps: `leading`, `linspace`
            or `trailing` (Lin et al. 2023, Table 2).
        steps_offset: added to the `leading` timesteps.
        rescale_betas_zero_snr: rescale the betas so that ᾱ_T = 0 (zero terminal SNR).
    """

    # the settings that define the diffusion itself (its betas, what the network predicts, its variance), as opposed
    # to how one sampler step treats its output: a config whose chain these make invalid can run in no scheduler
    CHAIN_SETTINGS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "variance_type",
                      "prediction_type", "rescale_betas_zero_snr")

    @classmethod
    def chain_problem(cls, config) -> Optional[str]:
        """Why the diffusion a scheduler config describes (its CHAIN_SETTINGS) cannot run, or None."""
        try:
            cls(**{k: v for k, v in dict(config).items() if k in cls.CHAIN_SETTINGS})
        except (ValueError, TypeError) as e:
            return " ".join(str(e).split()).rstrip(".")
        return None

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
            raise UsageError(f"num_train_timesteps={num_train_timesteps!r} must be a positive integer (e.g. 1000).")
        _check_choice("variance_type", variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if not 0 < dynamic_thresholding_ratio < 1:
            raise UsageError(f"dynamic_thresholding_ratio={dynamic_thresholding_ratio} must be in (0, 1), e.g. 0.995.")

        # 1. β_t in float64 (Sec. 2: the forward process variances)
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64).reshape(-1)
            if len(betas) != num_train_timesteps:
                raise UsageError(
                    f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
                    "give one beta per training timestep."
                )
        else:
            betas = make_beta_schedule(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if not np.all((betas > 0) & (betas < 1)):
            bad = int(np.flatnonzero(~((betas > 0) & (betas < 1)))[0])
            raise UsageError(
                f"betas must lie in (0, 1), but beta[{bad}]={float(betas[bad])!r}; fix trained_betas or beta_start/beta_end."
            )
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)  # the last beta becomes exactly 1 (ᾱ_T = 0)

        # 2. α_t = 1 - β_t, ᾱ_t = Π_{s<=t} α_s (Eq. 4) and the posterior's coefficients (Eq. 7): float64
        #    tables, one copy per device (`tables`); float32 views as in diffusers
        self._tables = {"cpu": DiffusionTables.from_betas(betas)}
        self.betas = torch.from_numpy(betas).float()
        self.alphas = torch.from_numpy(1 - betas).float()
        self.alphas_cumprod = self._tables["cpu"].alphas_cumprod.float()
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0  # x_T ~ N(0, I)

        # 3. the default chain: all T timesteps, descending
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._prev = None  # {t: t'} for a chain set by set_timesteps; None means t' = t - 1
        self.variance_type = variance_type

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def tables(self, device=None) -> DiffusionTables:
        """The per-timestep float64 tables on `device` (default: the CPU), copied there once and kept."""
        key = str(torch.device(device)) if device is not None else "cpu"
        if key not in self._tables:
            self._tables[key] = self._tables["cpu"].to(key)
        return self._tables[key]

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled."""
        return sample

    # ------------------------------------------------------------------ timesteps

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[Sequence[int]] = None,
    ) -> None:
        """Choose the chain of timesteps to sample with: a count (spaced by `timestep_spacing`) or
        explicit descending `timesteps`. With fewer steps than T, each step jumps t -> t' with
        α = ᾱ_t / ᾱ_{t'} (a strided DDPM whose marginals q(x_t | x_0) are unchanged)."""
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise UsageError("set_timesteps takes exactly one of num_inference_steps or timesteps.")
        if timesteps is not None:
            ts = np.asarray([int(t) for t in timesteps], dtype=np.int64)
            if len(ts) == 0:
                raise UsageError("timesteps is empty; give at least one timestep.")
            if np.any(np.diff(ts) >= 0):
                raise UsageError(f"timesteps must be strictly descending, got {ts.tolist()}.")
            if ts[0] >= T or ts[-1] < 0:
                raise UsageError(f"timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), got {ts.tolist()}.")
            self.custom_timesteps = True
            self.num_inference_steps = len(ts)
        else:
            n = int(num_inference_steps)
            if not 1 <= n <= T:
                raise UsageError(
                    f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps={T}."
                )
            spacing = self.config.timestep_spacing
            if spacing == "linspace":
                ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
            elif spacing == "leading":
                ts = (np.arange(n) * (T // n))[::-1].astype(np.int64) + self.config.steps_offset
            elif spacing == "trailing":
                ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
            else:
                raise UsageError(f"timestep_spacing={spacing!r} is not one of {TIMESTEP_SPACINGS}.")
            if ts.max() >= T:
                raise UsageError(
                    f"steps_offset={self.config.steps_offset} pushes timestep {int(ts.max())} past "
                    f"num_train_timesteps={T}; lower steps_offset or num_inference_steps."
                )
            self.custom_timesteps = False
            self.num_inference_steps = n
        ts = np.ascontiguousarray(ts)
        self._prev = {int(t): int(p) for t, p in zip(ts, list(ts[1:]) + [-1])}
        self.timesteps = torch.from_numpy(ts).to(device)

    def previous_timestep(self, timestep):
        """t' of the step from t in the current chain; -1 for the last step (the one that lands on x_0). An int for
        an int, a tensor for a tensor (as diffusers' returns)."""
        t = int(timestep)
        if self._prev is None:
            prev = t - 1
        elif t in self._prev:
            prev = self._prev[t]
        else:
            raise UsageError(f"timestep {t} is not in the chain set by set_timesteps ({self.timesteps.tolist()[:8]}...).")
        return torch.tensor(prev, device=timestep.device) if isinstance(timestep, torch.Tensor) else prev

    # ------------------------------------------------------------------ closed-form quantities

    def _alpha_bar(self, t: int) -> float:
        """ᾱ_t, with ᾱ_{-1} = 1 (before any noise)."""
        return 1.0 if t < 0 else float(self._tables["cpu"].alphas_cumprod[t])

    def posterior_coefficients(self, timestep: int, prev_timestep: Optional[int] = None):
        """The posterior q(x_{t'} | x_t, x_0) = N(c0·x_0 + ct·x_t, β̃) of Eqs. 6-7 for the step t -> t'
        (t' = t - 1 by default). Returns (c0, ct, β̃, β) as float64 Python floats, where β = 1 - ᾱ_t/ᾱ_{t'}
        is the step's forward variance."""
        t = int(timestep)
        tp = t - 1 if prev_timestep is None else int(prev_timestep)
        ab_t, ab_prev = self._alpha_bar(t), self._alpha_bar(tp)
        beta = 1.0 - ab_t / ab_prev  # β_t of the (possibly strided) step
        alpha = ab_t / ab_prev
        c0 = math.sqrt(ab_prev) * beta / (1.0 - ab_t)  # Eq. 7, coefficient of x_0
        ct = math.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)  # Eq. 7, coefficient of x_t
        var = (1.0 - ab_prev) / (1.0 - ab_t) * beta  # Eq. 7, β̃_t
        return c0, ct, var, beta

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """σ_t² of the reverse step from t (Sec. 3.2, through `VARIANCES`), or for `learned` and `learned_range` its log.

        Kept under diffusers' private name so that code written against diffusers' class works."""
        kind = variance(variance_type or self.config.variance_type)
        log_variance = self._log_variance(kind, self.step_coefficients(t), predicted_variance)
        return log_variance if kind.learned else torch.tensor(math.exp(log_variance), dtype=torch.float64)

    @staticmethod
    def _log_variance(kind: "Variance", k: "StepCoefficients", predicted_variance=None):
        return kind.log_variance(FixedLogVariances(k.log_small, k.log_large, k.log_large), predicted_variance)

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3): per sample, s = the
        `dynamic_thresholding_ratio` quantile of |x̂_0| clamped to [1, sample_max_value]; x̂_0 <- clamp(x̂_0, -s, s) / s."""
        dtype = sample.dtype
        flat = sample.reshape(sample.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1.0, max=self.config.sample_max_value)[:, None]
        return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(sample.shape).to(dtype)

    # ------------------------------------------------------------------ forward process

    def coefficients(self, timesteps, like: torch.Tensor, *names: str):
        """The named `DiffusionTables` entries at `timesteps`, in `like`'s dtype, shaped to broadcast against
        it, read from the copy of the tables on `like`'s device (no host copy, no per-call transfer)."""
        tables = self.tables(like.device)
        return [extract_into_tensor(getattr(tables, name), timesteps, like.shape, like.dtype, like.device) for name in names]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, a draw from q(x_t | x_0) (Eq. 4)."""
        a, s = self.coefficients(timesteps, original_samples, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return a * original_samples + s * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (Salimans & Ho 2022), the v_prediction target."""
        a, s = self.coefficients(timesteps, sample, "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod")
        return PARAMETERIZATIONS["v_prediction"].target(sample, noise, a, s)

    # ------------------------------------------------------------------ reverse process

    def step_coefficients(self, timestep) -> StepCoefficients:
        """The numbers of the reverse step from `timestep` (float64 Python floats)."""
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        ab_t = self._alpha_bar(t)  # ᾱ_t, and the posterior's coefficients for the step t -> t'
        c0, ct, var_small, var_large = self.posterior_coefficients(t, prev_t)
        # β̃ = 0 on the step to x_0: its log kept finite; the step's β (a strided step has no t = 0 convention to follow)
        logs = FixedLogVariances(math.log(max(var_small, 1e-20)), math.log(var_large), math.log(var_large))
        kind = variance(self.config.variance_type)
        std = 0.0 if kind.learned else math.sqrt(math.exp(kind.log_variance(logs, None)))
        return StepCoefficients(math.sqrt(ab_t), math.sqrt(1 - ab_t), c0, ct, logs.small, logs.large, std,
                                1.0 if prev_t >= 0 else 0.0)

    def reverse_step(self, k: StepCoefficients, model_output: torch.Tensor, sample: torch.Tensor,
                     noise: Optional[torch.Tensor]) -> tuple:
        """(x_{t'}, x̂_0): stages 2-5 of `step` with the step's numbers `k`, floats or 0-d tensors (a CUDA graph gathers
        them on the device: pipelines/chain_graph.py), and the step's z (None where k.noise is 0). Either way the
        float64 numbers meet the float32 chain the same way, so the two agree bit for bit."""
        kind = variance(self.config.variance_type)
        predicted_variance = None
        if kind.learned:
            model_output, predicted_variance = model_output.split(sample.shape[1], dim=1)
        prev_sample, pred_original_sample = self.reverse_mean(k, model_output, sample)
        if noise is not None:  # 5. add σ_t z, z ~ N(0, I), except on the step that lands on x_0 (Algorithm 2, line 3)
            std = torch.exp(0.5 * self._log_variance(kind, k, predicted_variance)) if kind.learned else k.std
            prev_sample = prev_sample + (k.noise * std) * noise
        return prev_sample, pred_original_sample

    def reverse_mean(self, k: StepCoefficients, model_output: torch.Tensor, sample: torch.Tensor) -> tuple:
        """(μ̃_t, x̂_0): stages 2-4 of `step` with the step's numbers `k`."""
        # 2. x̂_0 from the model output: Eq. 15 for ε; x_0 itself; or from v = sqrt(ᾱ)ε - sqrt(1-ᾱ)x_0
        pred_original_sample = parameterization(self.config.prediction_type).x0(model_output, sample, k.a, k.s)
        # 3. clip or dynamically threshold x̂_0
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-r, r)
        # 4. posterior mean μ̃_t(x_t, x̂_0) = c0·x̂_0 + ct·x_t (Eq. 7)
        return k.c0 * pred_original_sample + k.ct * sample, pred_original_sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Union[torch.Generator, list, None] = None,
        return_dict: bool = True,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> Union[DDPMSchedulerOutput, tuple]:
        """One ancestral step x_t -> x_{t'} ~ p(x_{t'} | x_t) (Algorithm 2), where t' is the next timestep
        of the chain. Returns `prev_sample` (x_{t'}) and `pred_original_sample` (x̂_0). The step's z ~ N(0, I) is
        `variance_noise` where given (as DDIMScheduler.step takes it), else drawn from `generator`."""
        if variance_noise is not None and generator is not None:
            raise UsageError("Pass variance_noise or generator to step, not both: variance_noise is the noise itself.")
        t = int(timestep)
        C = sample.shape[1]
        if variance(self.config.variance_type).learned and model_output.shape[1] != 2 * C:
            raise UsageError(
                f"variance_type={self.config.variance_type!r} needs a model output of {2 * C} channels "
                f"(prediction and variance), got {model_output.shape[1]}; use a fixed variance_type or a "
                "model with out_channels = 2 * in_channels."
            )
        # 1. the step's numbers (float64): ᾱ_t, the posterior's coefficients, the fixed log-variances
        k = self.step_coefficients(t)
        noise = None
        if k.noise:  # z is drawn on every step but the one that lands on x_0
            noise = variance_noise if variance_noise is not None else randn_tensor(
                sample.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        # 2.-5. x̂_0, its clipping, the posterior mean and σ_t z
        prev_sample, pred_original_sample = self.reverse_step(k, model_output, sample, noise)

        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
