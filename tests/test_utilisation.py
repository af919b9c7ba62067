"""The step's FLOP count and utilisation against closed forms (issue 14 §2)."""
import jax
import jax.numpy as jnp
import pytest

from chmr_jax.training import utilisation


def test_flops_of_a_matmul_chain_are_counted_from_the_lowered_program():
    # XLA counts a (m x k) @ (k x n) product as 2 m k n FLOPs; nothing is compiled to count them.
    m, k, n = 64, 96, 32
    f = jax.jit(lambda a, b, c: (a @ b) @ c)
    lowered = f.lower(jnp.ones((m, k)), jnp.ones((k, n)), jnp.ones((n, 8)))
    assert utilisation.lowered_flops(lowered) == pytest.approx(2 * m * k * n + 2 * m * n * 8)


def test_matmul_rate_and_report():
    rate = utilisation.matmul_rate(n=256, repeats=2)
    assert rate > 1e6                                 # any machine multiplies faster than 1 MFLOP/s
    r = utilisation.report(step_flops=4e9, steps=10, seconds=2.0, rate=40e9)
    assert r == {"step_gflop": 4.0, "achieved_gflop_per_s": 20.0, "matmul_gflop_per_s": 40.0, "utilisation": 0.5}
    assert utilisation.report(None, 10, 2.0, 40e9)["utilisation"] is None
