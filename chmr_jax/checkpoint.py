"""Orbax checkpoints of a train state plus JSON metadata (config, corpus manifest, data position).

The state is saved as its flattened leaves (typed PRNG keys as raw key data) and restored into
the structure and shardings of a template state built the same way (same config), so NNX states,
optax states and RNG streams all round-trip. Orbax writes each step to a temporary directory and
renames it when complete, so an interrupted save never shadows the last good checkpoint.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaves_to_save(state) -> dict:
    leaves = jax.tree_util.tree_leaves(state)
    return {f"{i:05d}": (jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}


def _leaf_paths(state) -> list[str]:
    """The tree path of every leaf, saved with the checkpoint so a restore into a different
    structure fails with the names instead of silently loading leaves by position."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def _abstract(x):
    data = jax.random.key_data(x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(data, "sharding", None))


class Checkpointer:
    """Periodic / final checkpoints in `directory`, keeping the newest `max_to_keep`."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
        """Saves `state` and JSON-able `meta` at `step` (asynchronously unless disabled)."""
        meta = {**meta, "leaf_paths": _leaf_paths(state)}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_leaves_to_save(state)), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, template, step: int | None = None):
        """(state, meta) at `step` (default: the latest), shaped and sharded like `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        abstract = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        saved_paths = restored["meta"].pop("leaf_paths", None)
        if saved_paths is not None and saved_paths != _leaf_paths(template):
            want = _leaf_paths(template)
            missing = [p for p in want if p not in saved_paths][:5]
            extra = [p for p in saved_paths if p not in want][:5]
            raise ValueError(f"checkpoint {self.directory / str(step)} holds a different state structure than "
                             f"this code builds (not in the checkpoint: {missing}; only in the checkpoint: "
                             f"{extra}); it was written by another chmr_jax version or config")
        saved = restored["state"]
        new_leaves = [jax.random.wrap_key_data(saved[f"{i:05d}"], impl=jax.random.key_impl(x)) if _is_key(x)
                      else saved[f"{i:05d}"] for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, new_leaves), restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
