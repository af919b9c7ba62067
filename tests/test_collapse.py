"""Collapse measures against closed forms and numpy."""
import numpy as np

from chmr_jax.mechanisms import collapse


def test_effective_rank_closed_forms():
    rng = np.random.default_rng(0)
    # k orthonormal directions with equal variance: effective rank k.
    basis = np.linalg.qr(rng.normal(size=(8, 8)))[0][:3]
    coef = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float64)
    stats = collapse.collapse_stats((coef @ basis).astype(np.float32))
    np.testing.assert_allclose(stats["effective_rank"], 3.0, rtol=1e-4)
    # All rows on one line: rank 1; all rows equal: std 0.
    line = np.outer(rng.normal(size=20), rng.normal(size=5)).astype(np.float32)
    np.testing.assert_allclose(collapse.collapse_stats(line)["effective_rank"], 1.0, rtol=1e-4)
    assert float(collapse.collapse_stats(np.ones((5, 4), np.float32))["std"]) == 0.0


def test_matches_numpy_and_ignores_masked_rows():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(50, 6)) * np.array([3, 2, 1, 1, 0.5, 0.1])).astype(np.float32)
    mask = rng.random(50) > 0.3
    xs = x[mask].astype(np.float64)
    cov = np.cov(xs, rowvar=False)
    p = np.linalg.eigvalsh(cov)
    p = p / p.sum()
    got = collapse.collapse_stats(np.where(mask[:, None], x, 1e3).astype(np.float32), mask)
    np.testing.assert_allclose(got["effective_rank"], np.exp(-np.sum(p * np.log(p))), rtol=1e-4)
    np.testing.assert_allclose(got["std"], np.mean(np.sqrt(np.diag(cov))), rtol=1e-4)


def test_non_finite_rows_give_nan_not_an_error():
    # A diverging step's projections: the statistic is NaN (the step's NaN guard handles the update).
    x = np.ones((6, 4), np.float32)
    x[2, 1] = np.nan
    assert np.isnan(float(collapse.collapse_stats(x)["effective_rank"]))
