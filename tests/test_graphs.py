"""Padded graph batches: contents, masks, fixed shapes, and segment ops against numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chmr_jax.data import featurize, graphs

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "C", "C1CCCCC1N", "CCCCCCCCCC", "O=C=O", "c1ccncc1"] * 5


@pytest.fixture(scope="module")
def feats():
    return featurize.featurize_smiles(SMILES, featurize.FeaturizerSettings(), None, n_workers=1,
                                      show_progress=False)


def test_budget_estimator():
    atoms = np.array([10, 20, 30, 40])
    edges = 2 * atoms
    b = graphs.estimate_budget(atoms, edges, batch_size=2, pad_multiple=64)
    assert b.n_graph == 3 and b.n_node % 64 == 0 and b.n_edge % 64 == 0
    # mean 25, std ~11.18: 25*2 + 4*11.18*sqrt(2) = 113.2 -> 114 + 1 padding node -> 128
    assert b.n_node == 128 and b.n_edge == 256
    big = graphs.estimate_budget([5, 5, 500], [0, 0, 0], batch_size=1, pad_multiple=64)
    assert big.n_node >= 501          # always room for the largest single molecule + padding
    with pytest.raises(ValueError, match="empty dataset"):
        graphs.estimate_budget([], [], 4)


def test_pack_reconstructs_each_molecule(feats):
    budget = graphs.GraphBudget(n_node=64, n_edge=128, n_graph=5)
    batch = graphs.pack(feats, [2, 0, 1], budget)
    assert batch.nodes.shape == (64, 9) and batch.edges.shape == (128, 3) and batch.index.shape == (5,)
    assert batch.graph_mask.tolist() == [True, True, True, False, False]
    assert batch.index.tolist() == [2, 0, 1, -1, -1]
    for slot, i in enumerate([2, 0, 1]):
        nodes, edge_index, edge_feats = feats.graph(i)
        sel = np.nonzero(batch.node_graph == slot)[0]
        np.testing.assert_array_equal(batch.nodes[sel], nodes)
        esel = np.nonzero(batch.edge_mask & (batch.node_graph[batch.senders] == slot))[0]
        np.testing.assert_array_equal(batch.senders[esel] - sel[0], edge_index[:, 0])
        np.testing.assert_array_equal(batch.receivers[esel] - sel[0], edge_index[:, 1])
        np.testing.assert_array_equal(batch.edges[esel], edge_feats)
    n_real = 3 + 6 + 4
    assert batch.node_mask.sum() == n_real and batch.node_mask[:n_real].all()
    assert (batch.node_graph[~batch.node_mask] == 4).all()         # the padding graph
    assert batch.n_node.sum() == 64 and batch.n_node.tolist()[:3] == [4, 3, 6]
    pad_edges = ~batch.edge_mask
    assert (batch.senders[pad_edges] == 63).all() and (batch.receivers[pad_edges] == 63).all()


def test_pack_rejects_overflow(feats):
    with pytest.raises(ValueError, match="budget"):
        graphs.pack(feats, [0, 1, 2], graphs.GraphBudget(n_node=8, n_edge=64, n_graph=5))
    with pytest.raises(ValueError, match="exceed the graph budget"):
        graphs.pack(feats, [0, 1, 2], graphs.GraphBudget(n_node=64, n_edge=64, n_graph=3))


def test_batches_fixed_shapes_cover_every_molecule_once(feats):
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, batch_size=6, pad_multiple=16, n_sigma=0.0)
    order = np.random.default_rng(0).permutation(len(feats))
    seen = []
    shapes = set()
    for batch in graphs.batches(feats, order, budget):
        shapes.add(tuple(x.shape for x in batch))
        seen += batch.index[batch.graph_mask].tolist()
        assert batch.node_mask.sum() <= budget.n_node - 1
    assert len(shapes) == 1
    assert seen == order.tolist()        # order kept, nothing dropped or duplicated


def test_batches_error_names_oversized_molecule(feats):
    with pytest.raises(ValueError, match=r"molecule 5 \(CCCCCCCCCC\) has 10 atoms"):
        list(graphs.batches(feats, [0, 5], graphs.GraphBudget(n_node=8, n_edge=64, n_graph=3)))


def test_segment_ops_match_numpy(feats):
    budget = graphs.GraphBudget(n_node=64, n_edge=128, n_graph=5)
    batch = graphs.pack(feats, [2, 0, 1], budget)
    x = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
    args = (jnp.asarray(x), jnp.asarray(batch.node_graph), 5, jnp.asarray(batch.node_mask))
    total = np.asarray(jax.jit(graphs.segment_sum, static_argnums=2)(*args))
    mean = np.asarray(graphs.segment_mean(*args))
    mx = np.asarray(graphs.segment_max(*args))
    for g in range(5):
        rows = x[(batch.node_graph == g) & batch.node_mask]
        np.testing.assert_allclose(total[g], rows.sum(0) if len(rows) else 0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mean[g], rows.mean(0) if len(rows) else 0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mx[g], rows.max(0) if len(rows) else 0, rtol=1e-6)
    assert np.isfinite(mean).all() and np.isfinite(mx).all()


def test_batch_is_a_pytree(feats):
    batch = graphs.pack(feats, [0, 1], graphs.GraphBudget(n_node=32, n_edge=64, n_graph=3))
    device = jax.tree_util.tree_map(jnp.asarray, batch)
    assert isinstance(device, graphs.GraphBatch)
    count = jax.jit(lambda b: graphs.segment_sum(jnp.ones(b.nodes.shape[0]), b.node_graph, 3, b.node_mask))(device)
    assert np.asarray(count).tolist() == [3, 6, 0]


def test_rounded_up_graph_slots_never_take_more_than_batch_size_molecules(feats):
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, batch_size=3, graph_multiple=8, n_sigma=20)
    assert budget.n_graph == 8 and budget.max_molecules == 3
    groups = graphs.partition(feats, range(10), budget)
    assert [len(g) for g in groups] == [3, 3, 3, 1]
    assert [int(i) for g in groups for i in g] == list(range(10))


def _blocked(feats, batch_size=12, blocks=4):
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, batch_size, pad_multiple=8, blocks=blocks)
    return budget, graphs.partition(feats, np.arange(len(SMILES)), budget)


def test_blocked_batches_keep_every_index_in_its_block(feats):
    budget, groups = _blocked(feats)
    assert budget.blocks == 4 and budget.n_node % 4 == 0 and budget.n_edge % 4 == 0 and budget.n_graph % 4 == 0
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(SMILES)))     # every molecule once
    one = budget.block()
    for group in groups:
        b = graphs.pack(feats, group, budget)
        assert b.blocks.tolist() == [[0, 1, 2, 3]] and b.nodes.shape[0] == budget.n_node
        assert sorted(b.index[b.index >= 0].tolist()) == sorted(group.tolist()) and len(group) <= budget.max_molecules
        node_block = np.arange(budget.n_node) // one.n_node
        edge_block = np.arange(budget.n_edge) // one.n_edge
        np.testing.assert_array_equal(b.senders // one.n_node, edge_block)
        np.testing.assert_array_equal(b.receivers // one.n_node, edge_block)
        np.testing.assert_array_equal(b.node_graph // one.n_graph, node_block)
        # each block's last slot is its padding graph, and owns the block's padding nodes
        pad_slots = np.arange(4) * one.n_graph + one.n_graph - 1
        assert not b.graph_mask[pad_slots].any()
        assert (b.n_node.reshape(4, -1).sum(1) == one.n_node).all()
        # every molecule's nodes and edges are its own, in its slot
        for slot in np.nonzero(b.graph_mask)[0]:
            nodes, edge_index, _ = feats.graph(b.index[slot])
            sel = np.nonzero((b.node_graph == slot) & b.node_mask)[0]
            np.testing.assert_array_equal(b.nodes[sel], nodes)


def test_blocked_rows_concatenate_to_the_whole_batch(feats):
    """What each host packs for its devices' blocks (rows) concatenates to the whole blocked batch."""
    budget, groups = _blocked(feats)
    whole = graphs.pack(feats, groups[0], budget)
    one = budget.block()
    halves = [graphs.pack(feats, groups[0], budget, graphs.Rows((2 * h * one.n_node, 2 * (h + 1) * one.n_node),
                                                                (2 * h * one.n_edge, 2 * (h + 1) * one.n_edge),
                                                                (2 * h * one.n_graph, 2 * (h + 1) * one.n_graph)))
              for h in range(2)]
    for f in graphs.GraphBatch._fields:
        np.testing.assert_array_equal(np.concatenate([getattr(p, f) for p in halves]), getattr(whole, f), f)


