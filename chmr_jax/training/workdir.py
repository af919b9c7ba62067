"""A pretraining workdir's guards: what `pretrain.run` checks before it trains in a workdir, and how it
stops there.

Before anything is built: every process sees the same workdir (check_shared_workdir), the config
continues the run the workdir holds (check_same_run: its run-defining sections; called again once the
inputs are built, with the model dims its checkpoints were saved with), and a run that already finished
is returned as it is (finished_summary, already_finished). While training: StopFlag turns SIGTERM/SIGINT into a checkpoint and a clean exit.
write_json writes the run's JSON files (config.json, model_dims.json, summary.json, ...) atomically.
"""
from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from chmr_jax.config_util import ConfigError
from chmr_jax.data import files

# Sections whose change makes a checkpoint unusable (shapes, data order): a restart must match them.
RUN_DEFINING = ("featurize", "geometry", "corpus", "batch", "pretrain_data", "model", "objective", "optim")
# Fields of those sections that do not define the run: diagnostics only.
NOT_RUN_DEFINING = (("objective", "collapse_every"), ("objective", "collapse_stats"),
                    # the kNN / propagation layout: the same inputs whatever its value (propagation.py)
                    ("pretrain_data", "knn_block"), ("pretrain_data", "knn_db_block"),
                    ("pretrain_data", "knn_database"), ("pretrain_data", "propagation_chunk"))


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically (files.atomic_write_text)."""
    files.atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def finished_summary(workdir: Path, tcfg) -> dict | None:
    """The summary of a run in `workdir` that already reached its last step with its final checkpoint,
    so a repeated command returns at once (no inputs rebuilt, no compilation, summary.json unchanged).
    The last step is tcfg.steps or, with steps=0, the full schedule the saved run computed for the same
    steps=0 and epochs (config.json)."""
    path = workdir / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    target = tcfg.steps
    if target <= 0:
        saved = workdir / "config.json"
        saved_train = json.loads(saved.read_text()).get("train", {}) if saved.exists() else {}
        if saved_train.get("steps") != 0 or saved_train.get("epochs") != tcfg.epochs:
            return None
        target = summary.get("total_steps", -1)
    ckpts = workdir / "checkpoints"
    if summary.get("steps") == target and ckpts.is_dir() and (ckpts / str(target)).is_dir():
        return summary
    return None


def already_finished(workdir: Path, summary: dict) -> str:
    """No step ran, so no rate is printed: the finished run's numbers stay as summary.json holds them."""
    return (f"{workdir}: already finished at step {summary['steps']} of {summary.get('total_steps', summary['steps'])}; "
            f"nothing to train (summary.json unchanged)")


# Config fields added after workdirs were made, with the value that reproduces those runs (what the code
# assumes when the field is missing), so adding a field does not make old runs unresumable.
# What a run saved before the field existed did (not always today's default: vicreg_second_view changed
# the objective, so such a run resumes only with --config.pretrain_data.vicreg_second_view=propagated).
ADDED_FIELDS = {("model", "dtype"): "float32", ("model", "remat"): False,
                ("pretrain_data", "vicreg_second_view"): "propagated", ("pretrain_data", "holdout_folds"): 5,
                ("batch", "device_blocks"): False, ("objective", "collapse_every"): 1,
                ("objective", "collapse_stats"): True, ("pretrain_data", "knn_approx_recall"): 0.0}


# What each model dim is built from, for the message when one changed under a workdir's checkpoints.
_DIM_SOURCES = {"mol_dims": {"fingerprint": "config.featurize (the fingerprint settings)",
                             "graph": "config.model.gnn_width",
                             "geometry": "config.geometry (the geometry file or rdkit3d settings)"},
                "cell_dims": "the corpus (config.corpus.saved or the corpus built from config.corpus; a rebuilt "
                             "corpus can change it)",
                "target_dims": "the corpus' context targets (config.corpus / config.pretrain_data)"}


def check_same_dims(workdir: Path, dims: dict) -> None:
    """The model dims derived from this run's inputs equal the workdir's model_dims.json (its checkpoints'
    shapes): a rebuilt corpus or geometry file can change them with an unchanged config."""
    path = workdir / "model_dims.json"
    held = [p for d in ("checkpoints", "corrupt") if (workdir / d).is_dir() for p in (workdir / d).iterdir()]
    if not path.exists() or not held:      # nothing saved to mismatch (a run that crashed before its first save)
        return
    saved = json.loads(path.read_text())
    changed = []
    for group in sorted(set(saved) | set(dims)):
        old, new = saved.get(group) or {}, dims.get(group) or {}
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                src = _DIM_SOURCES.get(group, "")
                src = src.get(name, "") if isinstance(src, dict) else src
                changed.append(f"{group}.{name} {old.get(name, 'absent')} -> {new.get(name, 'absent')}"
                               + (f" (from {src})" if src else ""))
    if changed:
        raise ConfigError(f"{workdir} holds a run whose model has other dims than this config and data build: "
                          f"{'; '.join(changed)} (see {path}); its checkpoints would not fit, none was moved. "
                          "Use a new --workdir, or restore the inputs the run was built from")


