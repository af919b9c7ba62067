"""Orbax checkpoints of the train state: round trip (RNG streams included), keep-N, identical resume,
integrity (flipped bytes, non-finite values), partial restore of the encoder alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax.mechanisms import objective
from chmr_jax.training import checkpoint, pretrain_data as PD, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tiny_corpus(tmp_path_factory.mktemp("raw"), n_molecules=40, seed=2)
    data = PD.prepare(corpus, tiny_data_config())
    batches = [jax.tree_util.tree_map(jnp.asarray, b) for b in PD.batches(data, np.arange(len(data)))]
    return data, batches, objective.context_arrays(data.context)


def new_state(data):
    tx = train.make_optimizer(lr=1e-3, total_steps=50)
    graphdef, state = train.init_state(tiny_model(data), tx)
    return graphdef, state, tx


def leaves_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_and_keep_n(setup, tmp_path):
    data, batches, ctx = setup
    graphdef, state, tx = new_state(data)
    step = train.make_train_step(graphdef, tx, objective.ObjectiveConfig(infonce_block=8), ctx)
    dev = train.context_on_devices(ctx)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    for i in range(3):
        state, _ = step(state, batches[i % len(batches)], jax.random.key(i), dev)
        ckpt.save(int(state.step), state, {"step": int(state.step), "note": "x"})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    _, template, _ = new_state(data)
    restored, meta = ckpt.restore(template)
    assert meta == {"step": 3, "note": "x"}
    leaves_equal(restored, state)
    ckpt.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.Checkpointer(tmp_path / "empty").restore(template)


def test_resumed_training_continues_identically(setup, tmp_path):
    data, batches, ctx = setup
    cfg = objective.ObjectiveConfig(infonce_block=8)
    graphdef, state, tx = new_state(data)
    step = train.make_train_step(graphdef, tx, cfg, ctx)
    dev = train.context_on_devices(ctx)
    keys = [jax.random.key(100 + i) for i in range(4)]
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
    straight = []
    for i in range(4):
        state, metrics = step(state, batches[i % len(batches)], keys[i], dev)
        straight.append(float(metrics["loss"]))
        if i == 1:
            ckpt.save(2, state, {"step": 2})
    # "Restart": a fresh process would rebuild the template from the config and restore.
    graphdef, template, tx = new_state(data)
    state, meta = ckpt.restore(template)
    step = train.make_train_step(graphdef, tx, cfg, ctx)
    dev = train.context_on_devices(ctx)
    resumed = []
    for i in range(meta["step"], 4):
        state, metrics = step(state, batches[i % len(batches)], keys[i], dev)
        resumed.append(float(metrics["loss"]))
    assert resumed == straight[2:]           # bit-identical: same params, batch stats, RNG streams


def test_restore_into_a_different_structure_names_the_leaves(tmp_path):
    saved = {"encoder": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}}
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(1, saved, {"step": 1})
    other = {"encoder": {"w": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}     # same shapes, renamed leaf
    with pytest.raises(ValueError, match=r"different state structure.*encoder/bias.*encoder/b'"):
        ckpt.restore(other)
    state, meta = ckpt.restore(saved)
    assert meta == {"step": 1} and float(state["encoder"]["w"].sum()) == 6.0
    ckpt.close()


def flip_bytes(step_dir, n=4096):
    """Inverts n bytes in the middle of the largest file of a checkpoint step (a disk error)."""
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    mid = max(0, len(data) // 2 - n // 2)
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    largest.write_bytes(bytes(data))
    return largest


def test_corrupt_newest_checkpoint_is_detected_and_skipped(setup, tmp_path):
    data, _, _ = setup
    _, state, _ = new_state(data)
    ckpt = checkpoint.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step})
    flip_bytes(tmp_path / "run" / "checkpoints" / "3")
    _, template, _ = new_state(data)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="3"):
        ckpt.restore(template, 3)
    warnings = []
    restored, meta = ckpt.restore_newest_good(template, warnings.append)
    assert meta == {"step": 2} and ckpt.all_steps() == [1, 2]
    leaves_equal(restored, state)
    assert len(warnings) == 1 and "step 3 is corrupt" in warnings[0]
    assert [p.name.split("-")[0] for p in (tmp_path / "run" / "corrupt").iterdir()] == ["3"]
    ckpt.close()


def test_non_finite_states_are_never_written_and_never_restored(setup, tmp_path, monkeypatch):
    data, _, _ = setup
    _, state, _ = new_state(data)
    bad = state._replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan, state.params))
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(1, state, {"step": 1})
    with pytest.raises(checkpoint.NonFiniteState, match="non-finite"):
        ckpt.save(2, bad, {"step": 2})
    assert ckpt.all_steps() == [1]
    # A NaN state that got onto disk anyway (written by something else) is corruption at restore.
    monkeypatch.setattr(checkpoint, "_finite_problems", lambda items, what=None: [])
    ckpt.save(2, bad, {"step": 2})
    monkeypatch.undo()
    _, template, _ = new_state(data)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="non-finite"):
        ckpt.restore(template, 2)
    restored, meta = ckpt.restore_newest_good(template, lambda *a: None)
    assert meta["step"] == 1
    ckpt.close()


def test_parameters_alone_restore_into_abstract_shapes(setup, tmp_path):
    from flax import nnx
    data, _, _ = setup
    _, state, _ = new_state(data)
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(5, state, {"step": 5})
    abstract = nnx.eval_shape(lambda: tiny_model(data))
    abstract.train()
    _, params, rest = nnx.split(abstract, nnx.Param, ...)
    template = train.TrainState(step=None, params=params, rest=rest, opt_state=None, skipped=None)
    restored, meta = ckpt.restore(template, subtrees=("params", "rest"))
    assert meta == {"step": 5} and restored.opt_state is None
    leaves_equal(restored.params, state.params)
    leaves_equal(restored.rest, state.rest)
    ckpt.close()