def test_blocked_gnn_equals_the_global_layout(feats):
    """The GNN's per-molecule readout (train mode: batch statistics over the same real nodes) is the
    same whether the batch is one global layout or 4 blocks with block-local indices (float64)."""
    from flax import nnx
    from helpers import as_float64
    from chmr_jax.mechanisms import model as model_lib
    jax.config.update("jax_enable_x64", True)
    try:
        budget, groups = _blocked(feats)
        group = groups[0]
        flat = graphs.estimate_budget(feats.n_atoms, feats.n_edges, len(group), pad_multiple=8)
        for remat in (False,):   # (remat's layers call the same blocked ops; float64 casting does not reach its scan)
            gnn = as_float64(model_lib.GNNVirtualNode(n_layers=3, dim=16, dropout=0.0, remat=remat, rngs=nnx.Rngs(0)))
            gnn.train()
            outs = []
            for b in (graphs.pack(feats, group, flat), graphs.pack(feats, group, budget)):
                b = jax.tree_util.tree_map(jnp.asarray, b)
                r = np.asarray(gnn.readout(b))
                outs.append({int(i): r[s] for s, i in enumerate(np.asarray(b.index)) if i >= 0})
            assert outs[0].keys() == outs[1].keys() == set(group.tolist())
            for i in outs[0]:
                np.testing.assert_allclose(outs[1][i], outs[0][i], rtol=1e-10, atol=1e-10)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_blocked_segment_ops_match_numpy():
    rng = np.random.default_rng(0)
    blocks, n, e = 4, 6, 10
    x = rng.normal(size=(blocks * n, 3))
    idx = np.concatenate([rng.integers(0, n, e) + b * n for b in range(blocks)])
    np.testing.assert_allclose(graphs.gather_rows(jnp.asarray(x), jnp.asarray(idx), blocks), x[idx], rtol=1e-6)
    data = rng.normal(size=(blocks * e, 3)).astype(np.float32)
    ref = np.zeros((blocks * n, 3), np.float32)
    np.add.at(ref, idx, data)
    np.testing.assert_allclose(graphs.segment_sum(jnp.asarray(data), jnp.asarray(idx), blocks * n, blocks=blocks),
                               ref, rtol=1e-5, atol=1e-6)
