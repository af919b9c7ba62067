"""Semantic consistency alignment losses (spec §4) as plain functions of arrays.

InfoNCE between anchors a [N, D] and modality projections p [N, D] with cosine similarity and
temperature tau. Row i is used (as an anchor and as a negative) only where mask[i] is True: rows
without the modality, or batch padding, take no part. Positives are on the diagonal.

  row direction     l_i = logsumexp_{j in M} s_ij - s_ii        (the release's one direction)
  column direction  l_j = logsumexp_{i in M} s_ij - s_jj        (added when symmetric=True)
  loss = mean over i in M of the row terms (averaged with the column mean when symmetric)

Three implementations agree to float tolerance:
  infonce_dense    materialises the N x N logits (the reference)
  infonce_chunked  scans row blocks (memory O(N x block)); column log-sum-exp is accumulated online;
                   the scan body is rematerialised so the backward pass keeps no blocks
  infonce_ring     under shard_map: each device keeps its rows of a and passes its p shard (with
                   that shard's running column statistics) around the ring with ppermute; memory per
                   device O((N/P)^2)

VICReg (invariance, variance, covariance) uses statistics of the whole global batch; inside
shard_map pass `axis_name` and the sums are psum-ed across devices.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

_NEG = -1e30  # finite "minus infinity": keeps max/exp arithmetic NaN-free for all-masked blocks


def l2_normalize(x, eps: float = 1e-8):
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _finish(row_sum, col_sum, count, symmetric: bool):
    denom = jnp.maximum(count, 1.0)
    loss = row_sum / denom
    if symmetric:
        loss = 0.5 * (loss + col_sum / denom)
    return jnp.where(count > 0, loss, 0.0)


def infonce_dense(a, p, mask=None, tau: float = 0.2, symmetric: bool = False):
    """Reference InfoNCE with the full N x N logits. a, p [N, D]; mask [N] bool. Returns a scalar."""
    n = a.shape[0]
    mask = jnp.ones(n, bool) if mask is None else mask
    logits = l2_normalize(a) @ l2_normalize(p).T / tau
    pair = mask[:, None] & mask[None, :]
    masked = jnp.where(pair, logits, _NEG)
    diag = jnp.diagonal(logits)
    count = mask.sum().astype(logits.dtype)
    row = jnp.sum(jnp.where(mask, jax.nn.logsumexp(masked, axis=1) - diag, 0.0))
    col = jnp.sum(jnp.where(mask, jax.nn.logsumexp(masked, axis=0) - diag, 0.0))
    return _finish(row, col, count, symmetric)


def _online_lse(m, s, block_max, block_sumexp_at):
    """Merges running (max m, sum s) with a block whose max is block_max; block_sumexp_at(new_m)
    returns the block's sum of exp(x - new_m)."""
    new_m = jnp.maximum(m, block_max)
    return new_m, s * jnp.exp(m - new_m) + block_sumexp_at(new_m)


def infonce_chunked(a, p, mask=None, tau: float = 0.2, symmetric: bool = False, block: int = 1024):
    """InfoNCE over row blocks of `block` anchors; N is padded up to a multiple of `block`."""
    n, d = a.shape
    mask = jnp.ones(n, bool) if mask is None else mask
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    an = jnp.pad(l2_normalize(a), ((0, pad), (0, 0)))
    pn = l2_normalize(p)
    mask_rows = jnp.pad(mask, (0, pad))
    diag = jnp.sum(an[:n] * pn, axis=-1) / tau

    @jax.checkpoint
    def body(carry, xs):
        row_sum, col_m, col_s = carry
        a_blk, m_blk = xs
        logits = a_blk @ pn.T / tau                                   # [block, N]
        pair = m_blk[:, None] & mask[None, :]
        masked = jnp.where(pair, logits, _NEG)
        row_lse = jax.nn.logsumexp(masked, axis=1)
        row_sum = row_sum + jnp.sum(jnp.where(m_blk, row_lse, 0.0))
        blk_max = jnp.max(masked, axis=0)
        col_m, col_s = _online_lse(col_m, col_s, blk_max,
                                   lambda new_m: jnp.sum(jnp.where(pair, jnp.exp(masked - new_m), 0.0), axis=0))
        return (row_sum, col_m, col_s), None

    init = (jnp.zeros((), a.dtype), jnp.full((n,), _NEG, a.dtype), jnp.zeros((n,), a.dtype))
    xs = (an.reshape(n_blocks, block, d), mask_rows.reshape(n_blocks, block))
    (row_lse_sum, col_m, col_s), _ = jax.lax.scan(body, init, xs)
    count = mask.sum().astype(a.dtype)
    diag_sum = jnp.sum(jnp.where(mask, diag, 0.0))
    col_lse = col_m + jnp.log(jnp.maximum(col_s, 1e-30))
    col = jnp.sum(jnp.where(mask, col_lse, 0.0)) - diag_sum
    return _finish(row_lse_sum - diag_sum, col, count, symmetric)


