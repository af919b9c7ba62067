"""The jitted train step: 8 devices equal 1 device, one compilation, NaN guard, loss decreases."""
import re

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
    # The walk-target tables split by rows (as past train.CONTEXT_SPLIT_BYTES; these tiny ones would stay whole).
    step8 = train.make_train_step(graphdef, tx, cfg8, ctx, mesh=mesh8, split_tables=True)
    batch8, ctx8 = train.assemble_batch(batch, mesh8), train.context_on_devices(ctx, mesh8, split=True)
    # They stay split inside the real step (issue 31 item 4): no all-gather in the compiled program
    # produces a table's shape (the walks and latents are gathered, never a table).
    hlo = step8.lower(state8, batch8, key, ctx8).compile().as_text()
    gathered = {tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= \w+\[([\d,]*)\][^=]* all-gather\(", hlo)}
    tables = {tuple(x.shape) for name in ("targets", "target_mask") for x in jax.tree_util.tree_leaves(ctx8[name])}
    assert gathered and not gathered & tables, (gathered, tables)
    # The default for tables this small: whole on every device, the same step.
    whole = train.make_train_step(graphdef, tx, cfg8, ctx, mesh=mesh8)
    _, m_whole = whole(fresh(data, tx=sgd)[1], batch8, key, train.context_on_devices(ctx, mesh8))
    np.testing.assert_allclose(m_whole["loss"], m1["loss"], rtol=1e-5, atol=1e-5)
    state8, m8 = step8(state8, batch8, key, ctx8)
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


def test_step_flops_count_the_model_not_its_chunking_sharding_or_recomputation(data, mesh8):
    # XLA's count of a lowered step depends on its form: a scanned body counts once (remat's GIN scan,
    # chunked and ring InfoNCE blocks), a shard_map body once for one device, and the whole
    # unpartitioned program is the global batch, not one device's share (issue 21 §2). step_flops is
    # one device's share of the model's FLOPs for the global batch: the same total for dense, chunked and
    # ring InfoNCE, with and without remat, on 1 and on 8 devices (per device: 1/8 of it), and that total
    # is XLA's count of the plain step (dense, no remat) with its Tree-VQ scan unrolled.
    from pathlib import Path

    from helpers import unrolled_flops

    from chmr_jax import config_util
    from chmr_jax.training import pretrain, utilisation
    config = config_util.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "test.py"))
    config.model.gnn_layers = 4
    dims = {"mol_dims": {"fingerprint": data.inputs["fingerprint"].shape[1], "graph": config.model.gnn_width},
            "cell_dims": {n: m.dim for n, m in data.corpus.modalities.items()},
            "target_dims": {t: data.context.targets[t].shape[1] for t in data.context.targets}}
    tx = train.make_optimizer(total_steps=10)
    ctx = objective.context_arrays(data.context)
    batch, key = batches(data, 1)[0], jax.random.key(0)
    mesh1 = train.data_mesh(jax.devices()[:1])
    totals, xla = {}, {}
    for impl, remat, mesh in [("dense", False, None), ("chunked", True, mesh1), ("chunked", False, mesh8),
                              ("ring", True, mesh8)]:
        config.model.remat, config.objective.infonce_impl = remat, impl
        graphdef, state = train.init_state(pretrain.build_model(config, dims), tx)
        step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx, mesh)
        args = (state, batch if mesh is None else train.assemble_batch(batch, mesh), key,
                train.context_on_devices(ctx, mesh))
        n = 1 if mesh is None else mesh.size
        case = (impl, remat, n)
        per_device = pretrain.step_flops(config, dims, tx, ctx, mesh, step, *args)
        totals[case] = per_device * n
        xla[case] = utilisation.lowered_flops(step.lower(*args))
        if case == ("dense", False, 1):
            unrolled, n_scans = unrolled_flops(step, *args)
    assert len(set(totals.values())) == 1, totals
    total = totals["dense", False, 1]
    # XLA alone counts the Tree-VQ levels' bodies once; the count adds the missing trips. What is left
    # against the unrolled program (loop bookkeeping, per-trip outputs the unrolled lowering drops) is
    # small beside what the trips add.
    missing = unrolled - xla["dense", False, 1]
    assert n_scans >= 1 and missing > 0 and 0 <= total - unrolled <= 0.1 * missing, (total, unrolled, missing)
    # what XLA alone says of these forms (the count the summary used to report) differs from form to form
    assert len({round(v) for v in xla.values()}) == len(xla), xla


