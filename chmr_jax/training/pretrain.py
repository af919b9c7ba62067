"""The pretraining job: config -> corpus -> inputs -> model -> jitted steps -> checkpoints + metrics.

`run(config, workdir)` is what `chmr-jax pretrain` calls. Everything a step needs is derived from
the step number: the data order of epoch e is a permutation seeded by (train.seed, e), the batch
is the k-th group of that order, and the step's PRNG key is fold_in(train.step_base_key(seed), step).
A run killed at any point and restarted with the same command restores the newest checkpoint and
continues with exactly the batches and keys the uninterrupted run would have used. (Runs made before
issue 21 drew their step keys from fold_in(key(seed), step); resumed with today's code, with
`--config.pretrain_data.vicreg_second_view=propagated`, their remaining steps draw from the new stream.)

Workdir layout:
  config.json            the resolved config of the run (a restart must match it)
  corpus_manifest.json   the corpus' manifest (sources, counts, dims)
  checkpoints/<step>/    Orbax checkpoints (train state + JSON meta), the newest `keep` kept
  metrics.jsonl          one row per logged step (with step_s and molecules_per_s of the interval since
                         the previous row); tensorboard/ event files with the same scalars
  summary.json           wall time and molecules over the whole run (the totals travel with each
                         checkpoint), molecules/s after compilation, peak memory, this process' XLA
                         compile seconds and compilation-cache hits, final metrics
  profile/               the jax.profiler trace of config.train.profile_steps (process 0)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from chmr_jax import config_util
from chmr_jax.data import corpus as corpus_lib, featurize, files, geometry as geometry_lib, paths, prepare, records
from chmr_jax.mechanisms import model as model_lib, objective as objective_lib
from chmr_jax.training import checkpoint as checkpoint_lib, chores as chores_lib, pretrain_data, train, utilisation

MOLECULAR = ("fingerprint", "graph", "geometry")
# Sections whose change makes a checkpoint unusable (shapes, data order): a restart must match them.
RUN_DEFINING = ("featurize", "geometry", "corpus", "batch", "pretrain_data", "model", "objective", "optim")
# Fields of those sections that do not define the run: diagnostics only.
NOT_RUN_DEFINING = (("objective", "collapse_every"), ("objective", "collapse_stats"),
                    # the kNN / propagation layout: the same inputs whatever its value (propagation.py)
                    ("pretrain_data", "knn_block"), ("pretrain_data", "knn_db_block"),
                    ("pretrain_data", "knn_database"), ("pretrain_data", "propagation_chunk"))


class ConfigError(ValueError):
    """A config that cannot run on this data; the message says which field and what to do."""


class TrainingDiverged(RuntimeError):
    pass


# ---- config -> components --------------------------------------------------------------------------

def molecular_names(config) -> list[str]:
    names = config_util.parse_list(config.model.molecular)
    unknown = [n for n in names if n not in MOLECULAR]
    if unknown or not names:
        raise ConfigError(f"config.model.molecular={config.model.molecular!r}: choose from {MOLECULAR} "
                          "(comma separated, at least one)")
    if "geometry" in names and config.geometry == "none":
        raise ConfigError("config.model.molecular includes 'geometry' but config.geometry is 'none'; set "
                          "config.geometry to 'rdkit3d' or a matrix file (.npz/.csv keyed by InChIKey block)")
    return names


def data_config(config, n_devices: int) -> pretrain_data.DataConfig:
    """config.batch and config.pretrain_data are DataConfig's arguments; the device count adds the
    graph multiple and makes the padding a multiple of it."""
    cfg = pretrain_data.DataConfig(**config.batch, **config.pretrain_data, graph_multiple=n_devices)
    if cfg.device_blocks and n_devices > 1:
        return cfg          # per-device blocks: the totals are n_devices x a block, already divisible
    return dataclasses.replace(cfg, pad_multiple=math.lcm(cfg.pad_multiple, n_devices))


def collapse_every(config) -> int:
    """config.objective.collapse_every, where 0 means every logged step (config.train.log_every_steps)."""
    every = int(config.objective.get("collapse_every", 1))
    return int(config.train.log_every_steps) if every == 0 else every


def objective_config(config) -> objective_lib.ObjectiveConfig:
    return objective_lib.ObjectiveConfig(**{**config.objective, "collapse_every": collapse_every(config)})


def load_corpus(config, data_dir, cache_dir, n_workers=None, log=print) -> corpus_lib.Corpus:
    """config.corpus.saved if set, else the corpus the config describes, built once and cached in
    cache_dir under a digest of the corpus and featurizer settings."""
    cfg = config.corpus
    if cfg.saved:
        saved = paths.pull(cfg.saved, "config.corpus.saved", prune=True) if paths.is_remote(cfg.saved) else Path(cfg.saved)
        if not (saved / "manifest.json").exists():
            raise ConfigError(f"config.corpus.saved={cfg.saved!r} is not a corpus directory (no manifest.json); "
                              "build one with `chmr-jax prepare --corpus ... --out DIR` or leave it empty")
        log(f"corpus: {cfg.saved}")
        corpus = corpus_lib.Corpus.load(saved)
    else:
        corpus = _cached_corpus(config, data_dir, cache_dir, n_workers, log)
    log(prepare.format_table(corpus_lib.summary_rows(corpus)))
    return corpus


def corpus_cache_path(config, cache_dir) -> Path:
    """Where load_corpus caches the corpus config.corpus describes (keyed on it and the featurizer)."""
    settings = featurize.FeaturizerSettings.from_config(config.featurize)
    return Path(cache_dir) / f"corpus-{config.corpus.kind}-{prepare.corpus_settings_digest(config.corpus, settings)}"


def _cached_corpus(config, data_dir, cache_dir, n_workers, log) -> corpus_lib.Corpus:
    """The corpus config.corpus describes, from its cache directory, else built there as per-molecule records,
    each process featurizing its share (records.py), then read whole by every process. A cache built before
    the records (corpus.npz / features.npz) is still read as it is."""
    cfg = config.corpus
    settings = featurize.FeaturizerSettings.from_config(config.featurize)
    path = corpus_cache_path(config, cache_dir)
    share = records.Share.of_jax()
    remote = paths.remote_of(path)
    # Checked before anything is featurized: a folder of each host's own cannot hold the shares of one build.
    if share.count > 1 and not remote and not records.one_folder(path.parent, share):
        log(f"corpus: the processes do not share the cache {path.parent} (each host has its own folder there): "
            "each process builds the whole corpus into its own; give them one cache (a shared folder or a gs:// "
            "--config.cache_dir) to build it in shares")
        share = records.Share()   # each process on its own, as one process (no collectives)
    built = (path / "manifest.json").exists()
    if share.count > 1:   # one decision for all: process 0's (its cache is the one the others pull)
        from jax.experimental import multihost_utils
        built = bool(multihost_utils.broadcast_one_to_all(np.int32(built)))
    if not built:
        log(f"corpus: building kind={cfg.kind} as records in {share.count} share(s) (cached in {path})")
        keys_of = None if share.count == 1 else \
            (lambda smiles, join, workers: share.keys_of_smiles(smiles, join, workers, log))
        inputs = prepare.corpus_inputs(cfg, settings, data_dir, cache_dir, n_workers, keys_of)
        records.build(inputs, path, share, path.name.rsplit("-", 1)[-1], log,
                      publish=lambda: paths.push(cache_dir, "the feature cache"),   # (a gs:// cache: upload)
                      shards_meet_here=not remote)
    elif share.count > 1:
        if share.index == 0:   # a gs:// cache: the other hosts read the corpus from there (also one
            paths.push(cache_dir, "the feature cache")   # built earlier on this host but not in the bucket)
        share.barrier("chmr_corpus_cache")
    if records.missing(path) and remote:   # shards other hosts wrote, or all of an earlier build
        paths.pull(remote, "the feature cache")
    lacking = records.missing(path)
    if lacking and share.count > 1:
        raise ConfigError(f"process {share.index} does not see {lacking[:3]} in the corpus cache {path}, which the other "
                          "processes wrote: give every process one cache (a shared folder or a gs:// --config.cache_dir)")
    log(f"corpus: {'cached ' if built else ''}{path}")
    return corpus_lib.Corpus.load(path)


def validate(config, corpus: corpus_lib.Corpus, source: str) -> None:
    """Every modality the config names exists in the corpus with the configured width."""
    found = {name: m.dim for name, m in corpus.modalities.items()}
    wanted = dict(config.corpus.dims)
    for name in config.corpus.modalities:
        wanted.setdefault(name, None)
    for name, dim in wanted.items():
        if name not in found:
            raise ConfigError(f"config.corpus names modality {name!r}, but the corpus ({source}) has "
                              f"{sorted(found) or 'no cellular modalities'}; fix config.corpus.modalities / "
                              f"config.corpus.dims or point config.corpus.saved at a corpus that has it")
        if dim is not None and dim != found[name]:
            raise ConfigError(f"config.corpus.dims.{name}={dim} but modality {name!r} of the corpus ({source}) "
                              f"has {found[name]} features; set --config.corpus.dims.{name}={found[name]} "
                              "if that corpus is the intended one")
    if config.batch.batch_size < 2:
        raise ConfigError("config.batch.batch_size must be >= 2 (InfoNCE needs negatives)")
    every = collapse_every(config)
    if every < 1 or (every > 1 and config.train.log_every_steps % every):
        raise ConfigError(f"config.objective.collapse_every={every} must divide config.train.log_every_steps="
                          f"{config.train.log_every_steps} (0: the logged steps): the logged steps would miss the "
                          "collapse statistics")
    if config.objective.infonce_impl not in ("dense", "chunked", "ring"):
        raise ConfigError(f"config.objective.infonce_impl={config.objective.infonce_impl!r}: "
                          "choose 'dense', 'chunked' or 'ring'")


def model_dims(config, data: pretrain_data.PretrainData, names: list[str]) -> dict:
    """The input/output widths the model is built from (saved as model_dims.json beside the
    checkpoints, so an encoder can be rebuilt without the corpus)."""
    return {"mol_dims": {n: (config.model.gnn_width if n == "graph" else int(data.inputs[n].shape[1])) for n in names},
            "cell_dims": {n: int(mod.dim) for n, mod in data.corpus.modalities.items()},
            "target_dims": {t: int(data.context.targets[t].shape[1]) for t in data.context.targets}}


def build_model(config, dims: dict) -> model_lib.CHMR:
    """config.model is CHMR's keyword arguments, but for `molecular`, which names the molecular inputs
    (the keys of dims['mol_dims'])."""
    kwargs = {k: v for k, v in config.model.items() if k != "molecular"}
    return model_lib.CHMR(dims["mol_dims"], dims["cell_dims"], dims["target_dims"], **kwargs,
                          rngs=train.init_rngs(config.train.seed))


def init_digest(model) -> str:
    """sha256 of a model's parameters and batch statistics (per-leaf digests as in the checkpoints,
    sorted by path): pretraining records its initial parameters' digest (init_digest.json, summary.json),
    and fine-tuning checks its untrained control against it (the control must be this run's own start)."""
    named = sorted(("/".join(str(p) for p in path), checkpoint_lib._digest(checkpoint_lib._key_data(leaf[...])))
                   for path, leaf in nnx.to_flat_state(nnx.state(model)))   # (RNG keys by their key data)
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()


def saved_init_digest(workdir) -> str | None:
    """The initial-parameter digest a pretraining run recorded (None for runs before it was recorded)."""
    path = paths.as_path(workdir) / "init_digest.json"
    return json.loads(path.read_text())["init_digest"] if path.exists() else None


def step_flops(config, dims: dict, tx, ctx: dict, mesh, step_fn, *step_args) -> float | None:
    """One device's share of the FLOPs of one train step as the model defines them: the step's total
    for the global batch divided by the mesh's device count (1 without a mesh).

    The total does not depend on how the step is chunked or sharded (issue 21 §2): it is counted on the
    step with dense InfoNCE and without remat (the MFU convention: recomputation is not useful work),
    lowered for the global batch's abstract shapes without a mesh (tracing, no compilation), scanned
    bodies (Tree-VQ levels) once per trip (utilisation.program_flops). `step_fn` itself is reused when
    it already is that step (dense, no remat, one device)."""
    n_devices = 1 if mesh is None else mesh.size
    if mesh is None and not config.model.remat and config.objective.infonce_impl == "dense":
        total = utilisation.program_flops(step_fn, *step_args)
    else:
        import ml_collections
        plain = ml_collections.ConfigDict(config.to_dict())
        plain.model.remat = False
        plain.objective.infonce_impl = "dense"
        abstract = nnx.eval_shape(lambda: build_model(plain, dims))
        abstract.train()
        graphdef = nnx.split(abstract, nnx.Param, ...)[0]
        step = train.make_train_step(graphdef, tx, objective_config(plain), ctx)
        # Shapes alone: the global arrays' shardings (and, on a pod, other hosts' shards) play no part.
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), step_args)
        total = utilisation.program_flops(step, *shapes)
    return total / n_devices if total else None


