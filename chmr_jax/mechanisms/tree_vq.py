"""Tree-structured vector quantisation (spec §5) as one lax.scan over tree levels.

The code table is heap-ordered: row 1 is the (unused) root, the children of node j are 2j and
2j + 1, so level h (1..H) holds rows [2^h, 2^(h+1)). The table has 2^(H+1) rows (rows 0 and 1 are
never selected), which gives every level the same array shapes and lets the levels run as a scan.

At level h a sample may only pick one of the two children of the code it picked at level h - 1,
by cosine distance 1 - cos. Per level, over valid rows:
  A = [1 - cos(sg[q], p)] + eta [1 - cos(q, sg[p])]
and, when `reverse` (the release's extra direction, weight mu), every level-h code is pulled toward
its nearest sample among those routed to its parent: mu * mean_c [1 - max_b cos(q_c, sg[p_b])].
The loss is the mean over levels. Outputs: codes [B, H] (heap indices), straight-through vectors
q_st = p + sg[q - p] [B, H, D], and per-level usage counts, perplexity and dead-code fraction.
With `axis_name` (inside shard_map) the loss averages and usage statistics cover the global batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from chmr_jax.mechanisms.losses import l2_normalize


class TreeVQOutput(NamedTuple):
    codes: jax.Array           # int32 [B, H] heap index chosen at each level
    quantized: jax.Array       # [B, H, D] straight-through vectors (forward value = unit code)
    loss: jax.Array            # scalar, mean over levels
    level_loss: jax.Array      # [H]
    usage: jax.Array           # [H, C] code counts over valid rows (C = table rows)
    perplexity: jax.Array      # [H] exp(entropy) of each level's usage
    dead_fraction: jax.Array   # [H] fraction of the level's 2^h codes never used


def depth_of(table) -> int:
    c = table.shape[0]
    h = c.bit_length() - 2
    if c != 2 ** (h + 1) or h < 1:
        raise ValueError(f"tree table must have 2^(H+1) rows for depth H >= 1, got {c}")
    return h


def init_table(key, depth: int, dim: int, dtype=jnp.float32):
    """N(0, 1) code table [2^(depth+1), dim] (codes are L2-normalised when used)."""
    return jax.random.normal(key, (2 ** (depth + 1), dim), dtype)


def level_of(codes):
    """Tree level (1-based) of heap indices."""
    return jnp.floor(jnp.log2(codes.astype(jnp.float32))).astype(jnp.int32)


def tree_vq(table, p, mask=None, eta: float = 1.0, mu: float = 1.0, reverse: bool = True,
            axis_name: str | None = None) -> TreeVQOutput:
    """Quantises p [B, D] down the tree in `table` [2^(H+1), D]; mask [B] marks valid rows."""
    depth = depth_of(table)
    n_codes = table.shape[0]
    b = p.shape[0]
    mask = jnp.ones(b, bool) if mask is None else mask
    psum = (lambda t: jax.lax.psum(t, axis_name)) if axis_name else (lambda t: t)
    codes_n = l2_normalize(table)
    pn = l2_normalize(p)
    pn_sg = jax.lax.stop_gradient(pn)
    w = mask.astype(p.dtype)
    n_valid = psum(jnp.sum(w))
    code_ids = jnp.arange(n_codes)

    def level(parent, h):
        left = 2 * parent
        cos_l = jnp.sum(pn * codes_n[left], axis=-1)
        cos_r = jnp.sum(pn * codes_n[left + 1], axis=-1)
        child = left + (cos_r > cos_l).astype(left.dtype)      # ties go left
        q = codes_n[child]
        a = (1.0 - jnp.sum(jax.lax.stop_gradient(q) * pn, -1)) + eta * (1.0 - jnp.sum(q * pn_sg, -1))
        loss = psum(jnp.sum(w * a)) / jnp.maximum(n_valid, 1.0)

        in_level = (code_ids >= 2 ** h) & (code_ids < 2 ** (h + 1))
        if reverse:
            cos_all = codes_n @ pn_sg.T                            # [C, B]
            routed = in_level[:, None] & (parent[None, :] == code_ids[:, None] // 2) & mask[None, :]
            local_best = jnp.max(jnp.where(routed, cos_all, -2.0), axis=1)
            if axis_name:
                global_best = jax.lax.pmax(jax.lax.stop_gradient(local_best), axis_name)
                holder = (local_best >= global_best) & (local_best > -2.0)
                share = psum(holder.astype(p.dtype))          # devices tied for the nearest sample
                term = jnp.where(holder, (1.0 - local_best) / jnp.maximum(share, 1.0), 0.0)
                has = share > 0
            else:
                has = local_best > -2.0
                term = jnp.where(has, 1.0 - local_best, 0.0)
            rev = psum(jnp.sum(term)) / jnp.maximum(jnp.sum(has.astype(p.dtype)), 1.0)
            loss = loss + mu * rev

        counts = psum(jnp.sum(jax.nn.one_hot(child, n_codes, dtype=p.dtype) * w[:, None], axis=0))
        total = jnp.maximum(jnp.sum(counts), 1.0)
        probs = counts / total
        entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
        dead = jnp.sum(jnp.where(in_level, counts == 0, False)) / (2.0 ** h)
        q_st = p + jax.lax.stop_gradient(q - p)
        return child, (child, q_st, loss, counts, jnp.exp(entropy), dead)

    start = jnp.ones(b, jnp.int32)
    if axis_name:
        start = jax.lax.pcast(start, axis_name, to="varying")
    _, (codes, q_st, losses, usage, perplexity, dead) = jax.lax.scan(
        level, start, jnp.arange(1, depth + 1))
    return TreeVQOutput(codes=codes.T, quantized=jnp.swapaxes(q_st, 0, 1), loss=jnp.mean(losses),
                        level_loss=losses, usage=usage, perplexity=perplexity, dead_fraction=dead)


def paths(codes):
    """Within-level index (0 .. 2^h - 1) of each heap index in codes [B, H]."""
    h = jnp.arange(1, codes.shape[-1] + 1)
    return codes - 2 ** h


def restart_dead_codes(table, usage, samples, key, noise: float = 0.01):
    """Re-seeds codes unused at their level with random sample vectors plus noise.

    Done outside the gradient (call between steps): table [C, D], usage [H, C] from tree_vq,
    samples [B, D] recent projections. Returns (new table, number of restarted codes).
    """
    depth = usage.shape[0]
    code_ids = jnp.arange(table.shape[0])
    lvl = jnp.where(code_ids >= 2, level_of(jnp.maximum(code_ids, 1)), 0)
    used = jnp.zeros(table.shape[0], bool)
    for h in range(1, depth + 1):
        used = used | ((lvl == h) & (usage[h - 1] > 0))
    dead = (code_ids >= 2) & ~used
    k_pick, k_noise = jax.random.split(key)
    picks = jax.random.randint(k_pick, (table.shape[0],), 0, samples.shape[0])
    fresh = l2_normalize(samples[picks]) + noise * jax.random.normal(k_noise, table.shape, table.dtype)
    return jnp.where(dead[:, None], fresh, table), jnp.sum(dead)
