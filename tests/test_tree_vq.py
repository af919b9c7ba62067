"""Tree-VQ: routing, straight-through gradients, a hand-computed example, the cosine bound."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from chmr_jax.mechanisms import tree_vq as T


def random_case(depth=4, dim=8, n=128, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return T.init_table(k1, depth, dim), jax.random.normal(k2, (n, dim))


def test_routing_picks_a_child_of_the_previous_choice():
    table, p = random_case()
    out = T.tree_vq(table, p)
    codes = np.asarray(out.codes)
    assert codes.shape == (128, 4) and out.quantized.shape == (128, 4, 8)
    assert set(np.unique(codes[:, 0])) <= {2, 3}
    for h in range(1, 4):
        assert (codes[:, h] // 2 == codes[:, h - 1]).all()
    # Each level's code is the nearer (by cosine) of the two children of the previous choice.
    tn = np.asarray(table) / np.linalg.norm(table, axis=1, keepdims=True)
    pn = np.asarray(p) / np.linalg.norm(p, axis=1, keepdims=True)
    parent = np.ones(len(p), int)
    for h in range(4):
        cos = np.stack([(pn * tn[2 * parent]).sum(1), (pn * tn[2 * parent + 1]).sum(1)], 1)
        parent = 2 * parent + (cos[:, 1] > cos[:, 0])
        assert (codes[:, h] == parent).all()
    np.testing.assert_array_equal(T.paths(out.codes), codes - 2 ** np.arange(1, 5))


def test_straight_through_and_codebook_gradients():
    table, p = random_case()
    # STE: q_st = p + sg(q - p), so d sum(q_st) / dp is exactly 1 per level.
    g_p = jax.grad(lambda p: T.tree_vq(table, p).quantized.sum())(p)
    np.testing.assert_allclose(g_p, np.full(p.shape, 4.0), rtol=1e-6)
    # Without the reverse term the codebook term moves exactly the selected codes.
    out = T.tree_vq(table, p, reverse=False)
    g_t = jax.grad(lambda t: T.tree_vq(t, p, reverse=False).loss)(table)
    moved = np.nonzero(np.abs(np.asarray(g_t)).sum(1) > 0)[0]
    assert set(moved) == set(np.unique(np.asarray(out.codes)))
    # The commitment direction reaches the inputs.
    g_in = jax.grad(lambda p: T.tree_vq(table, p, reverse=False).loss)(p)
    assert np.abs(np.asarray(g_in)).sum() > 0
    # The reverse term also pulls codes that no sample selected but whose parent has samples.
    g_rev = jax.grad(lambda t: T.tree_vq(t, p, reverse=True).loss)(table)
    assert (np.abs(np.asarray(g_rev)).sum(1) > 0).sum() >= len(moved)


def test_hand_computed_two_level_example():
    # Depth 2, D = 2. Rows: 2 = (1,0), 3 = (0,1), 4 = (1,1), 5 = (1,-1), 6 = (-1,1), 7 = (-1,-1).
    table = jnp.array([[0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [1, -1], [-1, 1], [-1, -1]], jnp.float32)
    p = jnp.array([[2.0, 0.5]])
    norm_p = math.sqrt(4.25)
    c2, c3 = 2 / norm_p, 0.5 / norm_p                        # level 1: pick 2
    c4, c5 = 2.5 / (norm_p * math.sqrt(2)), 1.5 / (norm_p * math.sqrt(2))   # level 2: pick 4
    out = T.tree_vq(table, p, eta=1.0, reverse=False)
    assert np.asarray(out.codes).tolist() == [[2, 4]]
    np.testing.assert_allclose(out.level_loss, [2 * (1 - c2), 2 * (1 - c4)], rtol=1e-5)  # f32 1 - cos
    np.testing.assert_allclose(out.loss, (1 - c2) + (1 - c4), rtol=1e-5)
    # eta weights the codebook direction; mu the reverse term: level 1 pulls codes 2 and 3
    # (parent 1 has the sample), level 2 codes 4 and 5 (parent 2 has it), not 6 and 7.
    out = T.tree_vq(table, p, eta=0.5, mu=2.0, reverse=True)
    level1 = 1.5 * (1 - c2) + 2.0 * ((1 - c2) + (1 - c3)) / 2
    level2 = 1.5 * (1 - c4) + 2.0 * ((1 - c4) + (1 - c5)) / 2
    np.testing.assert_allclose(out.level_loss, [level1, level2], rtol=1e-5)
    np.testing.assert_allclose(out.quantized[0, 1], [1 / math.sqrt(2)] * 2, rtol=1e-6)


def test_usage_perplexity_dead_codes():
    table = jnp.array([[0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [1, -1], [-1, 1], [-1, -1]], jnp.float32)
    p = jnp.array([[2.0, 0.5], [2.0, 0.4], [1.0, -0.5], [3.0, 0.1], [9.0, 9.0]])
    mask = jnp.array([True, True, True, True, False])
    out = T.tree_vq(table, p, mask)
    np.testing.assert_array_equal(out.usage[0], [0, 0, 4, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.usage[1], [0, 0, 0, 0, 3, 1, 0, 0])
    np.testing.assert_allclose(out.perplexity[0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out.perplexity[1], math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rtol=1e-6)
    np.testing.assert_allclose(out.dead_fraction, [0.5, 0.5])
    new, n_restarted = T.restart_dead_codes(table, out.usage, p, jax.random.key(0))
    new, table = np.asarray(new), np.asarray(table)
    assert int(n_restarted) == 3                               # codes 3, 6, 7
    np.testing.assert_array_equal(new[[2, 4, 5]], table[[2, 4, 5]])
    assert not np.allclose(new[[3, 6, 7]], table[[3, 6, 7]])


def test_cosine_bound_on_random_inputs():
    # Paper property: p1, p2 assigned to the same code q with cos(p_k, q) >= alpha >= 0 satisfy
    # cos(p1, p2) >= 2 alpha^2 - 1. Checked for every pair sharing a leaf, alpha = the smaller cosine.
    table, p = random_case(depth=3, dim=4, n=400, seed=5)
    out = T.tree_vq(table, p)
    tn = np.asarray(table) / np.linalg.norm(table, axis=1, keepdims=True)
    pn = np.asarray(p) / np.linalg.norm(p, axis=1, keepdims=True)
    leaf = np.asarray(out.codes)[:, -1]
    checked = 0
    for code in np.unique(leaf):
        members = pn[leaf == code]
        cos_q = members @ tn[code]
        alpha = np.minimum(cos_q[:, None], cos_q[None, :])
        ok = alpha >= 0
        assert ((members @ members.T)[ok] >= (2 * alpha ** 2 - 1)[ok] - 1e-5).all()
        checked += ok.sum()
    assert checked > 1000


def test_sharded_statistics_equal_single_device(mesh8):
    table, p = random_case(depth=5, dim=8, n=64, seed=2)
    mask = jnp.arange(64) % 7 != 0
    ref = T.tree_vq(table, p, mask)
    spec = T.TreeVQOutput(P("data"), P("data"), P(), P(), P(), P(), P())
    fn = jax.shard_map(lambda t, x, m: T.tree_vq(t, x, m, axis_name="data"), mesh=mesh8,
                       in_specs=(P(), P("data"), P("data")), out_specs=spec)
    out = jax.jit(fn)(table, p, mask)
    np.testing.assert_array_equal(out.codes, ref.codes)
    np.testing.assert_allclose(out.loss, ref.loss, rtol=1e-6)
    np.testing.assert_array_equal(out.usage, ref.usage)
    np.testing.assert_allclose(out.perplexity, ref.perplexity, rtol=1e-6)
    g_ref = jax.grad(lambda t: T.tree_vq(t, p, mask).loss)(table)
    g_out = jax.grad(lambda t: jax.jit(fn)(t, p, mask).loss)(table)
    np.testing.assert_allclose(g_out, g_ref, rtol=1e-5, atol=1e-8)
