"""Orbax checkpoints of a train state plus JSON metadata (config, corpus manifest, data position),
with integrity checks so a damaged checkpoint can never poison a run.

Layout: the state is saved as a nested dict keyed by its tree path (`params/gnn/convs/0/...`,
typed PRNG keys as raw key data), so any subtree can be restored alone from abstract shapes
(`restore(template, subtrees=('params', 'rest'))`: an encoder without its optimiser state).
Integrity: at save time the sha256 of every leaf's bytes is stored in the step's JSON metadata
(written atomically with the arrays: Orbax renames a finished step directory into place). At
restore each restored leaf is hashed again and compared, and parameters, optimiser moments and
batch statistics must be finite. Corruption (`CorruptCheckpoint`) is only what integrity says it is:
a digest mismatch, non-finite values, an unreadable / truncated / missing file. Anything else is not
the checkpoint's fault and never moves it: a transient I/O error is retried, then raised
(`CheckpointIOError`); a state of another structure or shape than the template (the model's dims
changed) is a ValueError naming the arrays. `restore_newest_good` walks back from the newest step,
decides (agreed by all processes) which one to restore, and only then moves the corrupt newer ones
aside to `<directory>/../corrupt/<step>-<time>` with a warning; it never moves the last one.
Storage without directory renames (gs://, and a bucket mounted with gcsfuse, found in /proc/mounts;
`dir_renames`): Orbax writes each step in place and marks it finished with a commit_success.txt file
(its commit-file mode; a step without it is not listed), and a corrupt step is moved aside by copying
it to corrupt/ and then deleting it (on gs:// through Orbax's own file system instance, so Orbax's next
save of that step number does not meet a stale listing), so the same agreed steps are moved either way.
Rotation: each save is read back and its digests checked before the keep-N rotation may delete
older steps, so it always keeps at least one verified step; a save that fails the check is moved
aside instead. `save` refuses a state with non-finite parameters, optimiser moments or statistics.
Checkpoints of the earlier positional format (leaves "00000", ...) are still restored.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from chmr_jax.data import paths
from chmr_jax.training import train

FORMAT = 2


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose bytes or values are not what was saved (or are not finite)."""


class NonFiniteState(ValueError):
    """Refused to save: the state holds NaN/inf parameters or optimiser statistics."""


class CheckpointIOError(OSError):
    """Reading a checkpoint failed with an I/O error that retrying did not cure (nothing was moved)."""


# Seconds to wait before each retry of a read that failed with a transient I/O error.
RETRY_DELAYS_S = (1.0, 4.0)
# tensorstore reports errors as ValueError("<STATUS>: ..."): these say the bytes are missing or malformed
# (a truncated / emptied / deleted file), the others may pass (network file systems, overload).
_CORRUPT_STATUS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION")
# tensorstore's words for bytes that do not decode, where its message has no status prefix (damaged OCDBT
# b-tree nodes: 'Error opening "zarr" driver: ... Error decoding b-tree node: ZSTD_decompressStream() failed:
# Data corruption detected').
_CORRUPT_MESSAGES = ("Data corruption detected", "Error decoding b-tree node")
_TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL",
                     "UNKNOWN")


def _failure_kind(e: BaseException) -> str:
    """'corrupt' (the file is missing, truncated or malformed), 'transient' (I/O that may pass) or 'other',
    read through the exception's whole chain: Orbax wraps every array-read error of tensorstore in a
    plain Exception('Encountered error while reading array index ...') whose __cause__ says what it was
    (a truncated data file: ValueError('FAILED_PRECONDITION: ... Data corruption detected'))."""
    kinds, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        kinds.append(_own_failure_kind(e))
        e = e.__cause__ or e.__context__
    return "corrupt" if "corrupt" in kinds else "transient" if "transient" in kinds else "other"


def _own_failure_kind(e: BaseException) -> str:
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, CorruptCheckpoint)):
        return "corrupt"
    if isinstance(e, OSError):
        return "transient"
    status = str(e).split(":", 1)[0].strip()
    if isinstance(e, ValueError) and (status in _CORRUPT_STATUS or any(m in str(e) for m in _CORRUPT_MESSAGES)):
        return "corrupt"
    return "transient" if status in _TRANSIENT_STATUS else "other"


