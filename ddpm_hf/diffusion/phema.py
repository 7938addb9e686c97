"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3):
averages of the weights whose length is chosen after training.

1. A power-function EMA with exponent γ averages the weights seen up to time t with the profile
   p(τ) = (γ + 1) τ^γ / t^(γ + 1) on [0, t] (their Eq. 1). It is tracked by θ̂ <- β θ̂ + (1 - β) θ with
   β = (1 - Δt/t)^(γ + 1) (Eq. 3), t the time after the update and Δt the time since the one before. With the weights
   θ_k held over each interval (t_{k-1}, t_k], the product of the β telescopes: θ_k's weight is
   (t_k/t)^(γ+1) - (t_{k-1}/t)^(γ+1) = ∫ p over its interval, so the tracked average *is* the profile's, exactly.
   Time here counts optimizer steps (a run's batch is fixed, so steps and images give the same β).
2. Its width relative to t is σ_rel = sqrt((γ + 1) / ((γ + 2)² (γ + 3))) (Eq. 2); γ from σ_rel is the largest real
   root of γ³ + 7γ² + (16 - σ_rel⁻²)γ + (12 - σ_rel⁻²) = 0. γ = 0 (the plain average of everything so far) is the
   widest: σ_rel = sqrt(1/12) ≈ 0.2887.
3. Snapshots of a few tracked EMAs at times t_i span other profiles: the least-squares mix Σ x_i p_i of a target p*
   solves A x = b with A_ij = ⟨p_i, p_j⟩ and b_i = ⟨p_i, p*⟩ (Sec. 3.2, App. C.3), whose inner products have the
   closed form of `profile_inner`; the mix is normalised to weights that sum to 1, and the weights it gives are
   Σ x_i θ̂_i.

The math, in float64; `ema.PowerEMA` tracks the averages of a model on its device. Importing this module is light
(numpy loads on first use): the training flags check σ_rel with it before torch loads.
"""

from __future__ import annotations

import math
from typing import Sequence

from ddpm_hf.errors import UsageError

SIGMA_REL_WIDEST = math.sqrt(1 / 12)  # γ = 0


# ---------------------------------------------------------------- 2. σ_rel <-> γ


def sigma_rel_of(gamma: float) -> float:
    """σ_rel of the power profile with exponent γ (Eq. 2)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_problem(sigma_rel: float) -> str:
    """Why `sigma_rel` is no power-function EMA's width ("" where it is one)."""
    if not (isinstance(sigma_rel, (int, float)) and math.isfinite(sigma_rel) and 0 < sigma_rel <= SIGMA_REL_WIDEST):
        return (f"σ_rel {sigma_rel}: a power-function EMA's relative width is above 0 and at most "
                f"{SIGMA_REL_WIDEST:.4f} (the plain average of every step so far); EDM2's presets use 0.015 to 0.19")
    return ""


def sigma_rels_of(text: str) -> tuple:
    """The σ_rel values of a comma-separated list (a flag's text, or a saved config's)."""
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise UsageError(f"σ_rel {text!r}: give numbers separated by commas, e.g. 0.05,0.1.") from None


def sigma_rels_problem(text: str) -> str:
    """Why a comma-separated list of σ_rel is not a set of widths to track ("" where it is one)."""
    try:
        values = sigma_rels_of(text)
    except UsageError as e:
        return str(e).rstrip(".")
    bad = next((sigma_rel_problem(v) for v in values if sigma_rel_problem(v)), "")
    if bad:
        return bad
    if len(set(values)) != len(values):
        return f"σ_rel {text}: each width once"
    return ""


def sigma_rels_text(text: str) -> str:
    """argparse's type for a list of σ_rel: its canonical text (0.05,0.1), or the line saying what is wrong."""
    import argparse

    problem = sigma_rels_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return ",".join(format(v, "g") for v in sigma_rels_of(text))


def gamma_of(sigma_rel: float) -> float:
    """γ of a relative width σ_rel: the largest real root of γ³ + 7γ² + (16 - σ⁻²)γ + (12 - σ⁻²) = 0."""
    problem = sigma_rel_problem(sigma_rel)
    if problem:
        raise UsageError(problem + ".")
    import numpy as np

    inv2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv2, 12.0 - inv2])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    return max(gamma, 0.0)  # the widest one's root is 0 up to rounding


# ---------------------------------------------------------------- 1. tracking


def power_beta(t: float, dt: float, gamma: float) -> float:
    """β of an update at time t, Δt after the one before (Eq. 3): 0 at the first update (t = Δt), a copy."""
    return (1.0 - dt / t) ** (gamma + 1)


def profile_weights(times: Sequence[float], gamma: float):
    """The weight a power EMA tracked at `times` (t_1 < ... < t_n, updates at each) gives the weights held over each
    interval (t_{k-1}, t_k], t_0 = 0: (t_k/t_n)^(γ+1) - (t_{k-1}/t_n)^(γ+1) (stage 1). Sums to 1."""
    import numpy as np

    ends = np.asarray(times, dtype=np.float64) / float(times[-1])
    cdf = ends ** (gamma + 1)
    return np.diff(np.concatenate([[0.0], cdf]))


# ---------------------------------------------------------------- 3. reconstruction


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """⟨p_a, p_b⟩ = ∫ p_a p_b of two power profiles (stage 1) ending at t_a and t_b, in closed form: with t_a ≤ t_b,
    (γa + 1)(γb + 1) / ((γa + γb + 1) t_b) · (t_a/t_b)^γb. Broadcasts (float64)."""
    import numpy as np

    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    first_ends = t_a <= t_b
    later = np.where(first_ends, t_b, t_a)
    later_gamma = np.where(first_ends, gamma_b, gamma_a)
    ratio = np.minimum(t_a, t_b) / later
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * later) * ratio ** later_gamma


def reconstruction(times: Sequence[float], gammas: Sequence[float], t: float, sigma_rel: float) -> dict:
    """The snapshot weights x (summing to 1) whose mix Σ x_i p_i is the least-squares nearest to the power profile of
    width `sigma_rel` ending at `t` (stage 3), from snapshots at `times` of EMAs with exponents `gammas`; and the
    relative L2 error of that mix, ‖Σ x_i p_i - p*‖ / ‖p*‖ (0: the profile is reproduced exactly)."""
    import numpy as np

    times, gammas = np.asarray(times, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    target_gamma = gamma_of(sigma_rel)
    A = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner(times, gammas, t, target_gamma)
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()
    target_norm = float(profile_inner(t, target_gamma, t, target_gamma))
    squared = float(x @ A @ x - 2 * x @ b + target_norm)
    return {"weights": x, "gamma": target_gamma, "relative_error": math.sqrt(max(squared, 0.0) / target_norm)}
