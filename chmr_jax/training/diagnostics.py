"""Representation health measures logged during pretraining (is a projection collapsing?).

collapse_stats(x, mask) over the valid rows of a batch of representations x [B, D]:
  effective_rank  exp(entropy of the normalised eigenvalues of the row covariance) (Roy & Vetterli,
                  2007): D for isotropic features, 1 when every row lies on one line, ~k for k equal
                  directions; a falling value during training is dimensional collapse
  std             mean over dimensions of the per-dimension standard deviation (0 = complete collapse)
Both are statistics of the global batch (XLA partitions the sums when x is sharded).
"""
from __future__ import annotations

import jax.numpy as jnp


def collapse_stats(x, mask=None) -> dict:
    x = x.astype(jnp.float32)
    n_rows = x.shape[0]
    w = (jnp.ones(n_rows, bool) if mask is None else mask).astype(jnp.float32)[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w * x, axis=0) / n
    xc = (x - mean) * w
    cov = xc.T @ xc / jnp.maximum(n - 1.0, 1.0)                         # [D, D]
    eig = jnp.clip(jnp.linalg.eigvalsh(cov), 0.0, None)
    p = eig / jnp.maximum(jnp.sum(eig), 1e-30)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    std = jnp.mean(jnp.sqrt(jnp.diagonal(cov)))
    ok = n > 1
    return {"effective_rank": jnp.where(ok, jnp.exp(entropy), 0.0), "std": jnp.where(ok, std, 0.0)}