def _block_update(an_blk, m_blk, p_vis, m_vis, row_m, row_s, col_m, col_s, tau):
    """One [block, n] tile of logits: merges it into its rows' and the visiting columns' running
    (max, sum of exp) statistics."""
    logits = an_blk @ p_vis.T / tau
    pair = m_blk[:, None] & m_vis[None, :]
    masked = jnp.where(pair, logits, _NEG)
    row_m, row_s = _online_lse(row_m, row_s, jnp.max(masked, axis=1),
                               lambda new_m: jnp.sum(jnp.where(pair, jnp.exp(masked - new_m[:, None]), 0.0), axis=1))
    col_m, col_s = _online_lse(col_m, col_s, jnp.max(masked, axis=0),
                               lambda new_m: jnp.sum(jnp.where(pair, jnp.exp(masked - new_m[None, :]), 0.0), axis=0))
    return row_m, row_s, col_m, col_s


def _ring_local(a, p, mask, *, tau, symmetric, axis_name, axis_size, block=None):
    """Per-device body of infonce_ring: a, p, mask are this device's shards [n, D] / [n].

    Each of the axis_size hops meets one visiting shard of p. With `block` < n the hop walks its rows
    in [block, n] tiles (a rematerialised inner scan), so a device never holds more than block x n
    logits: the per-device memory of the chunked form inside the ring's communication pattern."""
    an, pn = l2_normalize(a), l2_normalize(p)
    perm = [(i, (i + 1) % axis_size) for i in range(axis_size)]
    diag = jnp.sum(an * pn, axis=-1) / tau
    n = a.shape[0]
    block = n if not block or block >= n else block
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    a_blocks = jnp.pad(an, ((0, pad), (0, 0))).reshape(n_blocks, block, -1)
    m_blocks = jnp.pad(mask, (0, pad)).reshape(n_blocks, block)

    def varying(x):
        # Carries created inside shard_map must be marked as device-varying to match the body.
        return jax.lax.pcast(x, axis_name, to="varying")

    @jax.checkpoint
    def tile(carry, xs):
        col_m, col_s, p_vis, m_vis = carry
        a_blk, m_blk, row_m, row_s = xs
        row_m, row_s, col_m, col_s = _block_update(a_blk, m_blk, p_vis, m_vis, row_m, row_s, col_m, col_s, tau)
        return (col_m, col_s, p_vis, m_vis), (row_m, row_s)

    def hop(carry, _):
        row_m, row_s, p_vis, m_vis, col_m, col_s = carry
        (col_m, col_s, _, _), (row_m, row_s) = jax.lax.scan(
            tile, (col_m, col_s, p_vis, m_vis), (a_blocks, m_blocks, row_m, row_s))
        # The visiting shard travels on with its column statistics; after axis_size hops every
        # shard is home again with statistics over all rows.
        p_vis, m_vis, col_m, col_s = jax.lax.ppermute((p_vis, m_vis, col_m, col_s), axis_name, perm)
        return (row_m, row_s, p_vis, m_vis, col_m, col_s), None

    init = (varying(jnp.full((n_blocks, block), _NEG, a.dtype)), varying(jnp.zeros((n_blocks, block), a.dtype)),
            pn, mask, varying(jnp.full((n,), _NEG, a.dtype)), varying(jnp.zeros((n,), a.dtype)))
    (row_m, row_s, _, _, col_m, col_s), _ = jax.lax.scan(jax.checkpoint(hop), init, None, length=axis_size)
    row_m, row_s = row_m.reshape(-1)[:n], row_s.reshape(-1)[:n]
    row_lse = row_m + jnp.log(jnp.maximum(row_s, 1e-30))
    col_lse = col_m + jnp.log(jnp.maximum(col_s, 1e-30))
    row = jnp.sum(jnp.where(mask, row_lse - diag, 0.0))
    col = jnp.sum(jnp.where(mask, col_lse - diag, 0.0))
    count = mask.sum().astype(a.dtype)
    row, col, count = jax.lax.psum((row, col, count), axis_name)
    return _finish(row, col, count, symmetric)


