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

`run` conducts the steps defined above it; the workdir guards and the SIGTERM/SIGINT flag are in
workdir.py, the loop, the final checkpoint's check and summary.json in pretrain_loop.py.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from chmr_jax import config_util
from chmr_jax.config_util import ConfigError   # (here too: callers catch pretrain.ConfigError)
from chmr_jax.data import corpus as corpus_lib, featurize, geometry as geometry_lib, paths, prepare, records
from chmr_jax.mechanisms import model as model_lib, objective as objective_lib
from chmr_jax.training import checkpoint as checkpoint_lib, chores as chores_lib, pretrain_data, pretrain_loop, train, \
    utilisation, workdir as workdir_lib
# (TrainingDiverged here too: callers of run catch pretrain.TrainingDiverged)
from chmr_jax.training.pretrain_loop import Run, Stores, TrainingDiverged

MOLECULAR = ("fingerprint", "graph", "geometry")


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


# ---- the process: the compilation cache ------------------------------------------------------------

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


# ---- the run: its steps, then `run`, which conducts them -------------------------------------------

def _open_workdir(workdir, tcfg) -> tuple[Path, bool]:
    """(the workdir, reachable and made; whether its checkpoints commit by directory renames)."""
    workdir = paths.as_path(workdir)   # gs://... stays a URL (etils.epath), a local path is resolved
    paths.check_reachable(workdir, "--workdir")   # a missing bucket fails here, in seconds
    workdir.mkdir(parents=True, exist_ok=True)
    # No directory renames on gs:// or a gcsfuse mount: Orbax's commit files instead (checkpoint.py).
    return workdir, checkpoint_lib.dir_renames_of(tcfg.get("checkpoint_atomicity", "auto"), workdir)


def _devices(config) -> list:
    """The devices the run trains on: the first config.train.devices visible ones (0: all)."""
    devices = jax.devices()
    if config.train.devices:
        if config.train.devices > len(devices):
            raise ConfigError(f"config.train.devices={config.train.devices} but only {len(devices)} devices are "
                              "visible")
        devices = devices[:config.train.devices]
    return devices


def _inputs_and_run_files(r: Run, data_dir) -> tuple[corpus_lib.Corpus, pretrain_data.PretrainData, dict]:
    """(corpus, data, model dims) of the run, the dims checked against the workdir's checkpoints, then
    config.json, corpus_manifest.json and model_dims.json written."""
    names = molecular_names(r.config)
    corpus, data = build_inputs(r.config, len(r.devices), data_dir, r.log)
    dims = model_dims(r.config, data, names)
    workdir_lib.check_same_run(r.workdir, r.config, dims, len(r.devices))     # before model_dims.json is (re)written
    if r.is_main:
        workdir_lib.write_json(r.workdir / "config.json", json.loads(r.config.to_json_best_effort()))
        workdir_lib.write_json(r.workdir / "corpus_manifest.json", corpus.manifest)
        workdir_lib.write_json(r.workdir / "model_dims.json", dims)
    return corpus, data, dims


def _initial_state(r: Run, dims: dict, tx) -> tuple[nnx.GraphDef, train.TrainState, str]:
    """(graphdef, train state replicated over the mesh, init_digest of the model), the digest written to
    init_digest.json."""
    model = build_model(r.config, dims)
    start_digest = init_digest(model)   # this run's own initialisation: the untrained control must equal it
    if r.is_main:
        workdir_lib.write_json(r.workdir / "init_digest.json",
                               {"init_digest": start_digest, "seed": int(r.config.train.seed)})
    graphdef, state = train.init_state(model, tx)
    replicated = jax.sharding.NamedSharding(r.mesh, jax.sharding.PartitionSpec())
    return graphdef, train.place(state, replicated), start_digest


def _checkpoint_stores(r: Run, dir_renames: bool) -> Stores:
    """checkpoints/ (the newest config.train.keep_checkpoints) and, if asked for, snapshots/."""
    tcfg = r.config.train
    ckpt = checkpoint_lib.Checkpointer(r.workdir / "checkpoints", max_to_keep=tcfg.keep_checkpoints, log=r.log,
                                       dir_renames=dir_renames)
    # Epoch-end snapshots that the keep-N rotation never deletes (pretraining-length experiments
    # fine-tune them: `--config.pretrained_step`).
    snapshot_epochs = set(config_util.parse_list(tcfg.get("snapshot_epochs", ""), int, "config.train.snapshot_epochs"))
    snapshots = checkpoint_lib.Checkpointer(r.workdir / "snapshots", max_to_keep=None, log=r.log,
                                            dir_renames=dir_renames) if snapshot_epochs else None
    return Stores(ckpt, snapshots, snapshot_epochs)