def checkpoint_directory(workdir, step: int | None = None) -> Path:
    """Where `load_pretrained(workdir, step)` reads: checkpoints/, or snapshots/ for an epoch snapshot
    (config.train.snapshot_epochs) kept beside the rotation."""
    workdir = paths.as_path(workdir)
    directory = workdir / "checkpoints"
    if step is not None and (workdir / "snapshots" / str(step)).is_dir() and not (directory / str(step)).is_dir():
        directory = workdir / "snapshots"
    return directory


def load_pretrained(workdir, step: int | None = None):
    """(model in eval mode, config, meta) from a pretraining workdir's checkpoint (default: newest)."""
    import ml_collections
    workdir = paths.as_path(workdir)
    paths.check_reachable(workdir, "pretrained workdir")
    for name in ("config.json", "model_dims.json"):
        if not (workdir / name).exists():
            raise FileNotFoundError(f"{workdir} is not a chmr_jax pretraining workdir (no {name}); pass the "
                                    "--workdir of a `chmr-jax pretrain` run")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    dims = json.loads((workdir / "model_dims.json").read_text())
    # Parameters and batch statistics alone, restored into abstract shapes: no throwaway model
    # initialisation or optimiser state (checkpoints of the earlier positional format need both).
    abstract = nnx.eval_shape(lambda: build_model(config, dims))
    abstract.train()
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    ckpt = checkpoint_lib.Checkpointer(checkpoint_directory(workdir, step), max_to_keep=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is not None and ckpt.format_of(step) < checkpoint_lib.FORMAT:
            tx = train.make_optimizer(**config.optim, total_steps=1)
            graphdef, template = train.init_state(build_model(config, dims), tx)
            state, meta = ckpt.restore(template, step)
        else:
            state, meta = ckpt.restore(train.TrainState(step=None, params=params, rest=rest, opt_state=None,
                                                        skipped=None), step, subtrees=("params", "rest"))
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, state.params, state.rest)
    model.eval()
    return model, config, meta


