"""Context-propagation reconstruction (spec §6): the context graph, random walks, weighted BCE.

Context graph H (host-side numpy, stored as CSR):
  nodes   molecules [0, N_m), then one block of profile nodes per modality, then genes (optional)
  edges   (all undirected, stored in both directions)
          molecule - profile      weight 1 (a profile row belongs to a molecule)
          gene - gene             weight 1 (e.g. Hetionet), optional
          molecule - gene         per expression signature (profile row) its top 1 - `gene_quantile` of
                                  genes by |z| (~10 of 978 L1000 genes), weight |z| / the row's max |z|
          molecule - molecule     Tanimoto within Murcko-scaffold clusters
          profile - profile       Pearson within PCA + KMeans clusters (per modality)
          similarity edges are kept above a threshold found by bisection for `sparsity` (0.995) of
          the within-cluster pairs, never below `floor` (0.8)
  targets per node type in [0, 1] with a mask: molecules -> their Morgan radius-4 bits; profile
          nodes -> their features min-max scaled per column (NaN -> masked); genes -> none.

Walks: uniform random walks of length L in JAX; beta_0 = 1 and beta_l is the product of the
weights of the edges actually traversed; a walk at a node without edges stays put with weight 0.
Loss: beta-weighted BCE-with-logits (or MSE) over non-missing targets, never NaN.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MOLECULE = "molecule"
# Gene nodes (entities, no targets). Not "gene": the paper's genetic-perturbation modality (JUMP
# CRISPR/ORF profiles) is called "gene" and has its own profile nodes and decoder.
GENE = "gene_node"


@dataclasses.dataclass
class ProfileBlock:
    """One cellular modality's profile rows: features [n_rows, d] and the molecule of each row."""
    features: np.ndarray
    molecule: np.ndarray   # int [n_rows], index into the molecule list


@dataclasses.dataclass
class ContextGraph:
    indptr: np.ndarray      # int32 [n_nodes + 1]
    indices: np.ndarray     # int32 [n_edges]
    weights: np.ndarray     # float32 [n_edges]
    node_type: np.ndarray   # int32 [n_nodes], index into type_names
    node_row: np.ndarray    # int32 [n_nodes], row of the node within its type's target matrix
    type_names: list
    targets: dict           # type name -> float32 [n_type, d_type] in [0, 1]
    target_mask: dict       # type name -> bool [n_type, d_type]
    thresholds: dict        # which similarity threshold each intra-type edge set used

    @property
    def n_nodes(self) -> int:
        return len(self.node_type)

    def neighbours(self, v: int):
        s, e = self.indptr[v], self.indptr[v + 1]
        return self.indices[s:e], self.weights[s:e]


def bisection_threshold(values: np.ndarray, floor: float = 0.8, high: float = 0.99,
                        sparsity: float = 0.995, tol: float = 1e-3) -> float:
    """Smallest-interval bisection (as InfoAlign's determine_threshold) for the threshold t in
    [floor, high] at which the fraction of `values` > t is about 1 - sparsity."""
    values = np.asarray(values)
    if values.size == 0:
        return float(floor)
    lo, hi = floor, high
    t = (lo + hi) / 2
    while lo < hi - tol:
        current = 1 - np.count_nonzero(values > t) / values.size
        if current > sparsity:
            hi = t
        else:
            lo = t
        t = (lo + hi) / 2
    return float(t)


def _pairs_within(groups: Sequence[np.ndarray], sim_fn, max_group: int):
    """All within-group pairs (i < j) with their similarity; large groups are cut into pieces."""
    rows, cols, vals = [], [], []
    for g in groups:
        for start in range(0, len(g), max_group):
            piece = g[start:start + max_group]
            if len(piece) < 2:
                continue
            sim = sim_fn(piece)
            iu, ju = np.triu_indices(len(piece), k=1)
            rows.append(piece[iu])
            cols.append(piece[ju])
            vals.append(sim[iu, ju])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def tanimoto_matrix(bits: np.ndarray) -> np.ndarray:
    b = bits.astype(np.float32)
    inter = b @ b.T
    counts = b.sum(1)
    union = counts[:, None] + counts[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def pearson_matrix(x: np.ndarray) -> np.ndarray:
    x = np.nan_to_num(x.astype(np.float64))
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1)
    return (x @ x.T) / np.maximum(norm[:, None] * norm[None, :], 1e-12)


