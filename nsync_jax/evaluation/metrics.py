"""Set-level metric math on embeddings: CSD style score, CMMD, KID and FID.

Everything here takes NumPy arrays of per-image embeddings (one row per image) and returns
floats; the embedders live in `clip_embed.py` and `inception.py`. The math runs in
float64 NumPy: the sets are small (hundreds of images), float64 makes the closed forms
exact enough to test, and FID must match pytorch-fid, which is float64 SciPy.

References (each function cites its formula):
  CSD: Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models".
  CMMD: Jayasumana et al. 2024, "Rethinking FID: Towards a Better Evaluation Metric for
    Image Generation" (google-research/cmmd, distance.py).
  KID: Bińkowski et al. 2018, "Demystifying MMD GANs" (as torch-fidelity/torchmetrics).
  FID: Heusel et al. 2017 (as pytorch-fid's `calculate_frechet_distance`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import scipy.linalg

CMMD_SIGMA = 10.0  # RBF bandwidth of the CMMD reference code.
CMMD_SCALE = 1000.0  # CMMD is reported ×1000.


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (num_images, dim) array, got {x.shape}")
    return x


def _check_pair(real: np.ndarray, generated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    real = _as_matrix(real, "real embeddings")
    generated = _as_matrix(generated, "generated embeddings")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(
            f"real and generated embeddings differ in width: {real.shape} vs {generated.shape}"
        )
    return real, generated


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def csd_score(real: np.ndarray, generated: np.ndarray) -> float:
    """Mean over generated images of cos(style(gen_i), mean_j style(real_j)).

    The rows are CSD style embeddings (already L2-normalised by the embedder); their mean
    is not unit length, so the cosine normalises it again.
    """
    real, generated = _check_pair(real, generated)
    centre = l2_normalize(real.mean(axis=0))
    return float(np.mean(l2_normalize(generated) @ centre))


def _sq_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # The reference expands ‖x‖² − 2x·y + ‖y‖²; in float64 that is exact enough and keeps
    # the same arithmetic. Clamped at 0 against rounding.
    d = (x * x).sum(1)[:, None] - 2.0 * x @ y.T + (y * y).sum(1)[None, :]
    return np.maximum(d, 0.0)


def cmmd(real: np.ndarray, generated: np.ndarray, sigma: float = CMMD_SIGMA) -> float:
    """CMMD: biased MMD² with an RBF kernel over all images, ×1000.

        k(x, y) = exp(−‖x − y‖² / (2σ²)),   σ = 10
        CMMD = 1000 · (mean k(X, X) + mean k(Y, Y) − 2 · mean k(X, Y))

    The means include the diagonal (the "biased" estimator of the reference code), so a
    set against itself gives exactly 0 and one image against one image gives
    1000 · (2 − 2·exp(−‖x − y‖² / 200)). Inputs are L2-normalised CLIP embeddings.
    """
    real, generated = _check_pair(real, generated)
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = np.exp(-gamma * _sq_distances(real, real)).mean()
    k_yy = np.exp(-gamma * _sq_distances(generated, generated)).mean()
    k_xy = np.exp(-gamma * _sq_distances(real, generated)).mean()
    return float(CMMD_SCALE * (k_xx + k_yy - 2.0 * k_xy))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with the cubic kernel k(a, b) = (a·b / d + 1)³ (one KID subset).

        MMD² = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (m(m−1))
               − 2 Σ_{i,j} k(x_i, y_j) / m²

    for two sets of equal size m ≥ 2.
    """
    m, d = x.shape
    if y.shape != (m, d) or m < 2:
        raise ValueError(f"KID subsets must have equal size >= 2, got {x.shape} and {y.shape}")
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / (m * m))


@dataclasses.dataclass(frozen=True)
class KID:
    """KID over random subsets, with the sizes used (small sets are the normal case)."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def kid(
    real: np.ndarray,
    generated: np.ndarray,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
) -> KID:
    """Kernel Inception Distance: unbiased polynomial MMD² averaged over random subsets.

    Each of `num_subsets` rounds draws `subset_size = min(n_real, n_gen, max_subset_size)`
    rows of each set without replacement (as torch-fidelity and torchmetrics do) and
    computes `polynomial_mmd2_unbiased`; the result is their mean and population standard
    deviation. When both sets are no larger than `max_subset_size` and of equal size,
    every subset is the whole set: the std is then 0 and the value does not depend on row
    order.
    """
    real, generated = _check_pair(real, generated)
    if num_subsets < 1 or max_subset_size < 2:
        raise ValueError(
            f"kid needs num_subsets >= 1 and max_subset_size >= 2, got {num_subsets}, "
            f"{max_subset_size}"
        )
    size = min(len(real), len(generated), max_subset_size)
    if size < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(real)}, {len(generated)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        rows_real = rng.choice(len(real), size, replace=False)
        rows_gen = rng.choice(len(generated), size, replace=False)
        values.append(polynomial_mmd2_unbiased(real[rows_real], generated[rows_gen]))
    values = np.asarray(values)
    return KID(float(values.mean()), float(values.std()), size, num_subsets)


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are observations, N−1 normalisation) as pytorch-fid."""
    features = _as_matrix(features, "features")
    if len(features) < 2:
        raise ValueError("FID needs at least 2 images per set for a covariance")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance of two Gaussians, as pytorch-fid's `calculate_frechet_distance`.

        d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)

    `scipy.linalg.sqrtm` of the product; when it is not finite (a singular product, the
    norm with fewer images than 2048 dimensions) it retries with `eps` added to both
    diagonals; a complex result with a non-negligible imaginary diagonal (> 1e-3) is an
    error, otherwise the real part is used.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("FID: the two sets' means or covariances differ in shape")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logging.warning("FID: singular product; adding %g to the covariance diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(real: np.ndarray, generated: np.ndarray) -> float:
    """FID between two sets of Inception pool3 features."""
    real, generated = _check_pair(real, generated)
    return frechet_distance(*gaussian_statistics(real), *gaussian_statistics(generated))


def fid_bootstrap(
    real: np.ndarray, generated: np.ndarray, num_resamples: int, seed: int = 0
) -> tuple[float, float]:
    """Mean and population std of FID over bootstrap resamples.

    Each resample draws both sets with replacement at their own sizes. (The NSYNC paper
    reports FID over 10 bootstrap resamples; its exact resampling scheme is not public,
    this is our reading.)
    """
    real, generated = _check_pair(real, generated)
    if num_resamples < 1:
        raise ValueError(f"fid_bootstrap needs num_resamples >= 1, got {num_resamples}")
    rng = np.random.default_rng(seed)
    values = [
        fid(
            real[rng.integers(0, len(real), len(real))],
            generated[rng.integers(0, len(generated), len(generated))],
        )
        for _ in range(num_resamples)
    ]
    return float(np.mean(values)), float(np.std(values))