def build_inputs(config, n_devices: int, data_dir=None, log=print):
    """(corpus, PretrainData) for `config` on `n_devices` devices: the corpus (cached), its modality
    selection, kNN propagation, the context graph, the batch budget and, if used, geometry descriptors.
    Every process of a multi-process run builds the same (cheap, deterministic) index; batches are
    then packed per host (train.local_rows)."""
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    corpus = load_corpus(config, data_dir, cache_dir, config.workers or None, log)
    validate(config, corpus, config.corpus.saved or f"kind={config.corpus.kind}")
    try:
        corpus = corpus.with_modalities(config.pretrain_data.modalities)
    except corpus_lib.CorpusError as e:
        raise ConfigError(f"config.pretrain_data.modalities={config.pretrain_data.modalities!r}: {e}") from None

    t0 = time.perf_counter()
    data = pretrain_data.prepare(corpus, data_config(config, n_devices))
    if "geometry" in molecular_names(config):
        if config.geometry == "rdkit3d":   # (each process embeds its share of the molecules)
            geo = records.geometry(list(corpus.smiles), geometry_lib.GeometrySettings(seed=config.geometry_seed),
                                   cache_dir, f"corpus-{config.corpus.kind}", config.workers or None,
                                   records.Share.of_jax(), log)
        else:   # a matrix file's rows: read, not computed
            geo = prepare.geometry_features(list(corpus.smiles), list(corpus.keys), config.geometry,
                                            geometry_lib.GeometrySettings(seed=config.geometry_seed), cache_dir,
                                            f"corpus-{config.corpus.kind}", config.workers or None)
        data.inputs["geometry"] = geo.standardized().astype(np.float32)
        if jax.process_index() == 0:
            paths.push(cache_dir, "the feature cache")
    obs = {n: int(m.available.sum()) for n, m in corpus.modalities.items()}
    reached = {n: int(r.sum()) for n, r in data.reached.items()}
    log(f"inputs: {len(corpus)} molecules; observed {obs}; observed or propagated {reached}; "
        f"context graph {len(data.context.node_type)} nodes / {len(data.context.indices)} edges; "
        f"budget {data.budget} ({time.perf_counter() - t0:.1f}s)")
    return corpus, data


