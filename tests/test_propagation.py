"""kNN graph and Eq. 1 propagation against numpy / scipy references and closed forms."""
import numpy as np
import pytest
import scipy.sparse as sp

from chmr_jax.mechanisms import propagation as PR


def brute_force_knn(bits, k):
    b = bits.astype(np.float64)
    inter = b @ b.T
    c = b.sum(1)
    union = c[:, None] + c[None, :] - inter
    sim = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    np.fill_diagonal(sim, -1)
    n = len(b)
    order = np.array([np.lexsort((np.arange(n), -sim[i]))[:k] for i in range(n)])
    return order, np.take_along_axis(sim, order, 1)


def test_tanimoto_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    bits = (rng.random((300, 64)) < 0.2).astype(np.uint8)
    bits[5] = bits[17]                     # duplicates: each other's nearest, similarity 1
    bits[40] = 0                           # an empty fingerprint: similarity 0 to everything
    idx, sim = PR.tanimoto_knn(np.packbits(bits, axis=1), k=7, block=64, n_bits=64)
    ref_idx, ref_sim = brute_force_knn(bits, 7)
    np.testing.assert_allclose(sim, ref_sim, rtol=1e-6)
    np.testing.assert_array_equal(idx, ref_idx)
    assert (idx != np.arange(300)[:, None]).all()
    assert idx[5, 0] == 17 and sim[5, 0] == 1.0 and idx[17, 0] == 5
    assert (sim[40] == 0).all()


def line_graph(n_extra_isolated=0):
    # 0 - 1 - 2 - 3 chain (similarities 1), plus an isolated pair 4 - 5.
    idx = np.array([[1, 1], [0, 2], [1, 3], [2, 2], [5, 5], [4, 4]])
    sim = np.array([[1, 0], [1, 1], [1, 1], [1, 0], [1, 0], [1, 0]], float)
    return PR.build_graph(idx, sim, symmetrize=True)


def test_build_graph_row_normalised_symmetric_affinities():
    rng = np.random.default_rng(1)
    bits = (rng.random((200, 64)) < 0.2).astype(np.uint8)
    idx, sim = PR.tanimoto_knn(np.packbits(bits, axis=1), k=5, block=64, n_bits=64)
    g = PR.build_graph(idx, sim, symmetrize=True)
    w = sp.csr_matrix((np.asarray(g.weights), np.asarray(g.cols), np.asarray(g.indptr)), shape=(200, 200))
    assert (w.data >= 0).all() and w.diagonal().sum() == 0
    np.testing.assert_allclose(np.asarray(w.sum(1)).ravel(), 1.0, rtol=1e-5)
    a = sp.diags(np.asarray(g.degree)) @ w                  # A = D W must be symmetric
    np.testing.assert_allclose(a.toarray(), a.T.toarray(), atol=1e-6)
    directed = PR.build_graph(idx, sim, symmetrize=False)
    assert int(np.asarray(directed.indptr)[-1]) <= 200 * 5


@pytest.mark.parametrize("fmt", PR.FORMATS)
def test_spmm_formats_match_scipy(fmt):
    rng = np.random.default_rng(2)
    bits = (rng.random((150, 64)) < 0.2).astype(np.uint8)
    idx, sim = PR.tanimoto_knn(np.packbits(bits, axis=1), k=6, block=64, n_bits=64)
    g = PR.build_graph(idx, sim)
    w = sp.csr_matrix((np.asarray(g.weights), np.asarray(g.cols), np.asarray(g.indptr)), shape=(150, 150))
    x = rng.normal(size=(150, 9)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(PR.spmm(g, x, fmt)), w @ x, rtol=1e-5, atol=1e-6)


def test_one_step_closed_form_and_clamping():
    g = line_graph()
    x = np.array([[2.0], [99], [99], [10.0], [99], [99]], np.float32)   # 99 = ignored values
    observed = np.array([True, False, False, True, False, False])
    r = PR.propagate(g, x, observed, steps=1, fallback="mean")
    out = np.asarray(r.x)[:, 0]
    # Row 1 = (x0 + x2)/2 with x2^(0) = 0 -> 1; row 2 = (0 + 10)/2 = 5; observed rows unchanged;
    # 4, 5 have no path to an observed row -> observed mean (2 + 10)/2 = 6 and flagged.
    np.testing.assert_allclose(out, [2, 1, 5, 10, 6, 6])
    assert np.asarray(r.reached).tolist() == [True, True, True, True, False, False]
    zero = PR.propagate(g, x, observed, steps=1, fallback="zero")
    np.testing.assert_allclose(np.asarray(zero.x)[4:, 0], 0)


def test_converges_to_harmonic_extension_with_monotone_energy():
    rng = np.random.default_rng(3)
    bits = (rng.random((120, 48)) < 0.25).astype(np.uint8)
    idx, sim = PR.tanimoto_knn(np.packbits(bits, axis=1), k=6, block=64, n_bits=48)
    g = PR.build_graph(idx, sim)
    x = rng.normal(size=(120, 3)).astype(np.float32)
    observed = rng.random(120) < 0.3
    r = PR.propagate(g, x, observed, steps=400)
    energy = np.asarray(r.energy)
    assert (np.diff(energy) <= 1e-4 * energy[0]).all() and energy[-1] < energy[0]
    # Reference: solve L_UU x_U = -L_UL x_L with L = D - A (scipy sparse, float64).
    w = sp.csr_matrix((np.asarray(g.weights, np.float64), np.asarray(g.cols), np.asarray(g.indptr)), shape=(120, 120))
    a = sp.diags(np.asarray(g.degree, np.float64)) @ w
    lap = (sp.diags(np.asarray(a.sum(1)).ravel()) - a).tocsr()
    u, l = ~observed & np.asarray(r.reached), observed
    ref = np.zeros_like(x, dtype=np.float64)
    ref[l] = x[l]
    ref[u] = sp.linalg.spsolve(lap[u][:, u].tocsc(), -(lap[u][:, l] @ x[l].astype(np.float64)))
    np.testing.assert_allclose(np.asarray(r.x)[u | l], ref[u | l], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(r.x)[observed], x[observed])


def test_dirichlet_energy_matches_definition():
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 30, size=(30, 4))
    sim = rng.random((30, 4))
    g = PR.build_graph(idx, sim)
    x = rng.normal(size=(30, 5)).astype(np.float32)
    w = sp.csr_matrix((np.asarray(g.weights), np.asarray(g.cols), np.asarray(g.indptr)), shape=(30, 30))
    a = (sp.diags(np.asarray(g.degree)) @ w).tocoo()
    ref = sum(v * np.sum((x[i] - x[j]) ** 2) for i, j, v in zip(a.row, a.col, a.data))
    np.testing.assert_allclose(float(PR.dirichlet_energy(g, x)), ref, rtol=1e-4)


def test_width_chunks_equal_full_width():
    rng = np.random.default_rng(5)
    bits = (rng.random((80, 32)) < 0.3).astype(np.uint8)
    g = PR.build_graph(*PR.tanimoto_knn(np.packbits(bits, axis=1), k=4, block=32, n_bits=32))
    x = rng.normal(size=(80, 13)).astype(np.float32)
    observed = rng.random(80) < 0.4
    full = PR.propagate(g, x, observed, steps=5, width_chunk=None)
    chunked = PR.propagate(g, x, observed, steps=5, width_chunk=4)
    np.testing.assert_allclose(chunked.x, full.x, rtol=1e-6)
    np.testing.assert_allclose(chunked.energy, full.energy, rtol=1e-5)
    with pytest.raises(ValueError, match="fallback"):
        PR.propagate(g, x, observed, fallback="median")
