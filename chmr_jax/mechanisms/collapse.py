"""Representation health measures the objective logs (is a projection collapsing?).

collapse_stats(x, mask) over the valid rows of a batch of representations x [B, D]:
  effective_rank  exp(entropy of the normalised eigenvalues of the row covariance) (Roy & Vetterli,
                  2007): D for isotropic features, 1 when every row lies on one line, ~k for k equal
                  directions; a falling value during training is dimensional collapse
  std             mean over dimensions of the per-dimension standard deviation (0 = complete collapse)
Both are statistics of the global batch (XLA partitions the sums when x is sharded).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def collapse_stats(x, mask=None) -> dict:
    x = x.astype(jnp.float32)
    n_rows = x.shape[0]
    w = (jnp.ones(n_rows, bool) if mask is None else mask).astype(jnp.float32)[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w * x, axis=0) / n
    xc = (x - mean) * w
    cov = xc.T @ xc / jnp.maximum(n - 1.0, 1.0)                         # [D, D]
    eig = jnp.clip(eigvalsh(cov), 0.0, None)
    p = eig / jnp.maximum(jnp.sum(eig), 1e-30)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    std = jnp.mean(jnp.sqrt(jnp.diagonal(cov)))
    ok = n > 1
    # Non-finite projections give NaN, not the 1.0 ("complete collapse") the entropy of NaNs would read as.
    rank = jnp.where(jnp.all(jnp.isfinite(eig)), jnp.exp(entropy), jnp.nan)
    return {"effective_rank": jnp.where(ok, rank, 0.0), "std": jnp.where(ok, std, 0.0)}


def eigvalsh(cov):
    """Eigenvalues of a symmetric [D, D] matrix. On CPU through LAPACK on the host (float64): XLA's CPU
    eigh took ~1.3 s for a 300 x 300 covariance whose spectrum holds a cluster of zeros (a batch smaller
    than D, padding rows, a collapsing representation: when this diagnostic matters), 75% of a
    64-molecule step's time in a profile (benchmarks/RESULTS.md); LAPACK takes milliseconds. On
    accelerators XLA's own (cuSOLVER / TPU) eigh, with no host round trip. The branch is chosen by the
    platform the step is compiled for (the mesh's devices), not the process's default backend: a TPU
    program compiled on a CPU host (chmr-jax compile) must not call back to the host."""
    def host(c):
        return jax.pure_callback(_host_eigvalsh, jax.ShapeDtypeStruct(c.shape[:1], jnp.float32), c)
    return jax.lax.platform_dependent(cov, cpu=host, default=jnp.linalg.eigvalsh)


def _host_eigvalsh(cov) -> np.ndarray:
    cov = np.asarray(cov, np.float64)
    if not np.all(np.isfinite(cov)):      # a diverging step (the NaN guard skips it): NaN, as XLA's eigh gives
        return np.full(cov.shape[0], np.nan, np.float32)
    try:
        return np.linalg.eigvalsh(cov).astype(np.float32)
    except np.linalg.LinAlgError:
        return np.full(cov.shape[0], np.nan, np.float32)