# ---- the step -> batch map ---------------------------------------------------------------------------

def peak_memory() -> dict:
    out = {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = [d.memory_stats() for d in jax.local_devices() if d.platform != "cpu"]
    peaks = [s.get("peak_bytes_in_use", 0) for s in stats if s]
    if peaks:
        out["device_peak_bytes"] = int(max(peaks))
    return out


def _write_json(path: Path, obj) -> None:
    files.atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _finished_summary(workdir: Path, tcfg) -> dict | None:
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


def _check_same_dims(workdir: Path, dims: dict) -> None:
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


def _check_same_run(workdir: Path, config, dims: dict | None = None, n_devices: int | None = None) -> None:
    """`config` continues the run in `workdir` (its RUN_DEFINING sections but NOT_RUN_DEFINING) and, when
    `dims` is given, builds a model of the same dims. batch.device_blocks is compared only once the
    device count is known (n_devices) and above 1: on one device both layouts are the same batches."""
    if dims is not None:
        _check_same_dims(workdir, dims)
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


class _StopFlag:
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


def _check_shared_workdir(workdir: Path) -> None:
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


def enable_compilation_cache(cache_dir: str) -> None:
    """JAX's persistent compilation cache in `cache_dir` (config.train.compilation_cache_dir): a restarted
    or repeated job loads its compiled programs instead of compiling them again. Every program is cached
    (no minimum compile time or size: the tiny config's programs compile in under JAX's 1 s default).
    A loaded program is the same XLA executable, so the numbers do not change."""
    from jax.experimental.compilation_cache import compilation_cache
    if not cache_dir or jax.config.jax_compilation_cache_dir == str(cache_dir):
        return
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.set_cache_dir(str(cache_dir))
    # JAX decides once per process whether it uses the cache (at its first compilation): a process that
    # compiled before this call (a notebook, the tests) decides again.
    compilation_cache.reset_cache()


def _already_finished(workdir: Path, summary: dict) -> str:
    """No step ran, so no rate is printed: the finished run's numbers stay as summary.json holds them."""
    return (f"{workdir}: already finished at step {summary['steps']} of {summary.get('total_steps', summary['steps'])}; "
            f"nothing to train (summary.json unchanged)")


def run(config, workdir, data_dir=None, log=print) -> dict:
    """Pretrains as `config` says, in `workdir` (resuming from its newest checkpoint). Returns the summary."""
    t_start = time.perf_counter()
    workdir = paths.as_path(workdir)   # gs://... stays a URL (etils.epath), a local path is resolved
    paths.check_reachable(workdir, "--workdir")   # a missing bucket fails here, in seconds
    workdir.mkdir(parents=True, exist_ok=True)
    tcfg = config.train
    # No directory renames on gs:// or a gcsfuse mount: Orbax's commit files instead (checkpoint.py).
    dir_renames = checkpoint_lib.dir_renames_of(tcfg.get("checkpoint_atomicity", "auto"), workdir)
    is_main = jax.process_index() == 0
    log_every_process, log = log, (log if is_main else (lambda *a, **k: None))
    _check_shared_workdir(workdir)
    profile_window = chores_lib.parse_profile_steps(tcfg.get("profile_steps", ""))
    enable_compilation_cache(tcfg.get("compilation_cache_dir", ""))
    compile_time = chores_lib.CompileTime().start()
    _check_same_run(workdir, config)
    done = _finished_summary(workdir, tcfg)
    if done is not None:
        log(_already_finished(workdir, done))
        return done

    devices = jax.devices()
    if tcfg.devices:
        if tcfg.devices > len(devices):
            raise ConfigError(f"config.train.devices={tcfg.devices} but only {len(devices)} devices are visible")
        devices = devices[:tcfg.devices]
    mesh = train.data_mesh(devices)
    n_dev = len(devices)
    if config.objective.infonce_impl == "ring" and n_dev == 1:
        log("note: infonce_impl='ring' on one device is the chunked computation")

    names = molecular_names(config)
    corpus, data = build_inputs(config, n_dev, data_dir, log)
    dims = model_dims(config, data, names)
    _check_same_run(workdir, config, dims, n_dev)     # before model_dims.json is (re)written
    if is_main:
        _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
        _write_json(workdir / "corpus_manifest.json", corpus.manifest)
        _write_json(workdir / "model_dims.json", dims)

    plan = pretrain_data.BatchPlan(data, tcfg.seed)
    total = tcfg.steps if tcfg.steps > 0 else plan.total_steps(tcfg.epochs)
    schedule = train.lr_schedule(config.optim.lr, total, config.optim.schedule)
    tx = train.make_optimizer(**config.optim, total_steps=total)
    model = build_model(config, dims)
    start_digest = init_digest(model)   # this run's own initialisation: the untrained control must equal it
    if is_main:
        _write_json(workdir / "init_digest.json", {"init_digest": start_digest, "seed": int(tcfg.seed)})
    graphdef, state = train.init_state(model, tx)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = train.place(state, replicated)
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=tcfg.keep_checkpoints, log=log,
                                       dir_renames=dir_renames)
    # Epoch-end snapshots that the keep-N rotation never deletes (pretraining-length experiments
    # fine-tune them: `--config.pretrained_step`).
    snapshot_epochs = set(config_util.parse_list(tcfg.get("snapshot_epochs", ""), int, "config.train.snapshot_epochs"))
    snapshots = checkpoint_lib.Checkpointer(workdir / "snapshots", max_to_keep=None, log=log,
                                            dir_renames=dir_renames) if snapshot_epochs else None
    start, saved_totals = 0, None
    if ckpt.latest_step() is not None:
        # The newest checkpoint that passes the integrity checks (digests, finite values); corrupt newer
        # ones are moved aside with a warning, so the rotation cannot delete a good one for them. When none
        # is good, or on an I/O error or a state that does not fit, it raises and moves nothing.
        restored, meta = ckpt.restore_newest_good(state, log)
        state = restored
        start, saved_totals = int(meta["step"]), meta.get("totals")
        if start >= total and (workdir / "summary.json").exists():
            # Nothing to train: no step would run, so no rate to report and no wall time to add.
            ckpt.close()
            if snapshots is not None:
                snapshots.close()
            done = json.loads((workdir / "summary.json").read_text())
            log(_already_finished(workdir, done))
            return done
        log(f"resumed from {ckpt.directory}/{start} (step {start} of {total})")
    elif quarantined := sorted(p.name for p in (workdir / "corrupt").glob("*") if p.is_dir()):
        # Starting from step 0 would overwrite metrics.jsonl of a run whose checkpoints were only moved aside.
        raise checkpoint_lib.CorruptCheckpoint(
            f"{ckpt.directory} holds no checkpoint but {workdir / 'corrupt'} holds quarantined ones {quarantined[:5]}; "
            "not starting again from step 0 over this run: move a step you trust back into checkpoints/, "
            "or use a new --workdir")
    ctx = objective_lib.context_arrays(data.context)
    step_fn = train.make_train_step(graphdef, tx, objective_config(config), ctx, mesh, schedule=schedule)
    ctx_device = train.context_on_devices(ctx, mesh)
    base_key = train.step_base_key(tcfg.seed)   # a stream apart from the parameters' and dropout's
    every_collapse = collapse_every(config)
    meta_common = {"total_steps": total, "devices": n_dev, "corpus": corpus.manifest.get("name", ""),
                   "budget": data.budget.__dict__}
    # Utilisation (issue 14 §2, issue 21 §2): the dense matmul rate in the model's dtype of a device this
    # process owns (devices[0] is process 0's: another host's device cannot be timed from here), measured
    # now (~0.1 s on CPU), against one device's share of the step's FLOPs, counted when the first batch is
    # lowered below. Every process says which device it timed.
    rate_device = utilisation.own_device(devices)
    matmul_rate = utilisation.matmul_rate(config.model.dtype, device=rate_device)
    log_every_process(f"matmul rate: {matmul_rate / 1e9:.1f} GFLOP/s ({config.model.dtype}) on device "
                      f"{rate_device.id} of process {rate_device.process_index} (this is process {jax.process_index()})")
    chores = chores_lib.Chores(workdir, total, start, saved_totals, is_main=is_main, progress=tcfg.progress,
                               t_start=t_start, matmul_rate=matmul_rate)

    def save(step, store=None, force=False):
        epoch, _ = plan.locate(max(step - 1, 0))
        meta = {"step": step, "epoch": epoch, **meta_common, "totals": chores.totals()}
        if store is snapshots:
            meta["epochs_done"] = epoch + 1
        chores.sync()   # the metrics up to this step are in the workdir with it (gs:// uploads in batches)
        (store or ckpt).save(step, state, meta, force=force)

    profiler = chores_lib.Profiler(profile_window, workdir / "profile", enabled=is_main, log=log_every_process)
    last, stop_reason, step = {}, None, start
    with _StopFlag(start, log) as stop:
        try:
            for step, epoch, n_mol, batch in pretrain_data.global_batches(data, plan, start, total, mesh):
                if step == start:   # tracing only (no compilation)
                    chores.step_flops = step_flops(config, dims, tx, ctx, mesh, step_fn, state, batch, base_key, ctx_device)
                profiler.before_step(step + 1)
                state, metrics = step_fn(state, batch, base_key, ctx_device)   # key: fold_in(base_key, state.step)
                step += 1
                stopping = stop.reached(step)   # (every process calls it at every step)
                profiler.after_step(step, state.step, last=stopping or step == total)
                logged = None
                if chores_lib.itstime(step, tcfg.log_every_steps, total):
                    # Diagnostics not computed on this step (objective.collapse_every; NaN placeholders) are
                    # left out; a NaN computed on a diagnostic step (a non-finite projection) is kept.
                    skipped_diag = step % every_collapse != 0
                    last = {k: v for k, v in train.host_values(metrics).items()
                            if not (skipped_diag and k.startswith("collapse/"))}
                    logged = {**last, "epoch": epoch}   # 'lr': the rate the update used (skips hold it back)
                chores.step_done(step, n_mol, ready=state.step, metrics=logged)
                if logged is not None:
                    if int(last["skipped"]) >= tcfg.max_skipped:
                        save(step, force=True)
                        raise TrainingDiverged(
                            f"{int(last['skipped'])} updates skipped for non-finite loss or gradients (limit "
                            f"config.train.max_skipped={tcfg.max_skipped}); metrics in {workdir / 'metrics.jsonl'}. "
                            "Lower config.optim.lr or check the inputs for NaN/inf")
                if chores_lib.itstime(step, tcfg.checkpoint_every_steps) and step < total:
                    save(step)
                if snapshots is not None and (epoch + 1) in snapshot_epochs and \
                        (step == total or plan.locate(step)[0] != epoch):
                    save(step, snapshots, force=True)
                if stopping:
                    stop_reason = stop.reason
                    break
            # Finished or stopped by a signal: the final checkpoint. (After an exception the
            # periodic checkpoints stand; the state may be mid-update.)
            if step > start and (ckpt.latest_step() or 0) < step:
                save(step, force=True)
        finally:
            profiler.stop()
            chores.close()
            ckpt.close()
            if snapshots is not None:
                snapshots.close()
    if step > start and not (ckpt.directory / str(step)).is_dir():
        # The final save did not verify when read back (moved to corrupt/ by close()): the run is not
        # finished, and a summary naming that checkpoint would send fine-tuning to an older step.
        kept = ckpt.all_steps()
        raise checkpoint_lib.CorruptCheckpoint(
            f"the final checkpoint of step {step} failed its read-back check and was moved to "
            f"{workdir / 'corrupt'}; the newest good checkpoint is step {max(kept) if kept else 'none'}: run the "
            "same command again to redo the steps after it")

    summary = {
        "steps": step, "total_steps": total, "resumed_from": start, "stopped_by": stop_reason,
        "devices": n_dev, "platform": devices[0].platform, **chores.summary(),
        "init_digest": start_digest,
        # The leakage guard (config.corpus.exclude): molecules left out and their profile rows lost.
        "corpus_excluded": int(corpus.manifest.get("counts", {}).get("excluded_leakage", 0)),
        "corpus_excluded_profile_rows": corpus.manifest.get("counts", {}).get("excluded_profile_rows", {}),
        **peak_memory(), **compile_time.read(),
        "final_metrics": {k: float(np.asarray(v).mean()) for k, v in last.items()},
        "checkpoint": str(ckpt.directory / str(step)), "workdir": str(workdir)}
    if is_main:
        _write_json(workdir / "summary.json", summary)
    mem = summary.get("device_peak_bytes", summary["host_peak_rss_bytes"])
    rate = summary["molecules_per_s"]
    util = summary["utilisation"]
    log(f"done: step {step}/{total}, {summary['wall_s']:.1f}s wall over the whole run; "
        f"{rate if rate is not None else 'n/a'} molecules/s after compilation"
        + (f" ({summary['achieved_gflop_per_s']} GFLOP/s, {util:.1%} of this device's matmul rate)" if util is not None else "")
        + f"; peak memory {mem / 2**30:.2f} GiB "
        f"({'device' if 'device_peak_bytes' in summary else 'host RSS'})"
        + (f"; stopped by {stop_reason}" if stop_reason else ""))
    log(f"checkpoints: {ckpt.directory}  metrics: {workdir / 'metrics.jsonl'}  tensorboard: {workdir / 'tensorboard'}")
    return summary