def test_data_mesh_groups_each_process_devices():
    # jax.devices() need not list a process's devices together (TPU pods); local_range needs them
    # adjacent in the mesh. Stand-in devices of 4 processes x 2, listed in shuffled order.
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Device:
        id: int
        process_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"

    devices = [Device(i, i % 4) for i in range(8)]
    np.random.default_rng(0).shuffle(devices)
    order = [d.process_index for d in train.data_mesh(devices).devices.flat]
    assert order == sorted(order), order
    assert sorted(d.id for d in train.data_mesh(devices).devices.flat) == list(range(8))
    # The real devices in shuffled order (one process here): a mesh whose rows this process holds whole.
    real = list(jax.devices())
    np.random.default_rng(1).shuffle(real)
    assert train.local_range(jax.sharding.NamedSharding(train.data_mesh(real), jax.sharding.PartitionSpec("data")),
                             64) == (0, 64)


def test_logged_learning_rate_is_the_rate_the_update_used(data):
    # A skipped update leaves the optimiser's schedule count behind state.step: the rate of the next
    # update is schedule(count), not schedule(state.step).
    ctx = objective.context_arrays(data.context)
    schedule = train.lr_schedule(1e-3, 4, "release_cosine")
    graphdef, state, tx = fresh(data, tx=train.make_optimizer(lr=1e-3, total_steps=4))
    step = train.make_train_step(graphdef, tx, objective.ObjectiveConfig(infonce_block=8), ctx, schedule=schedule)
    dev, key, batch = train.context_on_devices(ctx), jax.random.key(0), batches(data, 1)[0]
    bad = dict(batch, inputs={**batch["inputs"], "fingerprint": batch["inputs"]["fingerprint"] * jnp.nan})
    state, m0 = step(state, bad, key, dev)
    assert int(state.skipped) == 1 and int(state.step) == 1
    before = jax.tree_util.tree_map(np.asarray, state.params)
    state, m1 = step(state, batch, key, dev)
    assert float(m0["lr"]) == float(m1["lr"]) == pytest.approx(float(schedule(0)))
    assert float(schedule(0)) != pytest.approx(float(schedule(1)), rel=1e-3)
    # ... and it is the rate Adam applied: its first update is lr * m / (sqrt(v) + eps) = lr * g / (|g| + eps).
    grads = [np.asarray(b) - np.asarray(a) for a, b in zip(jax.tree_util.tree_leaves(before),
                                                         jax.tree_util.tree_leaves(state.params))]
    largest = max(float(np.abs(g).max()) for g in grads)
    assert largest == pytest.approx(float(m1["lr"]), rel=1e-3)


def test_initialisation_and_step_keys_are_separate_streams():
    # nnx.Rngs draws fold_in(root, i) as its i-th key: the parameters' keys, and the root of each
    # dropout's forked stream (whose masks use fold_in(that root, j)). The step's key is
    # fold_in(base_key, step). No step key may repeat any of them.
    from pathlib import Path

    from flax import nnx

    from chmr_jax import config_util
    from chmr_jax.training import pretrain
    config = config_util.load_config(str(Path(__file__).resolve().parents[1] / "configs" / "test.py"))
    seed, n = config.train.seed, 4096            # initialisation draws ~100 keys
    dims = {"mol_dims": {"fingerprint": 16, "graph": config.model.gnn_width}, "cell_dims": {"cell": 8},
            "target_dims": {"molecule": 8}}
    model = pretrain.build_model(config, dims)
    as_set = lambda keys: {tuple(k) for k in np.asarray(keys).reshape(-1, 2)}
    draws = lambda root: jax.vmap(lambda i: jax.random.key_data(jax.random.fold_in(root, i)))(jnp.arange(n))
    init = as_set(draws(train.init_rngs(seed).default.key[...]))
    dropout_roots = [k for k in jax.tree_util.tree_leaves(nnx.state(model, nnx.RngKey))]
    assert dropout_roots and as_set([jax.random.key_data(k) for k in dropout_roots]) <= init   # the model's stream
    model_keys = init.union(*(as_set(draws(k)) for k in dropout_roots))
    step_keys = as_set(draws(train.step_base_key(seed)))
    assert not model_keys & step_keys, f"{len(model_keys & step_keys)} step keys repeat the model's"
