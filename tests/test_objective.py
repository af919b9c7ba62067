"""The full pretraining objective on a tiny generated corpus: finite, differentiable, and it decreases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from chmr_jax import context, corpus as C, graphs, model as M, objective, profiles, propagation, splits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = profiles.write_synthetic_paper_layout(
        tmp_path_factory.mktemp("raw"), n_molecules=48, seed=0, dims={"CP-Bray": 12, "GE": 10},
        observed={"CP-Bray": 0.5, "GE": 0.3})
    structures, tables, _, _ = profiles.read_paper_layout(root, ["CP-Bray", "GE"])
    corpus = C.assemble(structures, {"cell": [tables["CP-Bray"]], "expression": [tables["GE"]]}, verbose=False)
    feats = corpus.features
    bits = feats.morgan
    knn = propagation.tanimoto_knn(bits, k=5, block=64, n_bits=feats.settings.morgan_size)
    graph = propagation.build_graph(*knn)
    aug, reached = {}, {}
    for name, m in corpus.modalities.items():
        r = propagation.propagate(graph, m.values, m.available, steps=5)
        aug[name], reached[name] = np.asarray(r.x), np.asarray(r.reached)
    blocks = {name: context.ProfileBlock(features=m.values[m.available], molecule=np.nonzero(m.available)[0])
              for name, m in corpus.modalities.items()}
    ctx_graph = context.build_context_graph(
        np.unpackbits(bits, axis=1), feats.targets(), splits.scaffolds_of(list(corpus.smiles)), blocks,
        n_clusters=3, floor=0.3)
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, 16, pad_multiple=32)
    idx = np.arange(16)
    batch_graph = graphs.pack(feats, idx, budget)
    g = budget.n_graph

    def rows(x):
        out = np.zeros((g,) + x.shape[1:], x.dtype)
        out[:16] = x[idx]
        return out

    batch = {"graph": batch_graph, "inputs": {"fingerprint": rows(feats.fingerprints())},
             "aug": {n: rows(aug[n]) for n in aug}, "mask": {n: rows(reached[n]) for n in aug},
             "node": rows(np.arange(len(corpus), dtype=np.int32))}
    batch["inputs"].update({n: rows(aug[n]) for n in aug})
    batch = jax.tree_util.tree_map(jnp.asarray, batch)
    ctx = objective.context_arrays(ctx_graph)
    target_dims = {t: ctx_graph.targets[t].shape[1] for t in ctx_graph.targets}
    model = M.CHMR({"fingerprint": feats.fingerprints().shape[1], "graph": 32},
                   {n: m.dim for n, m in corpus.modalities.items()}, target_dims,
                   latent=16, gnn_layers=2, gnn_width=32, tree_depth=3, rngs=nnx.Rngs(0))
    return model, batch, ctx


def test_objective_is_finite_and_reports_every_term(setup):
    model, batch, ctx = setup
    cfg = objective.ObjectiveConfig(infonce_block=8)
    total, metrics = objective.objective(model, batch, ctx, jax.random.key(0), cfg)
    assert np.isfinite(float(total))
    for key in ("loss/cpr", "loss/sca", "loss/vq", "sca/cell/infonce", "sca/expression/vicreg",
                "vq/graph/perplexity", "cpr/molecule", "cpr/cell"):
        assert key in metrics and np.all(np.isfinite(np.asarray(metrics[key])))
    expected = metrics["loss/cpr"] + 10.0 * metrics["loss/sca"] + 1.0 * metrics["loss/vq"]
    np.testing.assert_allclose(total, expected, rtol=1e-5)


def test_a_few_steps_reduce_the_loss(setup):
    model, batch, ctx = setup
    cfg = objective.ObjectiveConfig(infonce_block=8)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    key = jax.random.key(1)

    @jax.jit
    def step(params, rest, opt):
        def f(p, r):
            m = nnx.merge(graphdef, p, r, copy=True)  # fresh Variables at this trace level (flax#5050)
            loss, _ = objective.objective(m, batch, ctx, key, cfg)
            return loss, nnx.state(m, nnx.Not(nnx.Param))
        (loss, rest_new), grads = jax.value_and_grad(f, has_aux=True)(params, rest)
        updates, opt_new = tx.update(grads, opt, params)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(grads)]))
        return optax.apply_updates(params, updates), rest_new, opt_new, loss, finite

    losses = []
    for _ in range(15):
        params, rest, opt, loss, finite = step(params, rest, opt)
        assert bool(finite) and np.isfinite(float(loss))
        losses.append(float(loss))
    assert losses[-1] < losses[0]