def infonce_ring(a, p, mask=None, tau: float = 0.2, symmetric: bool = False, *, mesh,
                 axis_name: str = "data", block: int | None = None):
    """InfoNCE with a, p, mask sharded by rows over mesh axis `axis_name` (N divisible by its size).

    block: rows per logits tile within a device (None: the whole local shard, an [n, n] tile per hop).
    Returns the replicated scalar loss; gradients flow back through the ring (ppermute transposes).
    """
    mask = jnp.ones(a.shape[0], bool) if mask is None else mask
    size = mesh.shape[axis_name]
    fn = functools.partial(_ring_local, tau=tau, symmetric=symmetric, axis_name=axis_name, axis_size=size,
                           block=block)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(axis_name), P(axis_name), P(axis_name)),
                         out_specs=P())(a, p, mask)


def infonce(a, p, mask=None, tau: float = 0.2, symmetric: bool = False, impl: str = "chunked",
            block: int = 1024, mesh=None, axis_name: str = "data"):
    """Dispatches to the implementation named by `impl` ('dense', 'chunked' or 'ring')."""
    if impl == "dense":
        return infonce_dense(a, p, mask, tau, symmetric)
    if impl == "chunked":
        return infonce_chunked(a, p, mask, tau, symmetric, block)
    if impl == "ring":
        if mesh is None:
            raise ValueError("impl='ring' needs the device mesh (mesh=...)")
        return infonce_ring(a, p, mask, tau, symmetric, mesh=mesh, axis_name=axis_name, block=block)
    raise ValueError(f"unknown InfoNCE implementation {impl!r}; choose dense, chunked or ring")


def vicreg(x, y, mask=None, inv_weight: float = 1.0, var_weight: float = 1.0, cov_weight: float = 1.0,
           eps: float = 1e-4, axis_name: str | None = None):
    """VICReg between two views x, y [N, D] over rows where mask is True (spec §4).

    invariance  mean over valid rows and dims of (x - y)^2
    variance    mean_d relu(1 - sqrt(var_d + eps)) per view, summed over the two views (as the
                release adds std_loss_x + std_loss_y); var is unbiased (n - 1) over the global batch
    covariance  sum of squared off-diagonal covariances / D, summed over the two views
    With axis_name (inside shard_map) all sums run over the global batch via psum.
    Returns (total, {'invariance', 'variance', 'covariance'}).
    """
    n_local, d = x.shape
    mask = jnp.ones(n_local, bool) if mask is None else mask
    w = mask.astype(x.dtype)[:, None]
    reduce = (lambda t: jax.lax.psum(t, axis_name)) if axis_name else (lambda t: t)
    n = reduce(jnp.sum(w))
    inv = reduce(jnp.sum(w * (x - y) ** 2)) / jnp.maximum(n * d, 1.0)

    def stats(v):
        mean = reduce(jnp.sum(w * v, axis=0)) / jnp.maximum(n, 1.0)
        vc = (v - mean) * w
        cov = reduce(vc.T @ vc) / jnp.maximum(n - 1.0, 1.0)
        std = jnp.sqrt(jnp.diagonal(cov) + eps)
        var_loss = jnp.mean(jax.nn.relu(1.0 - std))
        off = cov - jnp.diag(jnp.diagonal(cov))
        return var_loss, jnp.sum(off ** 2) / d

    var_x, cov_x = stats(x)
    var_y, cov_y = stats(y)
    var = var_x + var_y
    cov = cov_x + cov_y
    total = inv_weight * inv + var_weight * var + cov_weight * cov
    ok = n > 1
    total = jnp.where(ok, total, 0.0)
    return total, {"invariance": jnp.where(ok, inv, 0.0), "variance": jnp.where(ok, var, 0.0),
                   "covariance": jnp.where(ok, cov, 0.0)}
