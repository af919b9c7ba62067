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


# ---- issue 21 §3: recovering from a bad checkpoint never loses the run ----------------------------------

def small_state(width=3, scale=1.0):
    return {"params": {"w": jnp.full((4, width), scale), "b": jnp.zeros(width)}, "rest": {"mean": jnp.ones(width)}}


def saved_steps(directory, steps, **kw):
    ckpt = checkpoint.Checkpointer(directory, async_save=False, **kw)
    for s in steps:
        ckpt.save(s, small_state(scale=float(s)), {"step": s})
    ckpt.wait()
    return ckpt


def test_an_io_error_on_read_is_retried_and_moves_nothing(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    ckpt = saved_steps(tmp_path / "run" / "checkpoints", (1, 2, 3))
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0), raising=False)
    real, calls = ocp.PyTreeCheckpointHandler.restore, []

    def flaky(self, *a, **k):       # the first read of the arrays fails as a disk or network hiccup does
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(self, *a, **k)
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", flaky)
    warnings = []
    state, meta = ckpt.restore_newest_good(small_state(), warnings.append)
    assert meta == {"step": 3} and float(state["params"]["w"][0, 0]) == 3.0 and warnings == []
    assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / "run" / "corrupt").exists()

    def broken(self, *a, **k):      # an I/O error that persists fails loudly, and still moves nothing
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", broken)
    with pytest.raises(checkpoint.CheckpointIOError, match=r"checkpoints/3.*failed 3 times.*no checkpoint was moved"):
        ckpt.restore_newest_good(small_state(), warnings.append)
    assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / "run" / "corrupt").exists() and warnings == []
    ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "flip"])
def test_a_damaged_array_file_in_the_newest_step_falls_back_to_the_older_one(tmp_path, damage):
    """Damage to the array data itself (not only to metadata): Orbax wraps tensorstore's read error in a
    plain Exception, which was taken for 'other' and re-raised (a traceback, no fallback)."""
    directory = tmp_path / "run" / "checkpoints"
    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    noise = jax.random.normal(jax.random.key(0), (256, 256))     # incompressible: one large data file
    big = lambda scale: {"params": {"w": noise + scale}, "rest": {"m": jnp.ones(3)}}
    for s in (1, 2):
        ckpt.save(s, big(float(s)), {"step": s})
    ckpt.wait()
    data = max((f for f in (directory / "2").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    assert data.stat().st_size > 200_000 and data.parent.name == "d"      # the array's bytes, not metadata
    raw = data.read_bytes()
    if damage == "truncate":
        data.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        data.write_bytes(b"")
    elif damage == "delete":
        data.unlink()
    else:
        data.write_bytes(raw[:64] + bytes(b ^ 0xFF for b in raw[64:128]) + raw[128:])
    warnings = []
    state, meta = ckpt.restore_newest_good(big(0.0), warnings.append)
    assert meta == {"step": 1}
    np.testing.assert_array_equal(state["params"]["w"], noise + 1.0)
    assert ckpt.all_steps() == [1] and [p.name.split("-")[0] for p in (tmp_path / "run" / "corrupt").iterdir()] == ["2"]
    assert warnings and "step 2" in warnings[0]
    ckpt.close()


def test_a_wrapped_transient_tensorstore_error_is_retried(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    ckpt = saved_steps(tmp_path / "run" / "checkpoints", (1, 2))
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS_S", (0.0, 0.0), raising=False)
    real, calls = ocp.PyTreeCheckpointHandler.restore, []

    def flaky(self, *a, **k):       # as Orbax raises it: the status only in the cause
        calls.append(1)
        if len(calls) == 1:
            try:
                raise ValueError("UNAVAILABLE: connection reset")
            except ValueError as inner:
                raise Exception("Encountered error while reading array index 0") from inner
        return real(self, *a, **k)
    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", flaky)
    state, meta = ckpt.restore_newest_good(small_state(), lambda *a: None)
    assert meta == {"step": 2} and len(calls) == 2 and ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_a_template_of_another_width_is_a_user_error_and_moves_nothing(tmp_path):
    ckpt = saved_steps(tmp_path / "run" / "checkpoints", (1, 2, 3))
    # (Orbax itself restores a (4, 3) array into a (4, 5) template without complaint, padded.)
    with pytest.raises(ValueError, match=r"other shapes.*params/w \(4, 3\) float32 -> \(4, 5\) float32"):
        ckpt.restore_newest_good(small_state(width=5), lambda *a: None)
    assert ckpt.all_steps() == [1, 2, 3] and not (tmp_path / "run" / "corrupt").exists()
    ckpt.close()


def test_when_every_checkpoint_is_corrupt_none_is_moved(tmp_path):
    ckpt = saved_steps(tmp_path / "run" / "checkpoints", (1, 2))
    for s in (1, 2):
        flip_bytes(tmp_path / "run" / "checkpoints" / str(s))
    with pytest.raises(checkpoint.CorruptCheckpoint, match="every checkpoint.*none was moved"):
        ckpt.restore_newest_good(small_state(), lambda *a: None)
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "run" / "corrupt").exists()   # checkpoints/ never emptied
    ckpt.close()


def test_a_bad_newest_save_never_rotates_out_the_last_good_one(tmp_path, monkeypatch):
    """keep=1: the save of step 2 lands damaged on disk; step 1 must survive it."""
    ckpt = saved_steps(tmp_path / "run" / "checkpoints", (1,), max_to_keep=1)
    real_save = ckpt.manager.save

    def damaging_save(step, *a, **k):
        out = real_save(step, *a, **k)
        ckpt.manager.wait_until_finished()
        flip_bytes(tmp_path / "run" / "checkpoints" / str(step))
        return out
    monkeypatch.setattr(ckpt.manager, "save", damaging_save)
    warnings = []
    ckpt.log = warnings.append
    ckpt.save(2, small_state(scale=2.0), {"step": 2})
    ckpt.wait()
    assert ckpt.all_steps() == [1]
    assert len(warnings) == 1 and "step 2 is corrupt" in warnings[0] and "did not verify" in warnings[0]
    state, meta = ckpt.restore_newest_good(small_state(), warnings.append)
    assert meta == {"step": 1} and float(state["params"]["w"][0, 0]) == 1.0
    monkeypatch.undo()
    ckpt.save(3, small_state(scale=3.0), {"step": 3})     # a good save then rotates step 1 out, as keep=1 says
    ckpt.wait()
    assert ckpt.all_steps() == [3]
    ckpt.close()


def test_non_finite_batch_statistics_are_never_written_and_never_restored(tmp_path, monkeypatch):
    bad = small_state()
    bad["rest"]["mean"] = bad["rest"]["mean"].at[0].set(jnp.inf)
    ckpt = checkpoint.Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(1, small_state(), {"step": 1})
    with pytest.raises(checkpoint.NonFiniteState, match="rest/mean"):
        ckpt.save(2, bad, {"step": 2})
    monkeypatch.setattr(checkpoint, "_finite_problems", lambda items, what=None: [])   # written by something else
    ckpt.save(2, bad, {"step": 2})
    monkeypatch.undo()
    with pytest.raises(checkpoint.CorruptCheckpoint, match="non-finite.*rest/mean"):
        ckpt.restore(small_state(), 2)
    ckpt.close()