def check_same_run(workdir: Path, config, dims: dict | None = None, n_devices: int | None = None) -> None:
    """`config` continues the run in `workdir` (its RUN_DEFINING sections but NOT_RUN_DEFINING) and, when
    `dims` is given, builds a model of the same dims. batch.device_blocks is compared only once the
    device count is known (n_devices) and above 1: on one device both layouts are the same batches."""
    if dims is not None:
        check_same_dims(workdir, dims)
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    inserted = set()
    for (section, key), value in ADDED_FIELDS.items():   # a run saved before the field existed had its default
        if key not in saved.get(section, {}):
            saved.setdefault(section, {})[key] = value
            inserted.add(f"{section}.{key}")
    now = json.loads(config.to_json_best_effort())
    ignored = list(NOT_RUN_DEFINING) + ([("batch", "device_blocks")] if (n_devices or 1) <= 1 else [])
    for section, key in ignored:
        for d in (saved, now):
            d.get(section, {}).pop(key, None)
    changed = []
    for section in RUN_DEFINING:
        old, new = saved.get(section) or {}, now.get(section) or {}
        if old != new:
            keys = sorted(k for k in set(old) | set(new) if old.get(k, "absent") != new.get(k, "absent"))
            changed += [f"{section}.{k}: {old.get(k, 'absent')!r} -> {new.get(k, 'absent')!r}" for k in keys]
    if changed:
        added = [name for name in sorted(inserted) if any(c.startswith(f"{name}:") for c in changed)]
        raise ConfigError(f"{workdir} holds a run with a different config ({'; '.join(changed)}; saved -> now, see "
                          f"{saved_path}); resuming it with this config would not continue the same run. Use a new "
                          "--workdir, or pass the saved values as --config overrides"
                          + (f" ({', '.join(added)} did not exist when the run was saved: the value shown is what "
                             "it did then)" if added else ""))


def check_shared_workdir(workdir: Path) -> None:
    """Several processes: every one sees the workdir process 0 sees (a shared filesystem or bucket), else
    ConfigError naming the processes and paths that do not, on every process, before anything is read or
    trained (with separate workdirs process 0 would resume while another started afresh).

    Process 0 writes a random nonce to workdir/.shared_check; after a collective that every process
    enters (so after that write), each reads the file back; the verdicts are all-gathered."""
    import secrets

    from jax.experimental import multihost_utils
    if jax.process_count() < 2:
        return
    path = workdir / ".shared_check"
    nonce = secrets.token_hex(8)
    if jax.process_index() == 0:
        files.atomic_write_text(path, nonce)
    # The nonce as 16 bytes from process 0 (a collective: every process waits for process 0's write).
    sent = multihost_utils.broadcast_one_to_all(np.frombuffer(nonce.encode(), np.uint8))
    want = bytes(np.asarray(sent, np.uint8)).decode()
    for wait in (0.0, 0.5, 1.0, 2.0):    # a network filesystem may show a new file a moment late
        time.sleep(wait)
        try:
            ok = path.read_text().strip() == want
        except OSError:
            ok = False
        if ok:
            break
    # Each process' verdict and workdir, padded to a fixed size for the gather.
    record = np.zeros(4097, np.uint8)
    name = str(workdir).encode()[:4096]
    record[0], record[1:1 + len(name)] = ok, np.frombuffer(name, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(record))
    if jax.process_index() == 0:
        path.unlink(missing_ok=True)   # every process has read it (they all sent their verdicts)
    dirs = [bytes(r[1:]).rstrip(b"\0").decode() for r in gathered]
    bad = [(i, d) for i, (r, d) in enumerate(zip(gathered, dirs)) if not r[0]]
    if bad:
        where = "; ".join(f"process {i} read its workdir {d}" for i, d in bad)
        raise ConfigError(f"the processes do not share one workdir: process 0 wrote {dirs[0].rstrip('/')}/{path.name}, "
                          f"but {where} and did not find it there. --workdir must be one directory every host "
                          "sees (a shared filesystem or a gs:// bucket); nothing was trained")


class StopFlag:
    """SIGTERM/SIGINT -> finish the current step, checkpoint, exit (a preempted job loses nothing).

    One process: a Python handler; `reached(step)` after each step says whether one came. Several
    processes (a pod's hosts receive the notice at different steps, and a cooperative save at different
    steps would hang): JAX's preemption service. jax.distributed.initialize installs its SIGTERM handler
    (in C++, invisible to Python's `signal`), which is left in place; any process' notice starts JAX's
    agreement on a step (the fastest process' next), and `reached(step)`
    (multihost_utils.reached_preemption_sync_point: a local check under a lock, no communication, ~0.1 us
    a call on this CPU) is True on that same step on every process. A SIGINT is forwarded to that
    handler as a SIGTERM. A second SIGINT (in one process: a second SIGTERM too) stops at once without
    a checkpoint.
    """

    def __init__(self, start: int, log=print):
        from jax.experimental import multihost_utils
        self.signal = None
        self._old = {}
        self._sync = None
        if jax.process_count() > 1:
            try:   # every process calls it at every step from the same step on: here the step resumed from
                multihost_utils.reached_preemption_sync_point(start)
                self._sync = multihost_utils.reached_preemption_sync_point
            except RuntimeError:   # jax_enable_preemption_service=False
                log("note: JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM ends this "
                    "process without a checkpoint and the others at the heartbeat timeout")

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._sync is not None:
            self._old[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
        elif jax.process_count() == 1:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:       # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def _forward(self, signum, frame):
        self._handle(signum, frame)
        signal.raise_signal(signal.SIGTERM)     # JAX's handler: a preemption notice for every process

    def reached(self, step: int) -> bool:
        """Whether to stop after optimiser step `step` (every process of a run gets the same answer)."""
        if self._sync is not None:
            return self._sync(step)
        return self.signal is not None

    @property
    def reason(self) -> str:
        # A SIGINT of a multi-process run reaches the others as JAX's preemption notice, a SIGTERM.
        return signal.Signals(self.signal).name if self._sync is None else "SIGTERM"

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
