"""Orbax checkpoints of a train state plus JSON metadata (config, corpus manifest, data position),
with integrity checks so a damaged checkpoint can never poison a run.

Layout: the state is saved as a nested dict keyed by its tree path (`params/gnn/convs/0/...`,
typed PRNG keys as raw key data), so any subtree can be restored alone from abstract shapes
(`restore(template, subtrees=('params', 'rest'))`: an encoder without its optimiser state).
Integrity: at save time the sha256 of every leaf's bytes is stored in the step's JSON metadata
(written atomically with the arrays: Orbax renames a finished step directory into place). At
restore each restored leaf is hashed again and compared, and parameters must be finite; a
mismatch or an unreadable step is `CorruptCheckpoint`. `restore_newest_good` walks back from the
newest step, moves each corrupt one aside to `<directory>/../corrupt/<step>` with a warning, and
restores the newest good one, so the keep-N rotation never deletes a good checkpoint to make room
for a bad one. `save` refuses a state with non-finite parameters or optimiser moments.
Checkpoints of the earlier positional format (leaves "00000", ...) are still restored.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from chmr_jax.training import train

FORMAT = 2


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose bytes or values are not what was saved (or are not finite)."""


class NonFiniteState(ValueError):
    """Refused to save: the state holds NaN/inf parameters or optimiser statistics."""


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _part(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _named(tree) -> list[tuple[tuple[str, ...], object]]:
    """(path parts, leaf) for every leaf of `tree`, in flatten order."""
    return [(tuple(_part(e) for e in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _nest(items) -> dict:
    out: dict = {}
    for parts, value in items:
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1] if parts else "value"] = value
    return out


def _get(nested: dict, parts):
    for p in parts or ("value",):
        nested = nested[p]
    return nested


def _digest(x) -> str:
    a = np.ascontiguousarray(train.host_array(x))
    return hashlib.sha256(a.tobytes() + str((a.dtype, a.shape)).encode()).hexdigest()[:32]


def _key_data(x):
    return jax.random.key_data(x) if _is_key(x) else x


def _finite_problems(items, what=("params", "opt_state")) -> list[str]:
    bad = []
    for parts, leaf in items:
        if parts and parts[0] in what and hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, np.floating):
            if not np.isfinite(train.host_array(leaf)).all():
                bad.append("/".join(parts))
    return bad


def _abstract(x):
    """The restore target of a template leaf (a concrete array or an abstract ShapeDtypeStruct)."""
    data = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _key_impl(leaf):
    return leaf.dtype._impl if isinstance(leaf, jax.ShapeDtypeStruct) else jax.random.key_impl(leaf)


class Checkpointer:
    """Periodic / final checkpoints in `directory`, keeping the newest `max_to_keep` (None: all)."""

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
        """Saves `state` and JSON-able `meta` at `step` (asynchronously unless disabled), with a
        sha256 per leaf. Raises NonFiniteState instead of writing NaN/inf parameters."""
        items = _named(state)
        bad = _finite_problems(items)
        if bad:
            raise NonFiniteState(f"refusing to write checkpoint {self.directory / str(step)}: non-finite values in "
                                 f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the newer checkpoints stay as they are")
        named = [(parts, _key_data(leaf)) for parts, leaf in items]
        meta = {**meta, "format": FORMAT, "leaf_paths": ["/".join(p) for p, _ in named],
                "digests": {"/".join(p): _digest(v) for p, v in named}}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(_nest(named)), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, template, step: int | None = None, subtrees: tuple[str, ...] | None = None):
        """(state, meta) at `step` (default: the latest), shaped and sharded like `template`.

        subtrees: restore only these top-level parts (e.g. ('params', 'rest') of a TrainState); the
        others come back as they are in `template` (which may hold abstract shapes there).
        Raises CorruptCheckpoint when the bytes or values differ from what was saved.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:   # unreadable metadata: the step is damaged
            raise CorruptCheckpoint(f"{where}: metadata unreadable ({type(e).__name__}: {e})") from e
        if meta.get("format") != FORMAT:
            return self._restore_positional(template, step, where)
        items = _named(template)
        want = ["/".join(p) for p, _ in items]
        saved_paths = meta.pop("leaf_paths")
        digests = meta.pop("digests")
        meta.pop("format")
        chosen = [(p, leaf) for p, leaf in items if subtrees is None or (p and p[0] in subtrees)]
        missing = ["/".join(p) for p, _ in chosen if "/".join(p) not in digests]
        if missing or (subtrees is None and saved_paths != want):
            extra = [p for p in saved_paths if p not in want][:5]
            raise ValueError(f"checkpoint {where} holds a different state structure than this code builds (not in "
                             f"the checkpoint: {(missing or [p for p in want if p not in saved_paths])[:5]}; only in "
                             f"the checkpoint: {extra}); it was written by another chmr_jax version or config")
        abstract = _nest([(p, _abstract(leaf)) for p, leaf in chosen])
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=subtrees is not None)))["state"]
        except Exception as e:
            raise CorruptCheckpoint(f"{where}: arrays unreadable ({type(e).__name__}: {str(e)[:200]})") from e
        damaged = [name for name in ("/".join(p) for p, _ in chosen)
                   if _digest(_get(restored, name.split("/"))) != digests[name]]
        if damaged:
            raise CorruptCheckpoint(f"{where}: {len(damaged)} array(s) differ from what was saved (sha256), e.g. "
                                    f"{damaged[:3]}")
        values = {"/".join(p): _get(restored, p) for p, _ in chosen}
        new_leaves = []
        for parts, leaf in items:
            name = "/".join(parts)
            if name not in values:
                new_leaves.append(leaf)
            elif _is_key(leaf):
                new_leaves.append(jax.random.wrap_key_data(values[name], impl=_key_impl(leaf)))
            else:
                new_leaves.append(values[name])
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), new_leaves)
        bad = _finite_problems([(p, v) for p, v in _named(state) if "/".join(p) in values])
        if bad:
            raise CorruptCheckpoint(f"{where}: non-finite values in {bad[:5]}")
        return state, meta

    def format_of(self, step: int) -> int:
        """1 for the earlier positional layout, FORMAT for named leaves with digests."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return int(meta.get("format", 1))

    def _restore_positional(self, template, step, where):
        """Checkpoints written before FORMAT 2: leaves saved by position ("00000", ...)."""
        leaves, treedef = jax.tree_util.tree_flatten(template)
        abstract = {f"{i:05d}": _abstract(x) for i, x in enumerate(leaves)}
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        saved_paths = restored["meta"].pop("leaf_paths", None)
        want = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(template)[0]]
        if saved_paths is not None and saved_paths != want:
            raise ValueError(f"checkpoint {where} holds a different state structure than this code builds "
                             f"(not in the checkpoint: {[p for p in want if p not in saved_paths][:5]}; only in the "
                             f"checkpoint: {[p for p in saved_paths if p not in want][:5]})")
        saved = restored["state"]
        new_leaves = [jax.random.wrap_key_data(saved[f"{i:05d}"], impl=jax.random.key_impl(x)) if _is_key(x)
                      else saved[f"{i:05d}"] for i, x in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, new_leaves), restored["meta"]

    def restore_newest_good(self, template, log=print, subtrees=None):
        """(state, meta) of the newest checkpoint that passes the integrity checks, or (None, None)
        when there is none. Corrupt newer steps are moved to <directory>/../corrupt/<step>-<time>
        (process 0; every process then re-reads the step list) with a warning naming them."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return self.restore(template, step, subtrees)
            except CorruptCheckpoint as e:
                aside = self.directory.parent / "corrupt" / f"{step}-{int(time.time())}"
                log(f"WARNING: checkpoint step {step} is corrupt and is skipped ({e}); moved to {aside}")
                if jax.process_index() == 0:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.directory / str(step)), str(aside))
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils
                    multihost_utils.sync_global_devices(f"chmr_quarantine_{step}")
                self.manager.reload()
        return None, None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