def _restore_or_start(r: Run, stores: Stores, state, total: int):
    """(state, first step, the running totals saved with it, None): the newest good checkpoint's, or
    (state, 0, None, None) for a fresh start. The fourth is the saved summary when the checkpoint is
    already the last step and the run summarised (the stores then closed: nothing to train). With no
    checkpoint but quarantined ones in corrupt/, raises CorruptCheckpoint rather than start over at 0."""
    workdir, ckpt = r.workdir, stores.ckpt
    if ckpt.latest_step() is not None:
        # The newest checkpoint that passes the integrity checks (digests, finite values); corrupt newer
        # ones are moved aside with a warning, so the rotation cannot delete a good one for them. When none
        # is good, or on an I/O error or a state that does not fit, it raises and moves nothing.
        state, meta = ckpt.restore_newest_good(state, r.log)
        start, saved_totals = int(meta["step"]), meta.get("totals")
        if start >= total and (workdir / "summary.json").exists():
            # Nothing to train: no step would run, so no rate to report and no wall time to add.
            stores.close()
            done = json.loads((workdir / "summary.json").read_text())
            r.log(workdir_lib.already_finished(workdir, done))
            return state, start, saved_totals, done
        r.log(f"resumed from {ckpt.directory}/{start} (step {start} of {total})")
        return state, start, saved_totals, None
    if quarantined := sorted(p.name for p in (workdir / "corrupt").glob("*") if p.is_dir()):
        # Starting from step 0 would overwrite metrics.jsonl of a run whose checkpoints were only moved aside.
        raise checkpoint_lib.CorruptCheckpoint(
            f"{ckpt.directory} holds no checkpoint but {workdir / 'corrupt'} holds quarantined ones {quarantined[:5]}; "
            "not starting again from step 0 over this run: move a step you trust back into checkpoints/, "
            "or use a new --workdir")
    return state, 0, None, None


def _matmul_rate(r: Run) -> float:
    """Utilisation (issue 14 §2, issue 21 §2): the dense matmul rate (FLOP/s) in the model's dtype of a
    device this process owns (devices[0] is process 0's: another host's device cannot be timed from
    here), measured now (~0.1 s on CPU), against one device's share of the step's FLOPs, counted when the
    first batch is lowered (pretrain_loop.run_steps). Every process says which device it timed."""
    dtype = r.config.model.dtype
    rate_device = utilisation.own_device(r.devices)
    matmul_rate = utilisation.matmul_rate(dtype, device=rate_device)
    r.log_every_process(f"matmul rate: {matmul_rate / 1e9:.1f} GFLOP/s ({dtype}) on device {rate_device.id} of "
                        f"process {rate_device.process_index} (this is process {jax.process_index()})")
    return matmul_rate


def run(config, workdir, data_dir=None, log=print) -> dict:
    """Pretrains as `config` says, in `workdir` (resuming from its newest checkpoint). Returns the summary.

    Every process of a multi-process run runs every step (the checks and the loop are collective)."""
    t_start = time.perf_counter()
    tcfg = config.train
    workdir, dir_renames = _open_workdir(workdir, tcfg)
    is_main = jax.process_index() == 0
    log_every_process, log = log, (log if is_main else (lambda *a, **k: None))
    workdir_lib.check_shared_workdir(workdir)
    profile_window = chores_lib.parse_profile_steps(tcfg.get("profile_steps", ""))
    enable_compilation_cache(tcfg.get("compilation_cache_dir", ""))
    compile_time = chores_lib.CompileTime().start()
    workdir_lib.check_same_run(workdir, config)
    if (done := workdir_lib.finished_summary(workdir, tcfg)) is not None:
        log(workdir_lib.already_finished(workdir, done))
        return done

    devices = _devices(config)
    r = Run(config, workdir, devices, train.data_mesh(devices), is_main, log, log_every_process)
    if config.objective.infonce_impl == "ring" and len(devices) == 1:
        log("note: infonce_impl='ring' on one device is the chunked computation")
    corpus, data, dims = _inputs_and_run_files(r, data_dir)

    plan = pretrain_data.BatchPlan(data, tcfg.seed)
    total = tcfg.steps if tcfg.steps > 0 else plan.total_steps(tcfg.epochs)
    schedule = train.lr_schedule(config.optim.lr, total, config.optim.schedule)
    tx = train.make_optimizer(**config.optim, total_steps=total)
    graphdef, state, start_digest = _initial_state(r, dims, tx)
    stores = _checkpoint_stores(r, dir_renames)
    state, start, saved_totals, done = _restore_or_start(r, stores, state, total)
    if done is not None:
        return done

    ctx = objective_lib.context_arrays(data.context)
    step_fn = train.make_train_step(graphdef, tx, objective_config(config), ctx, r.mesh, schedule=schedule)
    ctx_device = train.context_on_devices(ctx, r.mesh)
    chores = chores_lib.Chores(workdir, total, start, saved_totals, is_main=is_main, progress=tcfg.progress,
                               t_start=t_start, matmul_rate=_matmul_rate(r))
    profiler = chores_lib.Profiler(profile_window, workdir / "profile", enabled=is_main, log=log_every_process)
    meta_common = {"total_steps": total, "devices": len(devices), "corpus": corpus.manifest.get("name", ""),
                   "budget": data.budget.__dict__}
    flops_of = functools.partial(step_flops, config, dims, tx, ctx, r.mesh, step_fn)   # (state, batch, key, ctx)
    step, last, stop_reason = pretrain_loop.run_steps(r, data, plan, step_fn, ctx_device, state, start, total, stores,
                                                      chores, profiler, meta_common, collapse_every(config), flops_of)
    pretrain_loop.check_final_checkpoint(r, stores.ckpt, start, step)
    return pretrain_loop.summarise(r, corpus.manifest, stores.ckpt, chores, compile_time, start_digest, start, step,
                                   total, last, stop_reason)
