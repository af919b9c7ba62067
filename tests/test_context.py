"""Context graph construction, random walks (transition frequencies, path weights), the CPR loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chmr_jax.mechanisms import context as C


def small_csr():
    # 0 -> {1 (0.5), 2 (0.25), 3 (1.0)}; 1 -> {0 (0.5)}; 2 -> {0 (0.25)}; 3 -> {0 (1.0)}; 4 isolated
    indptr = np.array([0, 3, 4, 5, 6, 6], np.int32)
    indices = np.array([1, 2, 3, 0, 0, 0], np.int32)
    weights = np.array([0.5, 0.25, 1.0, 0.5, 0.25, 1.0], np.float32)
    return indptr, indices, weights


def test_walk_transition_frequencies_match_the_graph():
    indptr, indices, weights = small_csr()
    starts = jnp.zeros(30000, jnp.int32)
    nodes, _ = C.random_walks(indptr, indices, weights, starts, jax.random.key(0), length=1)
    freq = np.bincount(np.asarray(nodes[:, 1]), minlength=5) / 30000
    # uniform over the 3 neighbours of node 0: 4 sigma of a binomial with p = 1/3 is ~0.011
    np.testing.assert_allclose(freq[1:4], 1 / 3, atol=0.011)
    assert freq[0] == 0 and freq[4] == 0


def test_path_weights_are_the_traversed_edges_and_stuck_walks_stay():
    indptr, indices, weights = small_csr()
    starts = jnp.array([0, 1, 2, 3, 4] * 20, jnp.int32)
    nodes, beta = C.random_walks(indptr, indices, weights, starts, jax.random.key(1), length=4)
    nodes, beta = np.asarray(nodes), np.asarray(beta)
    assert nodes.shape == beta.shape == (100, 5)
    edge_w = {(s, int(indices[e])): float(weights[e]) for s in range(5) for e in range(indptr[s], indptr[s + 1])}
    for path, b in zip(nodes, beta):
        expected = [1.0]
        for u, v in zip(path[:-1], path[1:]):
            assert (u, v) in edge_w or (u == v == 4)
            expected.append(expected[-1] * edge_w.get((u, v), 0.0))
        np.testing.assert_allclose(b, expected, rtol=1e-6)
    stuck = nodes[starts == 4]
    assert (stuck == 4).all() and (beta[np.asarray(starts) == 4][:, 1:] == 0).all()


def test_reconstruction_loss_matches_numpy_and_never_nans():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)).astype(np.float32)
    targets = rng.random((6, 4)).astype(np.float32)
    mask = rng.random((6, 4)) > 0.3
    beta = rng.random(6).astype(np.float32)
    targets_nan = np.where(mask, targets, np.nan)
    bce = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    ref = (bce * mask * beta[:, None]).sum() / mask.sum()
    np.testing.assert_allclose(C.reconstruction_loss(logits, targets_nan, mask, beta), ref, rtol=1e-5)
    mse = ((1 / (1 + np.exp(-logits)) - targets) ** 2 * mask * beta[:, None]).sum() / mask.sum()
    np.testing.assert_allclose(C.reconstruction_loss(logits, targets_nan, mask, beta, "mse"), mse, rtol=1e-5)
    # No target of this type in the batch: 0, with finite gradients.
    empty = np.zeros_like(mask)
    value, grad = jax.value_and_grad(C.reconstruction_loss)(jnp.asarray(logits), targets_nan, empty, beta)
    assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()
    grad = jax.grad(C.reconstruction_loss)(jnp.asarray(logits), targets_nan, mask, beta)
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match="bce"):
        C.reconstruction_loss(logits, targets, mask, beta, "l1")


def test_bisection_threshold():
    values = np.linspace(0, 1, 10001)
    # fraction above t is 1 - t: for sparsity 0.9 the threshold is ~0.9
    assert abs(C.bisection_threshold(values, floor=0.0, sparsity=0.9) - 0.9) < 2e-3
    # never below the floor, even when almost nothing is similar
    assert C.bisection_threshold(np.full(100, 0.1), floor=0.8) >= 0.8


def test_build_context_graph():
    rng = np.random.default_rng(0)
    n_mol = 40
    bits = (rng.random((n_mol, 64)) < 0.3).astype(np.uint8)
    bits[1] = bits[0]                                  # same scaffold, identical -> similarity 1
    scaffolds = ["s0", "s0"] + [f"s{i % 5}" for i in range(2, n_mol)]
    targets = (rng.random((n_mol, 16)) < 0.5).astype(np.float32)
    cell = C.ProfileBlock(features=rng.normal(size=(12, 8)), molecule=np.arange(0, 24, 2))
    expr = rng.normal(size=(6, 5))
    expr[0, 3] = 50.0                                  # the top |z| entry -> molecule 0 - gene 3
    expression = C.ProfileBlock(features=expr, molecule=np.array([0, 3, 6, 9, 12, 15]))
    g = C.build_context_graph(bits, targets, scaffolds, {"cell": cell, "expression": expression},
                              gene_edges=np.array([[0, 1], [1, 2]]), n_genes=5, expression="expression",
                              expression_genes=np.arange(5), gene_quantile=0.99, n_clusters=3)
    assert g.type_names == ["molecule", "cell", "expression", "gene_node"]
    assert g.n_nodes == 40 + 12 + 6 + 5
    edges = {}
    for v in range(g.n_nodes):
        for u, w in zip(*g.neighbours(v)):
            edges[(v, int(u))] = float(w)
    assert all(edges[(u, v)] == w for (v, u), w in edges.items())          # undirected
    assert edges[(0, 40)] == 1.0 and edges[(40, 0)] == 1.0                  # molecule 0 - cell row 0
    assert edges[(0, 1)] == 1.0                                             # identical scaffold mates
    gene0 = 40 + 12 + 6
    assert edges[(gene0, gene0 + 1)] == 1.0 and edges[(0, gene0 + 3)] == 1.0  # its row's largest |z|
    assert all(t >= 0.8 for t in g.thresholds.values())
    assert 0.0 <= g.targets["cell"].min() and g.targets["cell"].max() <= 1.0
    np.testing.assert_array_equal(g.targets["molecule"], targets)
    assert g.node_type[40] == 1 and g.node_row[41] == 1 and g.node_type[gene0] == 3
    # Walks run on the stored CSR.
    nodes, beta = C.random_walks(g.indptr, g.indices, g.weights, jnp.arange(4), jax.random.key(0), 4)
    assert nodes.shape == (4, 5) and np.isfinite(np.asarray(beta)).all()


def test_gene_edges_on_the_real_l1000_signatures(data_dir):
    # The L1000 consensus signatures (1,170 compounds x 978 landmark genes): every compound with a
    # signature links to genes, none to more than ~1% of them (the spec's top 1%), and the weights
    # say how strongly: they lie in (0, 1] and differ.
    from chmr_jax.data import profiles
    l1000 = data_dir / "profiles" / "l1000"
    table = profiles.read_l1000_consensus(l1000 / "consensi-drugbank.tsv.gz", l1000 / "drugbank_structures.tsv")
    n_mol, n_genes = table.values.shape
    assert n_genes == 978 and n_mol > 1000
    block = C.ProfileBlock(features=table.values, molecule=np.arange(n_mol))
    g = C.build_context_graph(np.zeros((n_mol, 8), np.uint8), np.zeros((n_mol, 4), np.float32), [None] * n_mol,
                              {"expression": block}, n_genes=n_genes, expression="expression",
                              expression_genes=np.arange(n_genes), gene_quantile=0.99)
    gene0 = g.n_nodes - n_genes
    per_mol, weights = [], []
    for v in range(n_mol):
        nbr, w = g.neighbours(v)
        per_mol.append(int(np.sum(nbr >= gene0)))
        weights.append(w[nbr >= gene0])
    per_mol, weights = np.array(per_mol), np.concatenate(weights)
    assert per_mol.min() >= 1, f"{np.sum(per_mol == 0)} of {n_mol} compounds have no gene edge"
    assert per_mol.max() <= np.ceil(0.01 * n_genes), per_mol.max()
    assert weights.min() > 0 and weights.max() <= 1
    assert np.median(weights) < 1 and np.unique(weights).size > n_mol, "the weights carry no information"


def test_minmax_scale_masks_nan():
    x = np.array([[0.0, np.nan], [5.0, 2.0], [10.0, 4.0]])
    scaled, mask = C.minmax_scale(x)
    np.testing.assert_allclose(scaled, [[0, 0], [0.5, 0], [1, 1]])
    assert mask.tolist() == [[True, False], [True, True], [True, True]]


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_walk_reconstruction_loss_equals_the_repeated_logits_form(kind):
    rng = np.random.default_rng(0)
    g, s, t = 6, 5, 7
    logits = jnp.asarray(rng.normal(size=(g, t)), jnp.float32)
    targets = jnp.asarray(rng.random((g, s, t)), jnp.float32).at[0, 0, 0].set(jnp.nan)
    mask = jnp.asarray(rng.random((g, s, t)) < 0.6).at[0, 0, 0].set(False)
    beta = jnp.asarray(rng.random((g, s)), jnp.float32)

    def repeated(lg):
        return C.reconstruction_loss(jnp.broadcast_to(lg[:, None], (g, s, t)).reshape(g * s, t),
                                           targets.reshape(g * s, t), mask.reshape(g * s, t), beta.reshape(-1), kind)

    fused = lambda lg: C.walk_reconstruction_loss(lg, targets, mask, beta, kind)
    np.testing.assert_allclose(fused(logits), repeated(logits), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(fused)(logits), jax.grad(repeated)(logits), rtol=1e-4, atol=1e-7)
    assert C.walk_reconstruction_loss(logits, targets, jnp.zeros_like(mask), beta, kind) == 0.0


def pca_score_atol(x, block, m):
    """Bound on |pca - exact| per score, from the arithmetic (x float64 [n, d], the data pca saw).

    pca accumulates the covariance (n >= d) or Gram (n < d) matrix of the centred rows from float32 dot
    products of L terms (L = block rows, or d for the Gram), each centred value within eps (|x| + |mean|)
    of exact; so |E_jk| <= (L + 3) eps sum (|x| + |mean|)_j (|x| + |mean|)_k and ||E||_2 <= ||that||_F.
    Davis-Kahan: each top eigenvector moves by sin(theta) <= ||E||_2 / gap (gap: its eigenvalue's
    distance to the others), i.e. by at most sqrt(2) sin(theta) in norm. Scores then move by
      covariance: |c_i . dv_j| + the float32 projection (d eps ||c_i||) <= (sqrt(2) sin + d eps) max_i ||c_i||
      Gram:       |du_ij| s_j + |ds_j| <= sqrt(2) sin s_1 + ||E||_2 / (2 s_m) (Weyl), + eps s_1 (float32 cast)."""
    eps = float(np.finfo(np.float32).eps)
    n, d = x.shape
    c = x - x.mean(0)
    a = np.abs(x) + np.abs(x.mean(0))
    e_norm = ((min(block, n) if n >= d else d) + 3) * eps * np.linalg.norm((a.T @ a) if n >= d else (a @ a.T))
    s = np.linalg.svd(c, compute_uv=False)
    lam = s ** 2
    gap = min(min(abs(lam[j] - lam[j + 1]), abs(lam[j - 1] - lam[j]) if j else np.inf) for j in range(m))
    sin_theta = e_norm / gap
    assert sin_theta < 1e-3                           # the bound is tight enough to test something
    if n >= d:
        return (np.sqrt(2) * sin_theta + d * eps) * np.linalg.norm(c, axis=1).max()
    return np.sqrt(2) * sin_theta * s[0] + e_norm / (2 * s[m - 1]) + eps * s[0]


@pytest.mark.parametrize("n,d,block", [(3000, 40, 256), (3000, 40, 1024), (300, 500, 64)])
def test_pca_matches_sklearn_within_the_float32_bound(n, d, block):
    """context.pca (float32 blocks, float64 d x d or n x n accumulation) against sklearn's float64 SVD PCA:
    tall (covariance, 12 or 3 row blocks) and wide (Gram) inputs with planted components of distinct
    variance. Scores agree up to each component's sign within pca_score_atol."""
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(n + d)
    m = 3
    loadings = np.linalg.qr(rng.normal(size=(d, m)))[0].T * np.array([[40.0], [30.0], [20.0]])
    x = (rng.normal(size=(n, m)) @ loadings + rng.normal(size=(n, d)) + 1.0).astype(np.float32)
    got = C.pca(x, m, block=block)
    assert got.dtype == np.float32 and got.shape == (n, m)
    ref = PCA(m, svd_solver="full").fit_transform(x.astype(np.float64))
    ref *= np.sign(np.sum(ref * got, axis=0))         # components are defined up to sign
    atol = pca_score_atol(x.astype(np.float64), block, m)
    assert atol < 0.05 * np.abs(ref).max(axis=0).min()
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    # The sign convention: each component's largest-magnitude score is positive.
    assert (got[np.argmax(np.abs(got), axis=0), np.arange(m)] > 0).all()
    # NaN entries count as 0 (as before the float32 version).
    x[::7, 0] = np.nan
    np.testing.assert_array_equal(C.pca(x, m, block=block), C.pca(np.nan_to_num(x), m, block=block))
