"""The step's FLOP count and utilisation against closed forms and unrolled programs (issues 14 and 21 §2)."""
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
    assert r == {"step_flops_per_device": 4_000_000_000, "step_gflop": 4.0, "achieved_gflop_per_s": 20.0,
                 "matmul_gflop_per_s": 40.0, "utilisation": 0.5}
    assert utilisation.report(None, 10, 2.0, 40e9)["utilisation"] is None


def _nested_scans(x, w):
    # an outer scan of 3 trips around an inner scan of 4 trips of [16, 32] @ [32, 32] products
    def inner(c, _):
        return jnp.tanh(c @ w), None

    def outer(c, _):
        return jax.lax.scan(inner, c, None, length=4)[0] * 0.5, None

    return jnp.sum(jax.lax.scan(outer, x, None, length=3)[0] ** 2)


@pytest.mark.parametrize("program", ["nested_scans", "chunked_infonce"])
def test_scanned_bodies_count_once_per_trip(program):
    # XLA's count of a lowered program has each loop body once, so a chunked or scanned step looked
    # smaller the more it was chunked (issue 21 §2). program_flops counts the trips: it equals XLA's
    # count of the same program with every scan unrolled (differentiated: the backward scans too), up
    # to the loops' own scalar bookkeeping, a few FLOPs per loop (induction variable, trip test).
    from helpers import unrolled_flops

    from chmr_jax.mechanisms import losses
    if program == "nested_scans":
        fn, args = jax.value_and_grad(_nested_scans, argnums=(0, 1)), (jnp.ones((16, 32)), jnp.ones((32, 32)))
        matmuls = 3 * 4 * 2 * 16 * 32 * 32                       # the forward products alone
    else:
        fn = jax.value_and_grad(lambda a, p: losses.infonce_chunked(a, p, symmetric=True, block=64), argnums=(0, 1))
        args = (jax.ShapeDtypeStruct((512, 32), jnp.float32),) * 2
        matmuls = 2 * 512 * 512 * 32                             # the forward logits alone
    counted = utilisation.program_flops(fn, *args)
    unrolled, n_scans = unrolled_flops(fn, *args)
    assert n_scans >= 2 and unrolled > matmuls
    assert 0 <= counted - unrolled <= 8 * n_scans, (counted, unrolled, n_scans)
    # what XLA alone reports for the rolled program: well short of the work
    assert utilisation.lowered_flops(jax.jit(fn).lower(*args)) < 0.5 * unrolled
