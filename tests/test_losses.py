"""InfoNCE (dense / chunked / ring) and VICReg against numpy references and closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from chmr_jax.mechanisms import losses


def numpy_infonce(a, p, mask, tau, symmetric):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    s = (a @ p.T / tau).astype(np.float64)[np.ix_(mask, mask)]
    def lse(x, axis):
        m = x.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)
    row = np.mean(lse(s, 1) - np.diag(s))
    col = np.mean(lse(s, 0) - np.diag(s))
    return 0.5 * (row + col) if symmetric else row


def data(n=64, d=16, seed=0, frac=0.3):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)).astype(np.float32)
    p = (a + 0.7 * rng.normal(size=(n, d))).astype(np.float32)
    mask = rng.random(n) > frac
    return a, p, mask


def test_closed_form_two_orthogonal_pairs():
    e = np.eye(2, dtype=np.float32)
    # logits = I / tau; each row: log(e^(1/tau) + 1) - 1/tau
    expected = math.log(math.exp(1 / 0.5) + 1) - 1 / 0.5
    assert np.isclose(float(losses.infonce_dense(e, e, tau=0.5)), expected, rtol=1e-6)
    assert np.isclose(float(losses.infonce_chunked(e, e, tau=0.5, block=1)), expected, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_matches_numpy(symmetric):
    a, p, mask = data()
    got = float(losses.infonce_dense(a, p, jnp.asarray(mask), 0.2, symmetric))
    assert np.isclose(got, numpy_infonce(a, p, mask, 0.2, symmetric), rtol=1e-5)


def assert_agree(value, grads, ref_value, ref_grads, tol=1e-5):
    """Agreement to 1e-5: the value absolutely, each gradient relative to its largest entry."""
    np.testing.assert_allclose(value, ref_value, rtol=tol, atol=tol)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def value_and_grads(fn, a, p):
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(a, p)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [7, 64, 100])
def test_chunked_matches_dense_value_and_grad(symmetric, block):
    a, p, mask = data(n=70)
    m = jnp.asarray(mask)
    v0, g0 = value_and_grads(lambda a, p: losses.infonce_dense(a, p, m, 0.2, symmetric), a, p)
    v1, g1 = value_and_grads(lambda a, p: losses.infonce_chunked(a, p, m, 0.2, symmetric, block), a, p)
    assert_agree(v1, g1, v0, g0)


# 12 rows per device: the whole shard as one tile, or ragged 5-row tiles (2 full + 1 padded)
@pytest.mark.parametrize("symmetric, block", [(False, None), (True, None), (True, 5)])
def test_ring_matches_dense_on_8_devices(mesh8, symmetric, block):
    a, p, mask = data(n=96, seed=3)
    m = jnp.asarray(mask)
    v0, g0 = value_and_grads(lambda a, p: losses.infonce_dense(a, p, m, 0.2, symmetric), a, p)
    v1, g1 = value_and_grads(lambda a, p: losses.infonce_ring(a, p, m, 0.2, symmetric, mesh=mesh8, block=block),
                             a, p)
    assert_agree(v1, g1, v0, g0)


def test_masking_excludes_rows_entirely():
    a, p, mask = data(n=32)
    full = losses.infonce_dense(a[mask], p[mask], tau=0.2)
    masked = losses.infonce_dense(a, p, jnp.asarray(mask), tau=0.2)
    # Changing a masked row must not change the loss.
    a2 = a.copy()
    a2[~mask] = 100.0
    np.testing.assert_allclose(masked, full, rtol=1e-6)
    np.testing.assert_allclose(losses.infonce_chunked(a2, p, jnp.asarray(mask), 0.2, block=5), full, rtol=1e-5)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_all_masked_is_zero_and_finite(impl):
    a, p, _ = data(n=16)
    mask = jnp.zeros(16, bool)
    fn = lambda a, p: losses.infonce(a, p, mask, 0.2, True, impl=impl, block=4)
    v, g = value_and_grads(fn, a, p)
    assert float(v) == 0.0 and all(np.isfinite(np.asarray(x)).all() for x in g)


def numpy_vicreg(x, y, eps=1e-4):
    n, d = x.shape
    inv = np.mean((x - y) ** 2)
    def terms(v):
        vc = v - v.mean(0)
        cov = vc.T @ vc / (n - 1)
        std = np.sqrt(np.var(v, axis=0, ddof=1) + eps)
        off = cov - np.diag(np.diag(cov))
        return np.mean(np.maximum(0, 1 - std)), np.sum(off ** 2) / d
    vx, cx = terms(x)
    vy, cy = terms(y)
    return inv, vx + vy, cx + cy


def test_vicreg_matches_numpy_and_weights():
    rng = np.random.default_rng(0)
    x = (0.5 * rng.normal(size=(40, 6))).astype(np.float32)
    y = (x + 0.1 * rng.normal(size=(40, 6))).astype(np.float32)
    total, parts = losses.vicreg(x, y, inv_weight=2.0, var_weight=3.0, cov_weight=0.5)
    inv, var, cov = numpy_vicreg(x.astype(np.float64), y.astype(np.float64))
    np.testing.assert_allclose([parts["invariance"], parts["variance"], parts["covariance"]], [inv, var, cov], rtol=1e-4)
    np.testing.assert_allclose(total, 2 * inv + 3 * var + 0.5 * cov, rtol=1e-4)
    # Masked rows take no part.
    mask = rng.random(40) > 0.25
    t_masked, _ = losses.vicreg(x, y, jnp.asarray(mask))
    t_sub, _ = losses.vicreg(x[mask], y[mask])
    np.testing.assert_allclose(t_masked, t_sub, rtol=1e-5)


def test_vicreg_closed_form_identical_whitened_views():
    # Columns +-1 with unbiased variance > 1 and zero covariance: only the eps shift remains.
    x = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
    total, parts = losses.vicreg(x, x)
    assert float(parts["invariance"]) == 0.0 and abs(float(parts["covariance"])) < 1e-12
    assert float(parts["variance"]) == 0.0          # std = sqrt(4/3 + 1e-4) > 1


def test_vicreg_variance_hinges_of_the_two_views_add():
    # Two collapsed (constant) views: each view's hinge is 1 - sqrt(eps); the release adds them.
    x = np.zeros((6, 3), np.float32)
    _, parts = losses.vicreg(x, x + 1.0)
    np.testing.assert_allclose(parts["variance"], 2 * (1 - np.sqrt(1e-4)), rtol=1e-6)
    assert float(parts["invariance"]) == 1.0


def test_vicreg_global_statistics_under_shard_map(mesh8):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x + rng.normal(size=(64, 5))).astype(np.float32)
    mask = jnp.asarray(rng.random(64) > 0.2)
    ref, ref_parts = losses.vicreg(x, y, mask)
    sharded = jax.shard_map(lambda a, b, m: losses.vicreg(a, b, m, axis_name="data"), mesh=mesh8,
                            in_specs=(P("data"), P("data"), P("data")), out_specs=(P(), P()))
    got, parts = jax.jit(sharded)(x, y, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    for k in ref_parts:
        np.testing.assert_allclose(parts[k], ref_parts[k], rtol=1e-5, atol=1e-7)
    # Per-device statistics (what a naive data-parallel VICReg computes) would differ.
    local, _ = losses.vicreg(x[:8], y[:8], mask[:8])
    assert not np.isclose(float(local), float(ref))
