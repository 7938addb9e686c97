"""Sample-quality metrics as pure functions of features (the feature network is chosen elsewhere).

FID and KID use clean-fid's implementations (`frechet_distance`, `kernel_distance`); the Inception
Score uses torch-fidelity's (`isc_features_to_metric`, from the classifier's logits).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ddpm_hf.errors import UsageError


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [N, D] in float64: all FID needs of a set."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise UsageError(f"Need features of shape [N >= 2, D], got {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID: ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) (Heusel et al. 2017), via clean-fid."""
    from cleanfid.fid import frechet_distance as _fd

    return float(_fd(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64),
                     np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def fid_standard_error(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, rounds: int = 10,
                       seed: int = 0) -> float:
    """The bootstrap standard error of the Fréchet distance of `features` [N, D] to fixed reference statistics: the
    standard deviation of the distance over `rounds` resamplings of the N rows with replacement (the spread a new draw
    of N samples would show; the reference's own sampling is left out, as its statistics are fixed). Seeded."""
    features = np.asarray(features, dtype=np.float64)
    if rounds < 2:
        raise UsageError(f"A bootstrap standard error needs at least 2 rounds, got {rounds}.")
    rng = np.random.default_rng(seed)
    to_reference = FrechetToReference(mu_ref, sigma_ref)
    distances = [to_reference(*feature_statistics(features[rng.integers(0, len(features), len(features))]))
                 for _ in range(rounds)]
    return float(np.std(distances, ddof=1))


class FrechetToReference:
    """The Fréchet distance of many sets' statistics to one fixed reference (the bootstrap's rounds). For PSD S1, S2,
    Tr (S1 S2)^½ = Σ_i √λ_i(R S2 R) with R = S1^½ (A^½B A^½ is similar to AB): R comes from one symmetric
    eigendecomposition, and each set then costs one symmetric eigenvalue problem, where clean-fid's general `sqrtm`
    of S1 S2 (a Schur method) is ~10x slower at D = 2048. Equal to `frechet_distance` within float64 rounding on
    full-rank covariances (a test holds the two together)."""

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, np.float64)
        sigma = np.asarray(sigma_ref, np.float64)
        values, vectors = np.linalg.eigh(sigma)
        self.root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        self.trace = float(np.trace(sigma))

    def __call__(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        sigma = np.asarray(sigma, np.float64)
        values = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        diff = np.asarray(mu, np.float64) - self.mu
        return float(diff @ diff + np.trace(sigma) + self.trace - 2 * np.sqrt(np.clip(values, 0, None)).sum())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018): unbiased MMD² with the cubic polynomial kernel, averaged over subsets,
    via clean-fid. Seeded, so the same features give the same value."""
    from cleanfid.fid import kernel_distance

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(np.asarray(features1, np.float64), np.asarray(features2, np.float64),
                                     num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


def inception_score(logits, splits: int = 10) -> Tuple[float, float]:
    """Inception Score (Salimans et al. 2016), exp E_x KL(p(y|x) || p(y)), as mean and std over `splits`
    parts, from classifier logits [N, classes], via torch-fidelity (no shuffling: deterministic)."""
    import torch
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    logits = torch.as_tensor(np.asarray(logits))
    if logits.dim() != 2 or logits.shape[0] < splits:
        raise UsageError(f"Need logits of shape [N >= splits={splits}, classes], got {tuple(logits.shape)}.")
    out = isc_features_to_metric(logits, splits=splits, shuffle=False)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def improved_precision_recall(generated, real, k: int = 3) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of generated features against real ones, via
    torch-fidelity: precision is the share of generated samples inside some real sample's ball (radius: its distance
    to its k-th nearest real neighbour), recall the share of real samples inside some generated sample's ball."""
    import torch
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    generated = torch.as_tensor(np.asarray(generated, dtype=np.float64))
    real = torch.as_tensor(np.asarray(real, dtype=np.float64))
    if generated.shape[0] <= k or real.shape[0] <= k or generated.shape[1] != real.shape[1]:
        raise UsageError(f"Precision/recall with k={k} needs more than {k} feature rows of one width on each side; "
                         f"got {tuple(generated.shape)} and {tuple(real.shape)}.")
    precision, recall = calculate_precision_recall_part(generated, real, neighborhood=k)
    return float(precision), float(recall)
