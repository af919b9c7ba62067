"""The context-reconstruction term with the walk-target tables split by rows over 8 (fake CPU) devices
(objective.walk_target_statistics under shard_map) against the one-device computation, and the
placement of the tables (train.context_on_devices).

The two computations sum the same entries in different orders (per-device partial sums, then a
reduce-scatter), so they run in float64 (jax.enable_x64, as tests/helpers.as_float64 explains): each
statistic is a sum of at most S x 8 terms of size <= 1, the loss a sum of G x T of them, and 1e-10
relative is orders of magnitude above float64 rounding (~1e-14) yet catches any entry counted twice,
missed, or delivered to the wrong molecule.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chmr_jax.mechanisms import context as C, objective
from chmr_jax.training import train

G, L, K = 24, 4, 3          # graph slots (3 per device), walk length, decoder input width
# Node types: rows not multiples of 8; 'empty' has no nodes (context_arrays' one masked row).
N_ROWS = {"molecule": 37, "cell": 13, "empty": 0}
D = {"molecule": 20, "cell": 7, "empty": 5}


def synthetic_ctx(seed=0):
    """A context_arrays-shaped dict: molecule nodes 0..36 (binary uint8 targets), cell nodes 37..49
    (float targets, NaN where unobserved), a node type without nodes; random weighted edges, some
    molecules without any (their walks stay put with beta 0)."""
    rng = np.random.default_rng(seed)
    n_mol, n_cell = N_ROWS["molecule"], N_ROWS["cell"]
    n = n_mol + n_cell
    node_type = np.r_[np.zeros(n_mol, np.int32), np.ones(n_cell, np.int32)]
    node_row = np.r_[np.arange(n_mol), np.arange(n_cell)].astype(np.int32)
    adj = [[] for _ in range(n)]
    for a in range(n_mol - 3):           # the last 3 molecules: no edges
        for b in rng.choice(n, size=3, replace=False):
            if b != a and b < n_mol - 3 or b >= n_mol:
                adj[a].append(int(b)), adj[int(b)].append(a)
    indptr = np.r_[0, np.cumsum([len(x) for x in adj])].astype(np.int32)
    indices = np.concatenate([np.asarray(x, np.int32) for x in adj])
    weights = rng.uniform(0.2, 1.0, len(indices)).astype(np.float32)
    graph = C.ContextGraph(indptr=indptr, indices=indices, weights=weights, node_type=node_type,
                           node_row=node_row, type_names=list(N_ROWS),
                           targets={"molecule": (rng.random((n_mol, D["molecule"])) < 0.3).astype(np.float32),
                                    "cell": rng.random((n_cell, D["cell"])).astype(np.float32),
                                    "empty": np.zeros((0, D["empty"]), np.float32)},
                           target_mask={"molecule": np.ones((n_mol, D["molecule"]), bool),
                                        "cell": rng.random((n_cell, D["cell"])) < 0.6,
                                        "empty": np.zeros((0, D["empty"]), bool)}, thresholds={})
    graph.targets["cell"][~graph.target_mask["cell"]] = np.nan
    return objective.context_arrays(graph)


def walks(ctx, seed=1):
    """Nodes of a padded batch: 18 real slots (molecule nodes, the edgeless ones included), 6 padding."""
    rng = np.random.default_rng(seed)
    gm = np.arange(G) % 4 != 3
    start = rng.integers(0, N_ROWS["molecule"], G).astype(np.int32)
    start[:3] = N_ROWS["molecule"] - 1 - np.arange(3)
    nodes, beta = C.random_walks(jnp.asarray(ctx["indptr"]), jnp.asarray(ctx["indices"]),
                                 jnp.asarray(ctx["weights"]), jnp.asarray(start), jax.random.key(seed), L)
    return np.asarray(nodes), np.asarray(beta, np.float64) * gm[:, None], gm


def cpr(params, x, ctx, nodes, beta, gm, kind, mesh):
    """The objective's CPR block with a linear decoder per node type: sum over types of the term."""
    node_type, node_row = jnp.asarray(ctx["node_type"])[nodes], jnp.asarray(ctx["node_row"])[nodes]
    total = 0.0
    for t, name in enumerate(N_ROWS):
        logits = x @ params[name]
        rows = jnp.where((node_type == t) & gm[:, None], node_row, -1)
        stats = objective.walk_target_statistics(ctx["targets"][name], ctx["target_mask"][name], rows, beta,
                                                 D[name], kind, mesh)
        total = total + C.loss_from_statistics(logits, stats, kind)
    return total