def kmeans(x: np.ndarray, n_clusters: int, seed: int = 0, iters: int = 25) -> np.ndarray:
    """Lloyd's k-means (k-means++ seeding); returns cluster labels [n]."""
    rng = np.random.default_rng(seed)
    n = len(x)
    n_clusters = max(1, min(n_clusters, n))
    centers = [x[rng.integers(n)]]
    for _ in range(1, n_clusters):
        d2 = np.min(((x[:, None, :] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1 / n)
        centers.append(x[rng.choice(n, p=probs)])
    centers = np.asarray(centers)
    labels = np.zeros(n, np.int64)
    for _ in range(iters):
        labels = ((x[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        for c in range(n_clusters):
            if np.any(labels == c):
                centers[c] = x[labels == c].mean(0)
    return labels


def _row_blocks(x: np.ndarray, mean: np.ndarray | None, block: int):
    """(start, float32 [b, d] slice of x with NaN -> 0, centred by `mean` if given): one slice's copy
    at a time, never the whole matrix."""
    for start in range(0, len(x), block):
        b = np.nan_to_num(np.asarray(x[start:start + block], np.float32))
        yield start, (b - mean if mean is not None else b)


def pca(x: np.ndarray, n_components: int, block: int = 1024) -> np.ndarray:
    """float32 [n, m] scores of x [n, d] (NaN = 0) on its top m = n_components principal components
    (the SVD's u * s of the centred x).

    No float64 copy of x: the column means, then the smaller of the covariance [d, d] (n >= d) or Gram
    [n, n] (n < d) matrix of the centred rows, accumulate in float64 from float32 products of `block`
    rows at a time; the top eigenvectors of that matrix (float64 eigh) give the components, and the
    scores are the centred rows times them (covariance) or u * sqrt(eigenvalue) (Gram). At paper scale
    (20k x 2,749) that is a 60 MB d x d matrix instead of a float64 SVD of a 440 MB copy. Each
    component's sign is fixed by its largest-magnitude score (positive), as an SVD's is not. `block`
    bounds the float32 sums' length (their rounding error grows with it; tests/test_context.py)."""
    n, d = x.shape
    m = min(n_components, n, d)
    total = np.zeros(d)
    for _, b in _row_blocks(x, None, block):
        total += b.sum(axis=0, dtype=np.float64)
    mean = (total / max(n, 1)).astype(np.float32)
    if n >= d:
        cov = np.zeros((d, d))
        for _, b in _row_blocks(x, mean, block):
            cov += b.T @ b
        vecs = np.linalg.eigh(cov)[1][:, ::-1][:, :m].astype(np.float32)
        scores = np.concatenate([b @ vecs for _, b in _row_blocks(x, mean, block)] or [np.zeros((0, m), np.float32)])
    else:
        gram = np.zeros((n, n))
        for i, bi in _row_blocks(x, mean, block):
            for j, bj in _row_blocks(x, mean, block):
                gram[i:i + len(bi), j:j + len(bj)] = bi @ bj.T
        vals, vecs = np.linalg.eigh(gram)
        vals, vecs = vals[::-1][:m], vecs[:, ::-1][:, :m]
        scores = (vecs * np.sqrt(np.clip(vals, 0.0, None))).astype(np.float32)
    if len(scores):
        scores *= np.where(scores[np.argmax(np.abs(scores), axis=0), np.arange(m)] < 0, -1, 1).astype(np.float32)
    return scores


def minmax_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min-max scaling to [0, 1] ignoring NaN; returns (scaled float32 with NaN -> 0, mask).

    Works on one float32 copy in place: at paper scale a profile block is ~10^5 x 2,749, and the
    float64 temporaries of a straightforward version peaked at several times its size."""
    x = np.array(x, np.float32)
    mask = np.isfinite(x)
    if x.shape[0] == 0:   # a node type without nodes (a modality with no observed profile)
        return x, mask
    x[~mask] = np.nan
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # all-NaN columns: their entries are masked anyway
        lo = np.nanmin(x, axis=0)
        hi = np.nanmax(x, axis=0)
        x -= lo
        x /= np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    np.clip(x, 0, 1, out=x)
    x[~mask] = 0.0
    return x, mask


def top_genes(z: np.ndarray, fraction: float = 0.01):
    """Molecule-gene edges of an expression block: the top `fraction` of each signature's genes by |z|.

    z: [R, G] signatures (NaN = not measured). Returns (row, column, weight) int/int/float64 [E]:
    round(fraction * G) (at least 1) genes per row, fewer where a row has fewer nonzero |z|; weight
    = |z| / the row's max |z|, in (0, 1]. Per row, not one cut over the block: a global quantile of
    |z| on the L1000 consensus signatures (cut at |z| > 11.5) left 946 of 1,170 compounds without a
    gene and gave one compound 753 of 978 genes; clip(|z|, 0, 1) made every weight 1.
    """
    a = np.abs(np.asarray(z, np.float64))
    a = np.where(np.isfinite(a), a, 0.0)
    if a.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    k = min(a.shape[1], max(1, int(round(fraction * a.shape[1]))))
    cols = np.argpartition(-a, k - 1, axis=1)[:, :k]          # the k largest |z| of each row
    vals = np.take_along_axis(a, cols, axis=1)
    peak = a.max(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(len(a))[:, None], cols.shape)
    keep = vals > 0                                            # |z| = 0 (or NaN) says nothing
    return rows[keep], cols[keep], (vals / np.where(peak > 0, peak, 1.0))[keep]


def build_context_graph(mol_bits: np.ndarray, mol_targets: np.ndarray, scaffolds: Sequence,
                        profiles: dict[str, ProfileBlock], gene_edges: np.ndarray | None = None,
                        n_genes: int = 0, expression: str | None = None,
                        expression_genes: np.ndarray | None = None, gene_quantile: float = 0.99,
                        sparsity: float = 0.995, floor: float = 0.8, n_clusters: int = 100,
                        pca_components: int = 2, max_group: int = 2048, seed: int = 0) -> ContextGraph:
    """Builds H (see module docstring).

    mol_bits: 0/1 fingerprint bits [N_m, F] for molecule similarity; mol_targets: [N_m, T] in [0, 1].
    scaffolds: cluster label per molecule (e.g. Murcko scaffold SMILES; None = no cluster).
    expression / expression_genes: which modality's columns map to gene node ids (molecule-gene edges);
    gene_quantile: each of its signatures links to its genes above this quantile of the row's |z|.
    """
    n_mol = len(mol_bits)
    clash = [name for name in profiles if name in (MOLECULE, GENE)]
    if clash:
        raise ValueError(f"modality names {clash} clash with context node types {MOLECULE!r} / {GENE!r}")
    type_names = [MOLECULE] + list(profiles) + ([GENE] if n_genes else [])
    offsets, start = {}, n_mol
    for name, block in profiles.items():
        offsets[name] = start
        start += len(block.features)
    gene_offset = start
    n_nodes = start + n_genes
    node_type = np.zeros(n_nodes, np.int32)
    node_row = np.zeros(n_nodes, np.int32)
    node_row[:n_mol] = np.arange(n_mol)
    for t, name in enumerate(profiles, start=1):
        o, m = offsets[name], len(profiles[name].features)
        node_type[o:o + m], node_row[o:o + m] = t, np.arange(m)
    if n_genes:
        node_type[gene_offset:] = len(type_names) - 1
        node_row[gene_offset:] = np.arange(n_genes)

    src, dst, wts, thresholds = [], [], [], {}

    def add(a, b, w):
        src.append(np.asarray(a, np.int64))
        dst.append(np.asarray(b, np.int64))
        wts.append(np.asarray(w, np.float64))

    # molecule - molecule: Tanimoto within scaffold clusters
    groups: dict = {}
    for i, s in enumerate(scaffolds):
        if s is not None:
            groups.setdefault(s, []).append(i)
    r, c, v = _pairs_within([np.array(g) for g in groups.values() if len(g) > 1],
                            lambda idx: tanimoto_matrix(mol_bits[idx]), max_group)
    thresholds[MOLECULE] = bisection_threshold(v, floor, sparsity=sparsity)
    keep = v > thresholds[MOLECULE]
    add(r[keep], c[keep], v[keep])

    for name, block in profiles.items():
        o = offsets[name]
        mol = np.asarray(block.molecule)
        ok = (mol >= 0) & (mol < n_mol)
        add(mol[ok], o + np.nonzero(ok)[0], np.ones(ok.sum()))          # molecule - profile
        feats = np.asarray(block.features)
        if len(feats) >= 2:
            labels = kmeans(pca(feats, min(pca_components, feats.shape[1])), n_clusters, seed)
            r, c, v = _pairs_within([np.nonzero(labels == k)[0] for k in np.unique(labels)],
                                    lambda idx: pearson_matrix(feats[idx]), max_group)
            thresholds[name] = bisection_threshold(v, floor, sparsity=sparsity)
            keep = v > thresholds[name]
            add(o + r[keep], o + c[keep], v[keep])

    if n_genes and gene_edges is not None and len(gene_edges):
        ge = np.asarray(gene_edges)
        add(gene_offset + ge[:, 0], gene_offset + ge[:, 1], np.ones(len(ge)))
    if n_genes and expression is not None:
        block = profiles[expression]
        rr, cc, ww = top_genes(block.features, 1.0 - gene_quantile)
        mol = np.asarray(block.molecule)[rr]
        ok = mol >= 0
        add(mol[ok], gene_offset + np.asarray(expression_genes)[cc[ok]], ww[ok])

    s = np.concatenate(src) if src else np.zeros(0, np.int64)
    d = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    w = np.concatenate(wts) if wts else np.zeros(0)
    s, d, w = np.concatenate([s, d]), np.concatenate([d, s]), np.concatenate([w, w])
    key = s * n_nodes + d
    uniq, first = np.unique(key, return_index=True)      # duplicate edges keep their first weight
    s, d, w = uniq // n_nodes, uniq % n_nodes, w[first]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(s, minlength=n_nodes))])

    targets = {MOLECULE: np.asarray(mol_targets, np.float32)}
    target_mask = {MOLECULE: np.isfinite(targets[MOLECULE])}
    for name, block in profiles.items():
        targets[name], target_mask[name] = minmax_scale(block.features)
    return ContextGraph(indptr=indptr.astype(np.int32), indices=d.astype(np.int32),
                        weights=w.astype(np.float32), node_type=node_type, node_row=node_row,
                        type_names=type_names, targets=targets, target_mask=target_mask,
                        thresholds=thresholds)


@functools.partial(jax.jit, static_argnames=("length",))
def random_walks(indptr, indices, weights, starts, key, length: int = 4):
    """Uniform random walks. Returns (nodes int32 [B, L + 1], beta float32 [B, L + 1]).

    beta[:, 0] = 1; beta[:, l] = beta[:, l - 1] * weight of the edge taken at step l. A walk at a
    node without edges stays there and its beta becomes 0.
    """
    def step(carry, k):
        node, beta = carry
        lo, hi = indptr[node], indptr[node + 1]
        deg = hi - lo
        u = jax.random.uniform(k, node.shape)
        offset = jnp.minimum((u * deg).astype(jnp.int32), jnp.maximum(deg - 1, 0))
        edge = jnp.clip(lo + offset, 0, indices.shape[0] - 1)
        moved = deg > 0
        nxt = jnp.where(moved, indices[edge], node)
        beta = beta * jnp.where(moved, weights[edge], 0.0)
        return (nxt, beta), (nxt, beta)

    starts = starts.astype(jnp.int32)
    ones = jnp.ones(starts.shape, jnp.float32)
    _, (nodes, betas) = jax.lax.scan(step, (starts, ones), jax.random.split(key, length))
    return (jnp.concatenate([starts[None], nodes]).T, jnp.concatenate([ones[None], betas]).T)


def reconstruction_loss(logits, targets, mask, beta, kind: str = "bce"):
    """sum_r beta_r sum_c mask_rc l(logit_rc, target_rc) / (number of unmasked entries).

    logits, targets, mask [R, T]; beta [R]. kind: 'bce' (BCE with logits, targets in [0, 1]) or
    'mse' (on sigmoid(logits)). Returns 0 when nothing is unmasked, never NaN.
    """
    mask = mask.astype(bool)
    targets = jnp.where(mask, targets, 0.0)   # NaN targets would poison gradients even if masked
    if kind == "bce":
        per = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    elif kind == "mse":
        per = (jax.nn.sigmoid(logits) - targets) ** 2
    else:
        raise ValueError(f"reconstruction loss kind must be 'bce' or 'mse', got {kind!r}")
    count = jnp.sum(mask)
    total = jnp.sum(jnp.where(mask, per, 0.0) * beta[:, None])
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def walk_reconstruction_loss(logits, targets, mask, beta, kind: str = "bce"):
    """reconstruction_loss of logits [G, T] repeated along every walk position, without repeating them.

    targets, mask [G, S, T] (S walk positions), beta [G, S]. Equals
    reconstruction_loss(broadcast(logits).reshape(G*S, T), targets.reshape(G*S, T), ...): the per-entry
    loss is linear in the target (BCE: softplus(z) - z y; MSE: s^2 - 2 s y + y^2 with s = sigmoid(z)),
    so the walk positions are summed first (walk_statistics) and the logits enter only as [G, T]
    (loss_from_statistics). Saves the [G, S, T] activations and their gradients (G*S*T floats per node
    type).
    """
    check_recon_kind(kind)
    return loss_from_statistics(logits, walk_statistics(targets, mask, beta, kind), kind)


def check_recon_kind(kind: str):
    if kind not in ("bce", "mse"):
        raise ValueError(f"reconstruction loss kind must be 'bce' or 'mse', got {kind!r}")


def walk_statistics(targets, mask, beta, kind: str = "bce") -> dict:
    """What walk_reconstruction_loss needs of the walks' targets, summed over the walk positions:
    w [G, T] = sum_s beta m, v [G, T] = sum_s beta m y, count = sum m (the mean's denominator) and, for
    'mse' only, q [G] = sum_{s,T} beta m y^2. Each is a sum over (position, column) entries, so partial
    statistics over disjoint sets of entries (e.g. the table rows each device holds) add up to these."""
    mask = mask.astype(bool)
    targets = jnp.where(mask, targets.astype(jnp.float32), 0.0)
    weight = jnp.where(mask, beta[..., None], 0.0)                     # [G, S, T]
    out = {"w": jnp.sum(weight, axis=1), "v": jnp.sum(weight * targets, axis=1), "count": jnp.sum(mask)}
    if kind == "mse":
        out["q"] = jnp.sum(weight * targets * targets, axis=(1, 2))
    return out


def loss_from_statistics(logits, stats: dict, kind: str = "bce"):
    """walk_reconstruction_loss from logits [G, T] and walk_statistics (the same G rows). Returns 0 when
    nothing is unmasked, never NaN."""
    check_recon_kind(kind)
    w, v, count = stats["w"], stats["v"], stats["count"]
    if kind == "bce":
        total = jnp.sum(jax.nn.softplus(logits) * w - logits * v)
    else:
        s = jax.nn.sigmoid(logits)
        total = jnp.sum(s * s * w - 2.0 * s * v) + jnp.sum(stats["q"])
    return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)
