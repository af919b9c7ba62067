"""The NNX model: shapes, masking (padding never changes results), the GIN message passing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import as_float64

from chmr_jax.data import featurize, graphs
from chmr_jax.mechanisms import model as M

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "C1CCCCC1N", "CCCl"]


@pytest.fixture(scope="module")
def feats():
    return featurize.featurize_smiles(SMILES, featurize.FeaturizerSettings(), None, n_workers=1, show_progress=False)


def to_jax(batch):
    return jax.tree_util.tree_map(jnp.asarray, batch)


def small_model(dropout=0.0, **kw):
    return M.CHMR({"fingerprint": 1191, "graph": 32}, {"cell": 20}, {"molecule": 1024, "cell": 20},
                  latent=16, gnn_layers=3, gnn_width=32, gnn_dropout=dropout, tree_depth=3, rngs=nnx.Rngs(0), **kw)


def test_encode_shapes_and_anchor(feats):
    m = small_model()
    batch = to_jax(graphs.pack(feats, [0, 1, 2, 3], graphs.GraphBudget(64, 64, 5)))
    fp = np.zeros((5, 1191), np.float32)
    fp[:4] = feats.fingerprints([0, 1, 2, 3])
    out = m.encode(batch, {"fingerprint": fp, "cell": np.ones((5, 20), np.float32)})
    assert {k: v.shape for k, v in out.items()} == {"fingerprint": (5, 16), "graph": (5, 16),
                                                     "anchor": (5, 16), "cell": (5, 16)}
    np.testing.assert_allclose(out["anchor"], out["fingerprint"] + out["graph"], rtol=1e-6)
    assert m.codebook[...].shape == (16, 16)                 # 2^(3+1) rows


def test_padding_and_batch_mates_do_not_change_results(feats):
    # Semantics, not rounding: float64 (see helpers.as_float64), where equal means equal to ~1e-13.
    with jax.enable_x64(True):
        m = as_float64(small_model(dropout=0.0))
        small = to_jax(graphs.pack(feats, [0, 1, 2], graphs.GraphBudget(32, 64, 4)))
        large = to_jax(graphs.pack(feats, [0, 1, 2], graphs.GraphBudget(128, 256, 9)))
        # Train mode: batch norm statistics come from real nodes only, so extra padding is invisible.
        m.train()
        assert m.gnn.readout(small).dtype == jnp.float64
        np.testing.assert_allclose(m.gnn.readout(small)[:3], m.gnn.readout(large)[:3], rtol=1e-9, atol=1e-9)
        # Eval mode: a molecule's embedding does not depend on the other molecules in its batch.
        m.eval()
        alone = to_jax(graphs.pack(feats, [2], graphs.GraphBudget(32, 64, 4)))
        np.testing.assert_allclose(m.gnn.readout(small)[2], m.gnn.readout(alone)[0], rtol=1e-9, atol=1e-9)
        assert np.all(np.asarray(m.gnn.readout(small)[3:]) == 0)  # padding graph slots


def _loss_and_grads(m, batch, inputs):
    """A scalar of every output (projections, a decoder) and its gradients, in train mode."""
    def loss(m):
        out = m.encode(batch, inputs)
        return sum(jnp.sum(jnp.tanh(v)) for v in out.values()) + jnp.sum(m.decoders["cell"](out["anchor"]))
    m.train()
    return nnx.value_and_grad(loss)(m)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_remat_gives_the_same_loss_and_gradients(feats, dropout):
    # The scanned, checkpointed layers compute the same operations as the unrolled loop: equal to
    # rounding (float64), batch-norm statistics included; with dropout, the same units drop (both
    # models start from the same RNG stream, nnx.Rngs(0)).
    with jax.enable_x64(True):
        batch = to_jax(graphs.pack(feats, [0, 1, 2, 3], graphs.GraphBudget(64, 64, 5)))
        fp = np.zeros((5, 1191))
        fp[:4] = feats.fingerprints([0, 1, 2, 3])
        inputs = {"fingerprint": jnp.asarray(fp), "cell": jnp.ones((5, 20), jnp.float64)}
        # dtype=float64: the embeddings and matmuls compute in float64 too (their default is the
        # parameters' declared float32), so only real differences could exceed the tolerance.
        models = [as_float64(small_model(dropout, remat=r, dtype=jnp.float64)) for r in (False, True)]
        (l0, g0), (l1, g1) = (_loss_and_grads(m, batch, inputs) for m in models)
        assert float(l0) == pytest.approx(float(l1), rel=1e-12)
        flat0, flat1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
        assert len(flat0) == len(flat1) > 20
        for a, b in zip(flat0, flat1):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        # The train-mode batch-norm statistics the scanned layers computed reach the modules.
        stats0, stats1 = (jax.tree_util.tree_leaves(nnx.state(m, nnx.BatchStat)) for m in models)
        assert len(stats0) == len(stats1) > 10
        for a, b in zip(stats0, stats1):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_remat_shrinks_the_compiled_footprint_of_the_gnn_backward_pass():
    # What remat is for: XLA's compiled temporaries of value-and-grad through the GNN (the stored
    # activations) must shrink. 5 layers x [N, 2D] hidden activations dominate without remat; with
    # it, only each layer's [N, D] input is kept (measured ~0.3x here; asserted < 0.6x).
    n, e, g = 4000, 8800, 160
    rng = np.random.default_rng(0)
    batch = graphs.GraphBatch(
        nodes=np.stack([rng.integers(0, v, n) for v in featurize.ATOM_VOCAB_SIZES], 1).astype(np.int32),
        edges=np.stack([rng.integers(0, v, e) for v in featurize.BOND_VOCAB_SIZES], 1).astype(np.int32),
        senders=rng.integers(0, n, e).astype(np.int32), receivers=rng.integers(0, n, e).astype(np.int32),
        node_graph=np.sort(rng.integers(0, g, n)).astype(np.int32), n_node=np.zeros(g, np.int32),
        node_mask=np.ones(n, bool), edge_mask=np.ones(e, bool), graph_mask=np.ones(g, bool),
        index=np.arange(g, dtype=np.int32))
    temp = {}
    for remat in (False, True):
        gnn = M.GNNVirtualNode(5, 128, 0.5, True, None, remat=remat, rngs=nnx.Rngs(0))
        gnn.train()
        graphdef, params, rest = nnx.split(gnn, nnx.Param, ...)

        def loss(params, rest):
            return jnp.mean(nnx.merge(graphdef, params, rest, copy=True)(batch) ** 2)
        compiled = jax.jit(jax.grad(loss)).lower(params, rest).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.6 * temp[False], temp


def test_bfloat16_computes_in_bf16_and_keeps_float32_where_it_matters(feats):
    batch = to_jax(graphs.pack(feats, [0, 1, 2, 3], graphs.GraphBudget(64, 64, 5)))
    fp = np.zeros((5, 1191), np.float32)
    fp[:4] = feats.fingerprints([0, 1, 2, 3])
    inputs = {"fingerprint": fp, "cell": np.ones((5, 20), np.float32)}
    bf16 = small_model(dtype=jnp.bfloat16)
    # Parameters and batch statistics stay float32, node states are bf16, and every output the losses
    # see is float32.
    for leaf in jax.tree_util.tree_leaves(nnx.state(bf16)):
        assert leaf.dtype != jnp.bfloat16
    assert bf16.gnn(batch).dtype == jnp.bfloat16
    out16 = bf16.encode(batch, inputs)
    assert all(v.dtype == jnp.float32 for v in out16.values())
    assert bf16.decoders["cell"](out16["anchor"]).dtype == jnp.float32
    # Where the sums accumulate: the three tests below, each against an exact (float64) sum of the
    # same bf16 terms.


# bf16 accumulation tests. Each sums K same-sign bf16 terms; the bound is what float32 accumulation
# allows: the float32 sum's error (<= K * 2^-24 of the sum of |terms|) plus, where the result is
# stored in bf16, one final rounding (at most 2^-8 of it: bf16 keeps 8 significant bits). A bf16
# accumulator rounds at every add: once the partial sum passes 2^8 times a term, each add loses up
# to half a term (terms below half an ulp are lost whole), far beyond that bound.
U = 2.0 ** -8


def f32_sum_bound(exact, abs_sum, k, stored_bf16):
    return (U if stored_bf16 else 0.0) * np.abs(exact) + (k + 1) * 2.0 ** -24 * abs_sum


class _Identity(nnx.Module):
    def __call__(self, x, mask):
        return x


def test_bfloat16_gin_sums_a_nodes_messages_in_float32():
    k, dim = 1024, 8                                  # node 0 receives from nodes 1..k
    conv = M.GINConv(dim, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    conv.mlp = _Identity()                            # conv(h) = ((1 + eps) h + agg) in h's dtype; eps = 0
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.uniform(0.5, 1.5, (k + 1, dim)), jnp.bfloat16)
    batch = graphs.GraphBatch(
        nodes=np.zeros((k + 1, len(featurize.ATOM_VOCAB_SIZES)), np.int32),
        edges=np.zeros((k, len(featurize.BOND_VOCAB_SIZES)), np.int32),
        senders=np.arange(1, k + 1, dtype=np.int32), receivers=np.zeros(k, np.int32),
        node_graph=np.zeros(k + 1, np.int32), n_node=np.array([k + 1], np.int32),
        node_mask=np.ones(k + 1, bool), edge_mask=np.ones(k, bool), graph_mask=np.ones(1, bool),
        index=np.zeros(1, np.int32))
    out = np.asarray(conv(h, batch)[0], np.float64)
    msg = np.asarray(jax.nn.relu(h[1:] + conv.bond(batch.edges)), np.float64)   # the model's bf16 messages
    exact = np.asarray(h[0], np.float64) + msg.sum(0)
    bound = f32_sum_bound(exact, np.abs(exact), k, stored_bf16=True)
    assert np.all(np.abs(out - exact) <= bound), np.max(np.abs(out - exact) / bound)


def test_bfloat16_virtual_node_gradient_sums_over_the_graph_in_float32():
    # The backward pass of vn[node_graph] adds the cotangents of a graph's nodes into the graph's row.
    n, dim = 4096, 8                                  # one graph of n nodes
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(n, dim)), jnp.bfloat16)
    vn = jnp.asarray(rng.normal(size=(1, dim)), jnp.bfloat16)
    w = jnp.asarray(rng.uniform(0.5, 1.5, (n, dim)), jnp.bfloat16)    # the cotangent of each node
    node_graph = jnp.zeros(n, jnp.int32)
    grad = jax.grad(lambda v: jnp.sum(M.add_virtual_node(h, v, node_graph).astype(jnp.float32) * w))(vn)
    assert grad.dtype == jnp.bfloat16
    exact = np.asarray(w, np.float64).sum(0)
    bound = f32_sum_bound(exact, exact, n, stored_bf16=True)
    err = np.abs(np.asarray(grad[0], np.float64) - exact)
    assert np.all(err <= bound), np.max(err / bound)


def test_bfloat16_decoder_logits_accumulate_in_float32():
    dec = M.Decoder(16, 12, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    dec.eval()
    x = jax.random.normal(jax.random.key(0), (32, 16))
    logits = dec(x)
    assert logits.dtype == jnp.float32
    # The last layer's bf16 inputs and kernel, as the model casts them; the logits are their float32
    # dot product (64 terms) plus the bias, never rounded to bf16.
    hidden = np.asarray(jax.nn.gelu(dec.hidden(dec.norm(x)), approximate=False), np.float64)
    kernel = np.asarray(dec.out.kernel[...].astype(jnp.bfloat16), np.float64)
    bias = np.asarray(dec.out.bias[...].astype(jnp.bfloat16), np.float64)
    exact = hidden @ kernel + bias
    bound = f32_sum_bound(exact, np.abs(hidden) @ np.abs(kernel) + np.abs(bias), hidden.shape[1] + 1,
                          stored_bf16=False)
    err = np.abs(np.asarray(logits, np.float64) - exact)
    assert np.all(err <= bound), np.max(err / bound)


def test_gin_aggregates_over_real_incoming_edges(feats):
    conv = M.GINConv(8, rngs=nnx.Rngs(1))
    batch = to_jax(graphs.pack(feats, [0], graphs.GraphBudget(16, 16, 2)))   # ethanol C-C-O
    h = jax.random.normal(jax.random.key(0), (16, 8))
    bond = conv.bond(batch.edges)
    msg = jax.nn.relu(h[batch.senders] + bond)
    # Hand aggregation: node 1 (the middle C) receives from nodes 0 and 2.
    expected_in = h[1] + msg[np.nonzero(np.asarray(batch.receivers[:4]) == 1)[0]].sum(0)
    conv.eval()
    out = conv(h, batch)
    np.testing.assert_allclose(out[1], conv.mlp(expected_in[None], jnp.ones(1, bool))[0], rtol=1e-5, atol=1e-6)


def test_graph_dim_must_match_gnn_width():
    with pytest.raises(ValueError, match="gnn_width"):
        M.CHMR({"graph": 64}, {}, {}, gnn_width=32, rngs=nnx.Rngs(0))
