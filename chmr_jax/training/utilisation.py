"""How much of the machine the step uses: the step's FLOPs from XLA's cost analysis against this
machine's dense matmul rate, measured in the same process (issue 14 §2).

The fraction is `step FLOPs / step seconds / matmul FLOP/s`: 100% would be a step that runs at the
speed of one large, well-shaped matrix product. Caveat of XLA's count: the body of a loop (lax.scan,
while) is counted once, not once per trip. The pretraining step is therefore counted without remat
(pretrain.step_flops: remat runs the GIN layers as a scan, and its recomputation is not useful work,
as in the usual MFU convention); its remaining loops are the Tree-VQ levels and the InfoNCE blocks,
a few percent of the FLOPs, so the fraction is a slight under-estimate.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def lowered_flops(lowered) -> float | None:
    """FLOPs of one call of a lowered (not yet compiled: no compilation cost) jitted function, from
    XLA's HLO cost analysis; per device for an SPMD program. None where the backend gives no count."""
    try:
        cost = lowered.cost_analysis()
    except Exception:   # some backends / versions raise instead of returning nothing
        return None
    if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def matmul_rate(dtype="float32", n: int | None = None, repeats: int = 5, device=None) -> float:
    """FLOP/s of a jitted n x n @ n x n product in `dtype` on `device` (default: the first device):
    the best of `repeats` timed calls after one warm-up call. n defaults to 2048 on CPU (~0.1 s here)
    and 8192 on accelerators (large enough to reach their matrix units' rate)."""
    device = device or jax.devices()[0]
    n = n or (2048 if device.platform == "cpu" else 8192)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def report(step_flops: float | None, steps: int, seconds: float, rate: float | None) -> dict:
    """The utilisation fields of summary.json / the benchmark rows: GFLOP per step, achieved GFLOP/s
    over `steps` steps in `seconds`, the matmul GFLOP/s and their ratio (None where unknown)."""
    achieved = step_flops * steps / seconds if step_flops and steps and seconds > 0 else None
    return {"step_gflop": round(step_flops / 1e9, 2) if step_flops else None,
            "achieved_gflop_per_s": round(achieved / 1e9, 1) if achieved else None,
            "matmul_gflop_per_s": round(rate / 1e9, 1) if rate else None,
            "utilisation": round(achieved / rate, 3) if achieved and rate else None}
