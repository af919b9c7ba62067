"""The jitted train step: 8 devices equal 1 device, one compilation, NaN guard, loss decreases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax.mechanisms import objective
from chmr_jax.training import pretrain_data as PD, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = tiny_corpus(tmp_path_factory.mktemp("raw"), n_molecules=64, seed=5)
    return PD.prepare(corpus, tiny_data_config(batch_size=15, pad_multiple=64, graph_multiple=8))


def fresh(data, dropout=0.5, tx=None, **model_kw):
    tx = tx or train.make_optimizer(lr=1e-3, total_steps=100)
    graphdef, state = train.init_state(tiny_model(data, dropout, **model_kw), tx)
    return graphdef, state, tx


def batches(data, n):
    order = np.random.default_rng(0).permutation(len(data))
    out = [jax.tree_util.tree_map(jnp.asarray, b) for b in PD.batches(data, order)]
    return (out * n)[:n]


def test_budgets_shard_evenly(data):
    assert data.budget.n_graph % 8 == 0 and data.budget.n_node % 8 == 0 and data.budget.n_edge % 8 == 0


@pytest.mark.parametrize("infonce_impl", ["chunked", "ring"])
def test_eight_devices_equal_one_device(data, mesh8, infonce_impl):
    ctx = objective.context_arrays(data.context)
    cfg1 = objective.ObjectiveConfig(infonce_impl="chunked", infonce_block=8)
    cfg8 = objective.ObjectiveConfig(infonce_impl=infonce_impl, infonce_block=8)
    batch = batches(data, 1)[0]
    key = jax.random.key(7)
    # SGD: the update is linear in the gradient, so parameters compare the gradients themselves
    # (Adam's first step is ~lr * sign(g) and turns rounding noise in tiny entries into +-lr).
    sgd = optax.sgd(0.1)
    graphdef, state1, tx = fresh(data, tx=sgd)
    state1, m1 = train.make_train_step(graphdef, tx, cfg1, ctx)(state1, batch, key, train.context_on_devices(ctx))
    graphdef, state8, tx = fresh(data, tx=sgd)
    step8 = train.make_train_step(graphdef, tx, cfg8, ctx, mesh=mesh8)
    state8, m8 = step8(state8, train.assemble_batch(batch, mesh8), key, train.context_on_devices(ctx, mesh8))
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(state8.params), jax.tree_util.tree_leaves(state1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def train_curve(data, n_steps: int, **model_kw):
    """n_steps of the chunked objective from a fresh dropout-free model on the same batches (one base
    key: the step folds in state.step) -> (step function, final state, losses)."""
    ctx = objective.context_arrays(data.context)
    graphdef, state, tx = fresh(data, dropout=0.0, **model_kw)
    step = train.make_train_step(graphdef, tx, objective.ObjectiveConfig(infonce_block=8), ctx)
    dev, key, losses = train.context_on_devices(ctx), jax.random.key(0), []
    for batch in batches(data, n_steps):
        state, metrics = step(state, batch, key, dev)
        losses.append(float(metrics["loss"]))
    return step, state, np.array(losses)


def test_compiles_once_and_loss_decreases(data):
    step, state, losses = train_curve(data, 20)
    assert step._cache_size() == 1                      # 20 steps, one compilation
    assert all(np.isfinite(losses)) and int(state.step) == 20 and int(state.skipped) == 0
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


def test_bfloat16_training_tracks_float32(data):
    # 10 steps from the same initial parameters on the same batches: bfloat16 changes only the
    # activations' arithmetic (parameters, optimiser state, batch statistics and losses stay float32),
    # so its curve stays within a few bf16 roundings of float32's. (remat = no remat: test_model.py.)
    curves = {}
    for name, kw in {"f32": {}, "bf16": {"dtype": jnp.bfloat16}}.items():
        _, state, losses = train_curve(data, 10, **kw)
        assert int(state.skipped) == 0 and np.all(np.isfinite(losses)), name
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params)), name
        curves[name] = losses
    rel = np.abs(curves["bf16"] - curves["f32"]) / np.abs(curves["f32"])
    # Budget: 8 bf16 roundings (2^-8 each) at the first step, 32 over the run; measured <= 0.5% here.
    assert rel[0] <= 8 * 2.0 ** -8 and rel.max() <= 32 * 2.0 ** -8, rel


def test_nan_guard_skips_the_update(data):
    ctx = objective.context_arrays(data.context)
    graphdef, state, tx = fresh(data)
    step = train.make_train_step(graphdef, tx, objective.ObjectiveConfig(infonce_block=8), ctx)
    dev = train.context_on_devices(ctx)
    batch = batches(data, 1)[0]
    bad = dict(batch, inputs={**batch["inputs"], "fingerprint": batch["inputs"]["fingerprint"] * jnp.nan})
    before = jax.tree_util.tree_map(np.asarray, state.params)
    state, metrics = step(state, bad, jax.random.key(0), dev)
    assert int(state.skipped) == 1 and int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)


def test_step_flops_count_the_model_not_the_recomputation(data):
    # XLA counts a loop body once, and remat runs the GIN layers as a scan: the step's own count drops
    # under remat. pretrain.step_flops counts the step lowered without remat, the same with and
    # without it (the MFU convention: recomputation is not useful work).
    from pathlib import Path

    from chmr_jax import config_util
    from chmr_jax.training import pretrain, utilisation
    config = config_util.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "test.py"))
    config.model.gnn_layers = 4
    dims = {"mol_dims": {"fingerprint": data.inputs["fingerprint"].shape[1], "graph": config.model.gnn_width},
            "cell_dims": {n: m.dim for n, m in data.corpus.modalities.items()},
            "target_dims": {t: data.context.targets[t].shape[1] for t in data.context.targets}}
    tx = train.make_optimizer(total_steps=10)
    ctx = objective.context_arrays(data.context)
    batch, key, dev = batches(data, 1)[0], jax.random.key(0), train.context_on_devices(ctx)
    counts = {}
    for remat in (False, True):
        config.model.remat = remat
        graphdef, state = train.init_state(pretrain.build_model(config, dims), tx)
        step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx)
        counts[remat] = (pretrain.step_flops(config, dims, tx, ctx, None, step, state, batch, key, dev),
                         utilisation.lowered_flops(step.lower(state, batch, key, dev)))
    assert counts[True][0] == counts[False][0] == counts[False][1] > 0
    assert counts[True][1] < counts[False][1]
