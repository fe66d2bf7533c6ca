"""Metric math against independent NumPy references of each public formula and closed forms."""

import itertools

import numpy as np
import pytest
import scipy.spatial.distance
from hypothesis import given, settings
from hypothesis import strategies as st

from nsync_jax.evaluation import metrics


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- CSD --------------------------------------------------------------------------------


def test_csd_score_matches_loop_of_cosines():
    rng = np.random.default_rng(0)
    real, gen = _unit(rng, 7, 5), _unit(rng, 4, 5)
    centre = real.mean(0)
    expected = np.mean([g @ centre / (np.linalg.norm(g) * np.linalg.norm(centre)) for g in gen])
    assert metrics.csd_score(real, gen) == pytest.approx(expected, abs=1e-12)
    assert metrics.csd_score(real[:1], real[:1]) == pytest.approx(1.0)


# --- CMMD -------------------------------------------------------------------------------


def _cmmd_reference(x, y, sigma=10.0):
    # google-research/cmmd distance.py: biased means of exp(-‖a-b‖²/(2σ²)), ×1000.
    k = lambda a, b: np.exp(-scipy.spatial.distance.cdist(a, b, "sqeuclidean") / (2 * sigma**2))  # noqa: E731
    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def test_cmmd_matches_reference():
    rng = np.random.default_rng(1)
    real, gen = _unit(rng, 9, 16), _unit(rng, 6, 16) * 3.0
    assert metrics.cmmd(real, gen) == pytest.approx(_cmmd_reference(real, gen), rel=1e-10)


def test_cmmd_of_a_set_with_itself_is_zero():
    x = _unit(np.random.default_rng(2), 12, 8)
    assert metrics.cmmd(x, x) == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-5, 5), min_size=3, max_size=3),
    st.lists(st.floats(-5, 5), min_size=3, max_size=3),
)
def test_cmmd_one_vs_one_closed_form(a, b):
    x, y = np.array([a]), np.array([b])
    expected = 1000 * (2 - 2 * np.exp(-np.sum((x - y) ** 2) / 200))
    assert metrics.cmmd(x, y) == pytest.approx(expected, abs=1e-8)


# --- KID --------------------------------------------------------------------------------


def _mmd2_unbiased_loops(x, y):
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    xx = sum(k(x[i], x[j]) for i, j in pairs) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    return xx + yy - 2 * xy


def test_polynomial_mmd_matches_loops():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5
    assert metrics.polynomial_mmd2_unbiased(x, y) == pytest.approx(
        _mmd2_unbiased_loops(x, y), rel=1e-10
    )


def test_kid_small_sets_use_whole_set_and_ignore_order():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(10, 8)), rng.normal(size=(10, 8)) + 0.3
    result = metrics.kid(real, gen, num_subsets=5, max_subset_size=1000, seed=0)
    assert result.subset_size == 10 and result.num_subsets == 5
    assert result.std == pytest.approx(0.0, abs=1e-12)
    assert result.mean == pytest.approx(_mmd2_unbiased_loops(real, gen), rel=1e-10)
    shuffled = metrics.kid(real[::-1], gen[rng.permutation(10)], num_subsets=5, seed=7)
    assert shuffled.mean == pytest.approx(result.mean, rel=1e-10)


def test_kid_subsets_are_seeded_and_sized_by_the_smaller_set():
    rng = np.random.default_rng(5)
    real, gen = rng.normal(size=(30, 4)), rng.normal(size=(12, 4))
    a = metrics.kid(real, gen, num_subsets=20, max_subset_size=8, seed=1)
    b = metrics.kid(real, gen, num_subsets=20, max_subset_size=8, seed=1)
    c = metrics.kid(real, gen, num_subsets=20, max_subset_size=8, seed=2)
    assert a == b and a.mean != c.mean and a.subset_size == 8 and a.std > 0
    assert metrics.kid(real, gen, num_subsets=3).subset_size == 12


def test_kid_rejects_tiny_sets():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.kid(np.zeros((1, 3)), np.zeros((5, 3)))


# --- FID --------------------------------------------------------------------------------


def _fid_reference(x, y):
    # Tr((Σ1Σ2)^½) = Σ √λ over the (real, non-negative) eigenvalues of Σ1Σ2.
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return (
        np.sum((mu1 - mu2) ** 2)
        + np.trace(s1)
        + np.trace(s2)
        - 2 * np.sum(np.sqrt(eig.real.clip(0)))
    )


def test_fid_matches_eigenvalue_reference():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(50, 6))
    y = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6)) + 1.0
    assert metrics.fid(x, y) == pytest.approx(_fid_reference(x, y), rel=1e-8)


def test_fid_closed_forms():
    x = np.random.default_rng(7).normal(size=(30, 5))
    assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    # 1-D Gaussians: (μ1 − μ2)² + σ1² + σ2² − 2σ1σ2.
    assert metrics.frechet_distance(
        np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])
    ) == pytest.approx(4 + 4 + 9 - 12)


def test_fid_with_fewer_images_than_dimensions_is_finite():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    value = metrics.fid(x, y)
    assert np.isfinite(value) and value > 0


def test_fid_retries_a_non_finite_sqrtm_with_eps(monkeypatch):
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    real_sqrtm, calls = metrics.scipy.linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky_sqrtm)
    eps = 1e-3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    value = metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2, eps=eps)
    offset = eps * np.eye(3)
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    assert np.isfinite(value) and value == pytest.approx(metrics.fid(x, y), abs=1e-2)


def test_fid_bootstrap_is_the_fid_of_resamples_of_both_sets():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(30, 3)) + 1
    mean, std = metrics.fid_bootstrap(x, y, 4, seed=0)
    # By hand, as documented: per resample, each set drawn with replacement at its own size
    # (the real set first) from `default_rng(seed)`. The eigenvalue reference agrees with
    # `fid` to rounding (test_fid_matches_eigenvalue_reference), so 1e-8 relative.
    draw = np.random.default_rng(0)
    values = [
        _fid_reference(x[draw.integers(0, 20, 20)], y[draw.integers(0, 30, 30)]) for _ in range(4)
    ]
    assert mean == pytest.approx(np.mean(values), rel=1e-8)
    assert std == pytest.approx(np.std(values), rel=1e-6)
    assert std > 0.1  # The resamples' FIDs differ: not one set reused.
    assert metrics.fid_bootstrap(x, y, 4, seed=0) == (mean, std)
    assert metrics.fid_bootstrap(x, y, 4, seed=1)[0] != mean


def test_mismatched_widths_are_errors():
    with pytest.raises(ValueError, match="differ in width"):
        metrics.cmmd(np.zeros((2, 3)), np.zeros((2, 4)))