def _read(fn, where, what: str):
    """fn() with transient I/O errors retried (RETRY_DELAYS_S); a damaged file is CorruptCheckpoint, an
    I/O error that persists CheckpointIOError, anything else is raised as it is."""
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            return fn()
        except Exception as e:
            kind = _failure_kind(e)
            if kind == "corrupt":
                raise CorruptCheckpoint(f"{where}: {what} unreadable ({type(e).__name__}: {str(e)[:200]})") from e
            if kind == "other":
                raise
            if attempt == len(RETRY_DELAYS_S):
                raise CheckpointIOError(f"{where}: reading the {what} failed {attempt + 1} times with an I/O error "
                                        f"({type(e).__name__}: {str(e)[:200]}); no checkpoint was moved: check the "
                                        "file system and run the same command again") from e
            time.sleep(RETRY_DELAYS_S[attempt])


# Verdicts on one checkpoint step, ordered so that the worst over processes is their max.
OK, CORRUPT, FAILED = 0, 1, 2


def _gather_verdicts(verdict: int) -> list[int]:
    """Every process's verdict on the same step (a collective: every process calls it once per step)."""
    if jax.process_count() == 1:
        return [verdict]
    from jax.experimental import multihost_utils
    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(verdict))).reshape(-1)]


def _steps_of_process0(steps: list[int]) -> list[int]:
    """Process 0's step list on every process, so all walk the same steps (and reach the same collectives)."""
    if jax.process_count() == 1:
        return steps
    from jax.experimental import multihost_utils
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    padded = np.zeros(n, np.int64)
    padded[:min(n, len(steps))] = steps[:n]
    return [int(s) for s in np.asarray(multihost_utils.broadcast_one_to_all(padded))]


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


def _finite_problems(items, what=("params", "opt_state", "rest")) -> list[str]:
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


def _shape_of(x):
    """[shape, dtype name] of a leaf as saved (typed keys as their raw key data)."""
    a = _abstract(x)
    return [list(a.shape), np.dtype(a.dtype).name]


def _template_of(x):
    """An abstract restore template of a state leaf (shape, dtype, sharding), valid after the leaf is donated."""
    if not hasattr(x, "shape"):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def default_dir_renames(directory) -> bool:
    """Whether directories under `directory` can be renamed: not on object storage (gs://) nor on a
    bucket mounted with gcsfuse (whose directory renames fail without --rename-dir-limit)."""
    return not paths.is_remote(directory) and paths.gcsfuse_mount(directory) is None


def dir_renames_of(setting: str, directory) -> bool:
    """config.train.checkpoint_atomicity ('auto' | 'rename' | 'commit_file') -> dir_renames."""
    if setting not in ("auto", "rename", "commit_file"):
        raise ValueError(f"config.train.checkpoint_atomicity={setting!r}: choose 'auto' (commit files on gs:// and "
                         "gcsfuse mounts, renames elsewhere), 'rename' or 'commit_file'")
    if setting == "rename" and paths.is_remote(directory):
        raise ValueError(f"config.train.checkpoint_atomicity='rename' but {directory} is object storage, which has "
                         "no directory rename; use 'auto' or 'commit_file'")
    return default_dir_renames(directory) if setting == "auto" else setting == "rename"


def _orbax_fs(path):
    """The fsspec file system through which Orbax (etils.epath) reads and writes a gs:// path."""
    from etils.epath import backend
    return backend.fsspec_backend.fs(os.fspath(path))