@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_row_sharded_cpr_equals_one_device(mesh8, kind):
    with jax.enable_x64(True):
        ctx = synthetic_ctx()
        nodes, beta, gm = walks(ctx)
        rng = np.random.default_rng(2)
        x = rng.normal(size=(G, K))
        params = {name: rng.normal(size=(K, D[name])) for name in N_ROWS}
        value_and_grad = jax.value_and_grad(cpr, argnums=(0, 1))

        # One device: the whole tables (context_arrays' host arrays, unpadded).
        ref, (ref_dp, ref_dx) = jax.jit(lambda p, x: value_and_grad(p, x, ctx, nodes, beta, gm, kind, None))(params, x)
        assert float(ref) > 0

        # The definition: every walk position repeats the molecule's logits (context.reconstruction_loss).
        direct = 0.0
        for t, name in enumerate(N_ROWS):
            is_t = (np.asarray(ctx["node_type"])[nodes] == t) & gm[:, None]
            rows = np.where(is_t, np.asarray(ctx["node_row"])[nodes], 0)
            target = np.asarray(ctx["targets"][name])[rows][..., :D[name]]
            mask = np.asarray(ctx["target_mask"][name])[rows][..., :D[name]] & is_t[..., None]
            logits = np.broadcast_to((x @ params[name])[:, None], mask.shape)
            direct += float(C.reconstruction_loss(logits.reshape(-1, D[name]), target.reshape(-1, D[name]),
                                                  mask.reshape(-1, D[name]), beta.reshape(-1), kind))
        np.testing.assert_allclose(ref, direct, rtol=1e-10)

        # 8 devices: tables split by rows, batch by slots, parameters replicated.
        dev = train.context_on_devices(ctx, mesh8, split=True)
        sharded, replicated = NamedSharding(mesh8, P("data")), NamedSharding(mesh8, P())
        x8, nodes8, beta8, gm8 = (jax.device_put(a, sharded) for a in (x, nodes, beta, gm))
        p8 = jax.device_put(params, replicated)
        step = jax.jit(lambda p, x, c, n, b, m: value_and_grad(p, x, c, n, b, m, kind, mesh8))
        val, (dp, dx) = step(p8, x8, dev, nodes8, beta8, gm8)
        np.testing.assert_allclose(val, ref, rtol=1e-10)
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-10, atol=1e-14)
        for name in N_ROWS:
            np.testing.assert_allclose(dp[name], ref_dp[name], rtol=1e-10, atol=1e-14)
        assert dx.sharding.is_equivalent_to(sharded, 2)        # the logits' rows stayed where they were
        assert not np.any(np.asarray(ref_dp["empty"]))         # no nodes of that type: no gradient
        # No table is gathered: the only all-gathers are of the walks ([G, L+1] rows / beta).
        hlo = step.lower(p8, x8, dev, nodes8, beta8, gm8).compile().as_text()
        gathered = re.findall(r"= (\w+\[[\d,]*\])[^=]* all-gather\(", hlo)
        assert gathered and {g.split("[")[1] for g in gathered} == {f"{G},{L + 1}]"}, gathered

        # A table that is not padded yet (objective called on context_arrays' arrays under a mesh).
        val_unpadded = jax.jit(lambda p, x, n, b, m: cpr(p, x, ctx, n, b, m, kind, mesh8))(p8, x8, nodes8, beta8, gm8)
        np.testing.assert_allclose(val_unpadded, ref, rtol=1e-10)


def test_context_tables_are_split_by_rows(mesh8):
    ctx = synthetic_ctx()
    dev = train.context_on_devices(ctx, mesh8, split=True)
    for name, n in N_ROWS.items():
        n_pad = -(-max(n, 1) // 8) * 8
        for key in train.CONTEXT_TABLES:
            host, placed = np.asarray(ctx[key][name]), dev[key][name]
            assert placed.shape == (n_pad,) + host.shape[1:]
            assert placed.shape[1] % 128 == 0
            assert {s.data.shape for s in placed.addressable_shards} == {(n_pad // 8,) + host.shape[1:]}
            full = np.asarray(placed)
            np.testing.assert_array_equal(full[:len(host)], host)
            assert not full[len(host):].any()          # padding rows: zero targets, masked
    for key in ("indptr", "indices", "weights", "node_type", "node_row"):
        assert dev[key].sharding.is_fully_replicated and dev[key].shape == np.shape(ctx[key])


def test_tables_are_split_only_past_the_threshold(mesh8, monkeypatch):
    """Small tables stay whole on every device (the split makes each device gather the whole global
    batch's walks: slower where the tables fit); past train.CONTEXT_SPLIT_BYTES (all node types' tables
    together, targets and masks) they are split by rows. The threshold's definition, by bytes."""
    ctx = synthetic_ctx()
    total = sum(np.asarray(x).nbytes for k in train.CONTEXT_TABLES for x in ctx[k].values())
    monkeypatch.setattr(train, "CONTEXT_SPLIT_BYTES", total)
    assert not train.split_context_tables(ctx)
    whole = train.context_on_devices(ctx, mesh8)
    for key in train.CONTEXT_TABLES:
        for name in N_ROWS:
            assert whole[key][name].sharding.is_fully_replicated
            assert whole[key][name].shape == np.shape(ctx[key][name])      # not padded
    monkeypatch.setattr(train, "CONTEXT_SPLIT_BYTES", total - 1)
    assert train.split_context_tables(ctx)
    assert not train.context_on_devices(ctx, mesh8)["targets"]["molecule"].sharding.is_fully_replicated
    assert train.split_context_tables(ctx, split=False) is False                # an explicit choice wins
