"""Structure-aware propagation of cellular modalities (spec §2, paper Eq. 1).

1. `tanimoto_knn`: exact Tanimoto top-K over packed fingerprint bits, computed blockwise with
   matmuls under jit (memory O(block x N); N = 129,592 never needs an N x N matrix). Self is
   excluded by index (not by dropping the first hit, the release's bug); neighbours with zero
   similarity carry no weight.
2. `build_graph`: non-negative affinities S from the kNN sims. With `symmetrize` (default),
   A = (S + S^T) / 2, so the iteration below is exactly the Jacobi iteration for the harmonic
   extension minimising the Dirichlet energy sum_ij A_ij ||x_i - x_j||^2 (monotone non-increasing);
   W = D^-1 A is row-normalised (rows sum to 1).
3. `propagate`: X^(0) = observed rows, 0 elsewhere; X^(t) = W X^(t-1), observed rows reset to their
   measurements after every step (the release's restore line is a no-op); T steps. Rows with no
   path to an observed row fall back to the observed mean (or zero) and stay flagged. The energy
   of every iterate is reported.

The sparse format is hidden behind `spmm`; `formats` lists the implementations (compare them with
benchmarks/propagation.py). Wide feature matrices are processed in column chunks.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

FORMATS = ("bcsr", "bcoo", "segment_sum", "ell")
DEFAULT_FORMAT = "bcsr"  # fastest on CPU here (benchmarks/RESULTS.md); override per machine


# ---- kNN -----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(block_bits, block_ids, all_bits, all_counts, n_real, k):
    inter = block_bits @ all_bits.T                                        # [b, N] exact in f32
    union = jnp.sum(block_bits, axis=1)[:, None] + all_counts[None, :] - inter
    sim = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)
    cols = jnp.arange(all_bits.shape[0])
    sim = jnp.where((cols[None, :] == block_ids[:, None]) | (cols[None, :] >= n_real), -1.0, sim)
    return jax.lax.top_k(sim, k)  # ties: lower index first


def tanimoto_knn(packed_bits: np.ndarray, k: int = 10, block: int = 1024, n_bits: int | None = None):
    """Exact Tanimoto top-k neighbours of every row of packed fingerprints uint8 [N, F/8].

    Returns (indices int32 [N, k], similarities float32 [N, k]) sorted by similarity (ties: lower
    index first). Self is never its own neighbour. Two empty fingerprints have similarity 0.
    """
    packed_bits = np.asarray(packed_bits, np.uint8)
    n = packed_bits.shape[0]
    if n < 2:
        raise ValueError("kNN needs at least 2 molecules")
    k_eff = min(k, n - 1)
    bits = np.unpackbits(packed_bits, axis=1, count=n_bits).astype(np.float32)
    n_pad = -(-n // block) * block
    bits = np.pad(bits, ((0, n_pad - n), (0, 0)))
    all_bits = jnp.asarray(bits)
    counts = all_bits.sum(axis=1)
    idx_out = np.empty((n_pad, k_eff), np.int32)
    sim_out = np.empty((n_pad, k_eff), np.float32)
    for start in range(0, n_pad, block):
        ids = jnp.arange(start, start + block)
        sims, idx = _knn_block(all_bits[start:start + block], ids, all_bits, counts, n, k_eff)
        idx_out[start:start + block] = np.asarray(idx)
        sim_out[start:start + block] = np.asarray(sims)
    return idx_out[:n], sim_out[:n]


# ---- graph -------------------------------------------------------------------------------------

class PropagationGraph(NamedTuple):
    """Row-normalised W = D^-1 A in several layouts (a pytree; `n` is a static shape).

    CSR: indptr [N+1], cols [nnz], weights [nnz] (rows [nnz] for COO / segment_sum).
    ELL: ell_cols [N, Kmax], ell_weights [N, Kmax] (padding: col = row, weight 0).
    Energy terms: degree d_i = sum_j A_ij (0 for isolated rows) and diag_i = (row + col sums of A).
    """
    indptr: jax.Array
    rows: jax.Array
    cols: jax.Array
    weights: jax.Array
    ell_cols: jax.Array
    ell_weights: jax.Array
    degree: jax.Array
    energy_diag: jax.Array


def build_graph(knn_idx: np.ndarray, knn_sim: np.ndarray, symmetrize: bool = True) -> PropagationGraph:
    """Host-side construction of W from kNN lists (see module docstring)."""
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = knn_idx.reshape(-1).astype(np.int64)
    vals = np.clip(knn_sim.reshape(-1).astype(np.float64), 0.0, None)
    keep = (vals > 0) & (rows != cols)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    if symmetrize:
        rows, cols, vals = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([vals, vals]) / 2
    key = rows * n + cols
    uniq, inverse = np.unique(key, return_inverse=True)                  # sorted by (row, col)
    vals = np.bincount(inverse, weights=vals)
    rows, cols = uniq // n, uniq % n
    degree = np.bincount(rows, weights=vals, minlength=n)
    col_sums = np.bincount(cols, weights=vals, minlength=n)
    weights = vals / degree[rows]
    counts = np.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    k_max = max(int(counts.max()) if n else 0, 1)
    slot = np.arange(len(rows)) - indptr[rows]
    ell_cols = np.tile(np.arange(n)[:, None], (1, k_max))
    ell_w = np.zeros((n, k_max))
    ell_cols[rows, slot] = cols
    ell_w[rows, slot] = weights
    return PropagationGraph(
        indptr=jnp.asarray(indptr, jnp.int32), rows=jnp.asarray(rows, jnp.int32),
        cols=jnp.asarray(cols, jnp.int32), weights=jnp.asarray(weights, jnp.float32),
        ell_cols=jnp.asarray(ell_cols, jnp.int32), ell_weights=jnp.asarray(ell_w, jnp.float32),
        degree=jnp.asarray(degree, jnp.float32), energy_diag=jnp.asarray(degree + col_sums, jnp.float32))


def spmm(graph: PropagationGraph, x, fmt: str = DEFAULT_FORMAT):
    """W @ x for x [N, d] in the chosen sparse format (the one place the format is decided)."""
    n = x.shape[0]
    if fmt == "bcsr":
        w = jsparse.BCSR((graph.weights, graph.cols, graph.indptr), shape=(n, n),
                         indices_sorted=True, unique_indices=True)
        return w @ x
    if fmt == "bcoo":
        w = jsparse.BCOO((graph.weights, jnp.stack([graph.rows, graph.cols], axis=1)), shape=(n, n),
                         indices_sorted=True, unique_indices=True)
        return w @ x
    if fmt == "segment_sum":
        return jax.ops.segment_sum(graph.weights[:, None] * x[graph.cols], graph.rows, num_segments=n,
                                   indices_are_sorted=True)
    if fmt == "ell":
        return jnp.einsum("nk,nkd->nd", graph.ell_weights, x[graph.ell_cols])
    raise ValueError(f"unknown sparse format {fmt!r}; choose from {FORMATS}")


def dirichlet_energy(graph: PropagationGraph, x, wx=None, fmt: str = DEFAULT_FORMAT):
    """sum_ij A_ij ||x_i - x_j||^2 = sum_i diag_i ||x_i||^2 - 2 sum_i d_i x_i . (W x)_i.

    `wx` = W @ x may be passed when already computed (the iteration computes it anyway).
    """
    if wx is None:
        wx = spmm(graph, x, fmt)
    sq = jnp.sum(x * x, axis=1)
    return jnp.sum(graph.energy_diag * sq) - 2.0 * jnp.sum(graph.degree * jnp.sum(x * wx, axis=1))


class PropagationResult(NamedTuple):
    x: jax.Array          # [N, d] propagated features (observed rows unchanged)
    observed: jax.Array   # [N] bool, measured rows
    reached: jax.Array    # [N] bool, observed or reached from an observed row within T steps
    energy: jax.Array     # [T + 1] Dirichlet energy of X^(0..T) (before the mean fallback)


@functools.partial(jax.jit, static_argnames=("steps", "fmt", "fallback"))
def _propagate_chunk(graph, x, observed, steps, fmt, fallback):
    obs = observed[:, None]
    x0 = jnp.where(obs, x, 0.0)
    reach0 = observed.astype(x.dtype)

    def body(carry, _):
        xt, rt = carry
        wx = spmm(graph, xt, fmt)
        energy = dirichlet_energy(graph, xt, wx, fmt)
        rn = spmm(graph, rt[:, None], fmt)[:, 0]
        return (jnp.where(obs, x0, wx), jnp.where(observed, 1.0, rn)), energy

    (xt, rt), energies = jax.lax.scan(body, (x0, reach0), None, length=steps)
    energies = jnp.concatenate([energies, dirichlet_energy(graph, xt, None, fmt)[None]])
    reached = rt > 0
    n_obs = jnp.maximum(jnp.sum(observed), 1)
    fill = jnp.sum(x0, axis=0) / n_obs if fallback == "mean" else jnp.zeros(x.shape[1], x.dtype)
    return jnp.where(reached[:, None], xt, fill[None, :]), reached, energies


def propagate(graph: PropagationGraph, x, observed, steps: int = 5, fmt: str = DEFAULT_FORMAT,
              fallback: str = "mean", width_chunk: int | None = 2048) -> PropagationResult:
    """Eq. 1 for x [N, d] (values of unobserved rows are ignored) with observed [N] bool.

    fallback: 'mean' (observed mean) or 'zero' for rows never reached. The columns are processed
    `width_chunk` at a time (they are independent), so d can be far larger than memory allows
    for a few full copies.
    """
    if fallback not in ("mean", "zero"):
        raise ValueError(f"fallback must be 'mean' or 'zero', got {fallback!r}")
    x = jnp.asarray(x, jnp.float32)
    observed = jnp.asarray(observed, bool)
    d = x.shape[1]
    chunk = d if not width_chunk else min(width_chunk, d)
    outs, energy, reached = [], 0.0, None
    for start in range(0, d, chunk):
        out, reached, e = _propagate_chunk(graph, x[:, start:start + chunk], observed, steps, fmt, fallback)
        outs.append(out)
        energy = energy + e
    return PropagationResult(x=jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0],
                             observed=observed, reached=reached, energy=energy)