class Checkpointer:
    """Periodic / final checkpoints in `directory`, keeping the newest `max_to_keep` (None: all).

    The rotation is ours, not Orbax's: a save is read back and verified (digests, finite values) when
    it has finished (at the next save, `wait` or `close`), and only then may older steps be deleted;
    the newest verified step is never deleted. `log` receives the warnings.
    dir_renames: False where directories cannot be renamed (see the module docstring); None: decided
    from `directory` (default_dir_renames). A workdir's checkpoints are listed in the mode they were
    written in (commit-file steps carry commit_success.txt, renamed ones do not)."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, async_save: bool = True,
                 log=print, dir_renames: bool | None = None):
        self.directory = paths.as_path(directory)
        self.keep = max_to_keep
        self.log = log
        self.dir_renames = default_dir_renames(self.directory) if dir_renames is None else dir_renames
        self.verified: set[int] = set()       # steps read back intact (by this process's saves or restore)
        self._unverified: dict[int, object] = {}   # step -> abstract template, saved but not yet read back
        atomicity = None if self.dir_renames else ocp.options.AtomicityOptions(
            mode=ocp.options.AtomicityMode.COMMIT_FILE)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=None, create=True, enable_async_checkpointing=async_save, atomicity_options=atomicity))

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
        self._verify_finished()     # (Orbax waits for the previous async save here anyway)
        named = [(parts, _key_data(leaf)) for parts, leaf in items]
        meta = {**meta, "format": FORMAT, "leaf_paths": ["/".join(p) for p, _ in named],
                "digests": {"/".join(p): _digest(v) for p, v in named},
                "shapes": {"/".join(p): _shape_of(v) for p, v in named}}
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(_nest(named)), meta=ocp.args.JsonSave(meta)), force=force)
        if saved:
            self._unverified[step] = jax.tree_util.tree_map(_template_of, state)
        return saved

    def _verify_finished(self) -> None:
        """Waits for pending saves, reads each back (all processes agreeing on the verdict), moves one
        that fails its integrity check aside, then applies the keep-N rotation."""
        if not self._unverified:
            return
        self.manager.wait_until_finished()
        pending, self._unverified = self._unverified, {}
        present = set(self.all_steps())        # (a step restored or moved aside since is settled)
        for step, template in sorted(pending.items()):
            if step not in present or step in self.verified:
                continue
            try:
                self.restore(template, step)
                verdict, err = OK, None
            except CorruptCheckpoint as e:
                verdict, err = CORRUPT, e
            except Exception as e:   # I/O that retrying did not cure: unverified, but not corrupt
                verdict, err = FAILED, e
            agreed = max(_gather_verdicts(verdict))
            if agreed == OK:
                self.verified.add(step)
            elif agreed == CORRUPT:
                self._quarantine([(step, err or "corrupt as read by another process")], "did not verify after saving")
            else:
                self.log(f"WARNING: checkpoint step {step} could not be read back to verify it "
                         f"({err or 'on another process'}); the older checkpoints are kept")
        self._rotate()

    def _rotate(self) -> None:
        """Deletes the oldest steps beyond `keep`, but only steps older than the newest verified one."""
        if self.keep is None:
            return
        steps = sorted(self.all_steps())
        newest_verified = max((s for s in steps if s in self.verified), default=None)
        if newest_verified is None:
            return
        keepers = set(steps[-self.keep:]) | {newest_verified}
        for step in steps:
            if step < newest_verified and step not in keepers:
                self.manager.delete(step)
                self.verified.discard(step)

    def _quarantine(self, corrupt: list, why: str) -> None:
        """Moves the (agreed) corrupt steps to <directory>/../corrupt/<step>-<time>: process 0 moves,
        then every process passes the same barrier and re-reads the step list."""
        if not corrupt:
            return
        stamp = int(time.time())
        for step, err in corrupt:
            aside = self.directory.parent / "corrupt" / f"{step}-{stamp}"
            self.log(f"WARNING: checkpoint step {step} is corrupt and is skipped ({err}); {why}; moved to {aside}")
            if jax.process_index() == 0:
                self._move_aside(self.directory / str(step), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"chmr_quarantine_{'_'.join(str(s) for s, _ in corrupt)}")
        self.manager.reload()

    def _move_aside(self, src, dst) -> None:
        """A rename where directories can be renamed; else a copy, then the original deleted (the copy
        first: an interruption leaves the step in place, to be moved again by the next run)."""
        if self.dir_renames:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
        elif paths.is_remote(src):
            # Through the file system instance Orbax itself uses (etils', keyed by the scheme): a separate
            # gcsfs instance would leave etils' cached listing holding the deleted step, and Orbax's next save
            # of that step number would try to delete its stale files (FileNotFoundError). Both caches are
            # dropped after, as another instance (paths, a second Checkpointer) may have listed the step too.
            fs = _orbax_fs(src)
            fs.copy(os.fspath(src), os.fspath(dst), recursive=True)
            fs.rm(os.fspath(src), recursive=True)
            fs.invalidate_cache()
            import fsspec
            fsspec.core.url_to_fs(os.fspath(src))[0].invalidate_cache()
        else:
            shutil.copytree(src, dst)
            shutil.rmtree(src)

    def restore(self, template, step: int | None = None, subtrees: tuple[str, ...] | None = None):
        """(state, meta) at `step` (default: the latest), shaped and sharded like `template`.

        subtrees: restore only these top-level parts (e.g. ('params', 'rest') of a TrainState); the
        others come back as they are in `template` (which may hold abstract shapes there).
        Raises CorruptCheckpoint when the bytes or values differ from what was saved (or a file is
        missing, truncated or malformed), CheckpointIOError on an I/O error that retrying did not cure,
        ValueError when `template` has another structure or other shapes than the checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        where = self.directory / str(step)
        # Read with Orbax's handlers, not the manager: its restore ends in a barrier that a process whose
        # read failed would never reach (the processes agree on verdicts in restore_newest_good instead).
        meta = _read(lambda: ocp.JsonCheckpointHandler().restore(where / "meta", args=ocp.args.JsonRestore()),
                     where, "metadata")
        if not isinstance(meta, dict):
            raise CorruptCheckpoint(f"{where}: metadata is not a JSON object")
        if meta.get("format") != FORMAT:
            return self._restore_positional(template, step, where)
        if not {"leaf_paths", "digests"} <= set(meta):
            raise CorruptCheckpoint(f"{where}: metadata lacks the leaf paths or digests")
        items = _named(template)
        want = ["/".join(p) for p, _ in items]
        saved_paths = meta.pop("leaf_paths")
        digests = meta.pop("digests")
        shapes = meta.pop("shapes", None)
        meta.pop("format")
        chosen = [(p, leaf) for p, leaf in items if subtrees is None or (p and p[0] in subtrees)]
        missing = ["/".join(p) for p, _ in chosen if "/".join(p) not in digests]
        if missing or (subtrees is None and saved_paths != want):
            extra = [p for p in saved_paths if p not in want][:5]
            raise ValueError(f"checkpoint {where} holds a different state structure than this code builds (not in "
                             f"the checkpoint: {(missing or [p for p in want if p not in saved_paths])[:5]}; only in "
                             f"the checkpoint: {extra}); it was written by another chmr_jax version or config")
        # Shapes before bytes: Orbax restores an array into a template of another shape without error
        # (padding or cutting it), and the digest mismatch would then call a good checkpoint corrupt.
        if shapes is None:    # saved before shapes were recorded: Orbax's own array metadata
            tree = _read(lambda: ocp.PyTreeCheckpointHandler().metadata(where / "state").tree, where, "array metadata")
            shapes = {}
            for parts, _ in chosen:
                m = _get(tree, parts)
                shapes["/".join(parts)] = [list(m.shape), np.dtype(m.dtype).name]
        changed = [f"{'/'.join(p)} {tuple(shapes['/'.join(p)][0])} {shapes['/'.join(p)][1]} -> "
                   f"{tuple(_shape_of(leaf)[0])} {_shape_of(leaf)[1]}"
                   for p, leaf in chosen if shapes.get("/".join(p)) not in (None, _shape_of(leaf))]
        if changed:
            raise ValueError(f"checkpoint {where} holds arrays of other shapes than this config builds "
                             f"({len(changed)}, e.g. {changed[:3]}): the model's input widths or sizes changed "
                             "since it was written; nothing was moved")
        abstract = _nest([(p, _abstract(leaf)) for p, leaf in chosen])
        restored = _read(lambda: ocp.PyTreeCheckpointHandler().restore(where / "state", args=ocp.args.PyTreeRestore(
            abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=subtrees is not None)), where, "arrays")
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

    def restore_newest_good(self, template, log=None, subtrees=None):
        """(state, meta) of the newest checkpoint that passes the integrity checks, or (None, None)
        when there is no checkpoint. The processes walk the same steps and agree on each verdict (the
        worst over processes) before anything is moved; then the corrupt newer steps are moved to
        <directory>/../corrupt/<step>-<time> (process 0) with a warning naming them. Nothing is moved
        when no step is good (CorruptCheckpoint), on an I/O error retrying did not cure, or when the
        template does not fit the checkpoint (ValueError): those are raised on every process."""
        log = log or self.log
        steps = _steps_of_process0(sorted(self.all_steps(), reverse=True))
        corrupt = []
        for step in steps:
            try:
                result, verdict, err = self.restore(template, step, subtrees), OK, None
            except CorruptCheckpoint as e:
                result, verdict, err = None, CORRUPT, e
            except Exception as e:   # not corruption: raised below, on every process, once all agree
                result, verdict, err = None, FAILED, e
            agreed = max(_gather_verdicts(verdict))
            if agreed == FAILED:
                if err is not None and verdict == FAILED:
                    raise err
                raise CheckpointIOError(f"another process could not read checkpoint {self.directory / str(step)} "
                                        "(see its log); no checkpoint was moved")
            if agreed == CORRUPT:
                corrupt.append((step, err or "corrupt as read by another process"))
                continue
            prev, self.log = self.log, log
            try:
                self._quarantine(corrupt, "restored the older step instead")
            finally:
                self.log = prev
            self.verified.add(step)
            self._unverified.pop(step, None)
            return result
        if corrupt:
            raise CorruptCheckpoint(
                f"every checkpoint in {self.directory} failed its integrity check ("
                + "; ".join(f"step {s}: {e}" for s, e in corrupt)[:600] + "); none was moved: move the readable "
                "ones elsewhere and start again with a new --workdir, or restore a backup")
        return None, None

    def wait(self) -> None:
        """Waits for pending saves, verifies them and applies the rotation."""
        self.manager.wait_until_finished()
        self._verify_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()
