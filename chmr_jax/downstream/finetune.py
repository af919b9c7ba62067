"""The fine-tuning job (spec §8): one dataset (a benchmark or a CSV), several seeds, the pretrained
encoder beside its untrained control and the in-house baselines on the same splits.

  load_task(config, ...)          the dataset featurized with the pretraining run's featurizer settings
  run(config, pretrained, workdir)  every method x seed -> workdir/results.json (test mean +- std per
                                  method, the paired lift over the untrained encoder)
  run_or_reuse(...)               `run` unless a results.json of the same settings exists; with other
                                  baselines only, the finished (method, seed) runs are kept
  paired_lift(methods, metric)    pretrained minus untrained per seed (positive = pretrained better)

The parts: embeddings (frozen-encoder features), head (the head and its fit), encoder_fit (full
fine-tuning, GNN from scratch), baselines (RF, ensemble); the multi-dataset table is benchmark.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
from flax import nnx

from chmr_jax import config_util
from chmr_jax.data import paths
from chmr_jax.downstream import baselines as baselines_lib, embeddings, encoder_fit, head as head_lib


def fit_config(config, seed: int) -> head_lib.FitConfig:
    h = config.head
    return head_lib.FitConfig(hidden=h.hidden, norm=h.norm, dropout=h.dropout, lr=config.optim.lr,
                     batch_size=config.optim.batch_size, epochs=config.optim.epochs,
                     patience=config.optim.patience, seed=seed)


BASELINES = ("mlp", "rf", "gnn")


# Bump when what a results.json holds changes for the same settings (2: sample std, ddof=1; settings
# keyed on the checkpoint's content; 3: keyed on the data file's content and the featurizer / splitter /
# key versions too), so an earlier file is recomputed rather than reused.
RESULTS_VERSION = 3


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_identity(pretrained, step: int | None = None) -> dict:
    """{'step', 'digest'}: the checkpoint `pretrain.load_pretrained(pretrained, step)` restores and a
    sha256 of its content (the per-array sha256 digests saved with its parameters and batch
    statistics; for checkpoints of the earlier format without digests, of its files' bytes). None
    for both when the workdir has no such checkpoint (load_pretrained then says why)."""
    import orbax.checkpoint as ocp

    from chmr_jax.training import checkpoint as checkpoint_lib, pretrain

    directory = pretrain.checkpoint_directory(pretrained, step)   # the one load_pretrained reads
    if not directory.is_dir():
        return {"step": step, "digest": None}
    ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            return {"step": step, "digest": None}
        meta = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        ckpt.close()
    saved = meta.get("digests")
    if saved:   # what load_pretrained restores: the parameters and the rest (batch statistics); not the optimiser
        content = sorted((k, v) for k, v in saved.items() if k.split("/")[0] in ("params", "rest"))
    else:
        where = directory / str(step)
        content = [(str(f.relative_to(where)), hashlib.sha256(f.read_bytes()).hexdigest())
                   for f in sorted(where.rglob("*")) if f.is_file()]
    return {"step": step, "digest": _sha256(content)}


def data_identity(config, data_dir=None) -> dict:
    """What a result depends on in the data and the code that turns it into splits: the versions of the
    featurizer, the splitter and the molecule keys (each bumped when its output changes) and the sha256
    of the benchmark's data file (a refreshed file under the same name must not be served old results)."""
    from chmr_jax.data import datasets, featurize, registry, splits
    out = {"featurize_version": featurize.FEATURIZE_VERSION, "split_version": splits.SPLIT_VERSION,
           "keys_version": datasets.KEYS_VERSION, "data_sha256": None}
    if not config.get("csv") and config.get("dataset") in datasets.BENCHMARKS:
        try:
            path = registry.fetch(config.dataset, datasets.BENCHMARKS[config.dataset][0],
                                  paths.resolve_data_dir(data_dir or config.get("data_dir") or None),
                                  allow_download=False)
            out["data_sha256"] = registry.sha256_of(path)
        except (FileNotFoundError, OSError, ValueError):
            pass   # not present yet: the run itself fetches it or says where it is missing
    return out


def run_settings(config, pretrained, data_dir=None) -> dict:
    """What a results.json depends on: the fine-tuning config, the pretraining config, the content of
    the checkpoint fine-tuned (not its path and step alone: an ablation pretrained again into the same
    workdir with the same step count must not be served the earlier result) and data_identity."""
    ident = checkpoint_identity(pretrained, config.get("pretrained_step", 0) or None)
    pre_config = paths.as_path(pretrained) / "config.json"
    settings = {"version": RESULTS_VERSION, "config": json.loads(config.to_json()),
                "pretrained": str(paths.as_path(pretrained)), "pretrained_step": ident["step"],
                "checkpoint_digest": ident["digest"],
                "pretrain_config_digest": _sha256(json.loads(pre_config.read_text())) if pre_config.exists() else None,
                "data": data_identity(config, data_dir)}
    if config.get("csv"):   # the CSV is the dataset: config.dataset (a benchmark name, unused) is not recorded
        settings["config"]["dataset"] = None
    csv = paths.local_file(config.get("csv")) if config.get("csv") else None   # (gs://: its verified copy)
    if csv is not None and csv.is_file():
        # A user's CSV is edited in place under the same name: its content, not its path, keys the result.
        settings["csv_sha256"] = hashlib.sha256(csv.read_bytes()).hexdigest()
    return settings


def check_pretrained_step(pretrained, step: int | None, flag: str = "--config.pretrained_step") -> None:
    """A step (`flag`) the workdir does not hold is a one-line error listing the steps it does."""
    if not step:
        return
    workdir = paths.as_path(pretrained)
    steps = sorted({int(p.name) for sub in ("checkpoints", "snapshots") if (workdir / sub).is_dir()
                    for p in (workdir / sub).iterdir() if p.name.isdigit()})
    if steps and step not in steps:
        raise ValueError(f"{flag}={step}: {workdir} has no checkpoint of step {step}; its "
                         f"checkpoints are steps {', '.join(map(str, steps))} (leave the flag out for the newest)")


def format_std(std: float, n: int) -> str:
    """'+- 0.0123', or '(1 seed: no std)' where the sample std is undefined."""
    return f"+- {std:.4f}" if n > 1 and np.isfinite(std) else f"({n} seed{'s' * (n != 1)}: no std)"


def higher_is_better(metric: str) -> bool:
    return metric in ("roc_auc", "pr_auc")


def sample_std(values) -> float:
    """The sample standard deviation over seeds (ddof=1), the +- of the paper's tables (InfoAlign's
    main.py: pandas .std()); numpy's default (ddof=0) is 10.6% smaller at 5 seeds, 29% at 2. NaN
    for fewer than 2 values, where it is undefined."""
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1)) if values.size > 1 else float("nan")


def paired_lift(methods: dict, metric: str, method: str = "chmr", control: str = "untrained",
                part: str = "test") -> dict:
    """Pretrained minus untrained score on split `part` per seed (sign flipped for MAE, so positive =
    pretrained better), with the mean and the sample std of those paired differences, on the seeds both ran."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    ours = {r["seed"]: r[part][metric] for r in methods[method]["runs"]}
    base = {r["seed"]: r[part][metric] for r in methods[control]["runs"]}
    seeds = sorted(set(ours) & set(base))
    diffs = np.array([sign * (ours[s] - base[s]) for s in seeds], np.float64)
    return {"mean": float(diffs.mean()), "std": sample_std(diffs), "per_seed": dict(zip(map(str, seeds), diffs.tolist()))}


def _summarise(runs: list[dict], key: str) -> dict:
    scores = np.array([r["test"][key] for r in runs], np.float64)
    return {"runs": runs, "test_mean": float(scores.mean()), "test_std": sample_std(scores)}


class Runs:
    """The (method, seed) runs of one dataset in the order they finish: each either reused from an
    earlier results.json of the same settings (`reuse`) or recorded when computed."""

    def __init__(self, reuse: dict | None, log=print):
        self.done = {(m, r["seed"]): r for m, v in (reuse or {}).get("methods", {}).items() for r in v["runs"]}
        self.by_method: dict[str, list] = {}
        self.log = log

    def missing(self, method: str, seeds) -> bool:
        """Whether any of `seeds` still has to be computed for `method`."""
        return any((method, s) not in self.done for s in seeds)

    def reused(self, method: str, seed: int) -> bool:
        """Takes over the earlier run of (method, seed) if there is one."""
        if (method, seed) in self.done:
            self.by_method.setdefault(method, []).append(self.done[(method, seed)])
            return True
        return False

    def record(self, method: str, seed: int, out: dict) -> None:
        entry = {"seed": seed, "valid": out["valid"], "test": out["test"]}
        if "history" in out:
            entry.update(best_epoch=out["best_epoch"], epochs_run=len(out["history"]))
        self.by_method.setdefault(method, []).append(entry)
        self.log(f"  {method:9s} seed {seed}: test {format_scores(out['test'])}" +
                 (f"; best epoch {out['best_epoch']}" if "best_epoch" in out else ""))


def format_scores(scores: dict) -> str:
    """A score dict for a log line: 'roc_auc 0.6864, pr_auc 0.1866 over 3 tasks' (4 decimals)."""
    text = ", ".join(f"{k} {float(v):.4f}" for k, v in scores.items() if k != "tasks_evaluated")
    n = scores.get("tasks_evaluated")
    return text + (f" over {int(n)} task{'s' * (int(n) != 1)}" if n is not None else "")


def load_task(config, pre_config, mol_names, data_dir=None, log=print):
    """(dataset, prepared, extra encoder inputs) for config.dataset or config.csv, featurized with the
    pretraining run's featurizer settings (one Morgan radius for both, spec §8)."""
    from chmr_jax.data import datasets, featurize, geometry as geometry_lib, paths, prepare

    settings = featurize.FeaturizerSettings.from_config(pre_config.featurize)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    if config.csv:
        ds = datasets.load_csv(config.csv, config.smiles_column, config_util.parse_list(config.task_columns) or None,
                               config.task_type or None, cache_dir=cache_dir,
                               flags={"smiles_column": "--config.smiles_column=", "task_columns": "--config.task_columns="})
    else:
        if config.dataset not in datasets.BENCHMARKS:
            raise ValueError(f"config.dataset={config.dataset!r}: choose one of {list(datasets.ALL_BENCHMARKS)} "
                             "or set config.csv")
        ds = datasets.load_benchmark(config.dataset, paths.resolve_data_dir(data_dir or config.data_dir or None),
                                     cache_dir)
    uses_geometry = "geometry" in mol_names
    prepared = prepare.prepare(ds, settings, cache_dir, config.split or None,
                               geometry=pre_config.geometry if uses_geometry else "none",
                               geometry_settings=geometry_lib.GeometrySettings(seed=pre_config.geometry_seed))
    paths.push(cache_dir, "the feature cache")   # a gs:// cache (a local mirror): upload what was featurized
    extra = {}
    if uses_geometry:
        # z-scored with training-split statistics, as the encoder saw z-scored corpus descriptors
        extra["geometry"] = prepared.geometry.standardized(prepared.split_indices("train")).astype(np.float32)
    return ds, prepared, extra


def check_scorable(ds, y, split: dict) -> None:
    """A classification part whose every task has one class cannot be scored (ROC-AUC needs both): a
    one-line error naming the file and the part instead of a NaN score and exit 0. Benchmarks keep
    their protocol (a benchmark task without both classes in a part is skipped, as the paper does, and
    counted in `tasks_evaluated`); a user's CSV is checked. y: labels [n, tasks] (NaN = unlabelled)."""
    if ds.task_type != "classification" or not getattr(ds, "split_over_accepted", False):
        return
    for part in ("valid", "test"):
        labels = y[split[part]]
        columns = [c[np.isfinite(c)] > 0.5 for c in labels.T]
        if not any(c.any() and not c.all() for c in columns):
            classes = sorted({int(v > 0.5) for v in labels[np.isfinite(labels)]})
            raise ValueError(f"{ds.source}: no task has both classes in the {part} part ({len(split[part])} "
                             f"molecules, labels {classes} only), so ROC-AUC cannot score it; label more "
                             "molecules of the other class, or choose another split (--config.split)")


def run(config, pretrained, workdir, data_dir=None, log=print, reuse: dict | None = None) -> dict:
    """Fine-tunes on a pretrained encoder for config.dataset (or config.csv) over config.seeds.

    Methods: 'chmr' (a head on the frozen encoder, or with config.encoder='finetune' the whole encoder
    at optim.encoder_lr), 'chmr+rf' (config.ensemble, classification on its datasets), and the
    baselines in config.baselines on the same splits and seeds: 'mlp' (the same head on the raw
    fingerprint), 'rf' (sklearn forest on the raw fingerprint), 'gnn' (the encoder architecture from a
    random initialisation, trained end to end). Writes <workdir>/results.json and returns it.
    `reuse`: an earlier results.json of the same settings but other baselines; its (method, seed) runs
    are kept and only the missing ones computed (e.g. adding the GNN baseline to a finished benchmark).
    """
    import json
    from pathlib import Path

    from chmr_jax.training import pretrain

    import time
    t_start = time.perf_counter()
    workdir = paths.as_path(workdir)   # (gs:// too) created when results.json is written: a failed run leaves no empty folder
    if config.encoder not in ("frozen", "finetune"):
        raise ValueError(f"config.encoder={config.encoder!r}: choose 'frozen' or 'finetune'")
    baselines = config_util.parse_list(config.baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"config.baselines: unknown {unknown}; choose from {list(BASELINES)} (comma separated)")
    check_pretrained_step(pretrained, config.get("pretrained_step", 0) or None)
    model, pre_config, meta = pretrain.load_pretrained(pretrained, config.get("pretrained_step", 0) or None)
    # Checked before any featurizing; results.json records the parts actually used.
    parts = embeddings.head_parts(config_util.parse_list(config.head.parts), model.mol_names, model.cell_names)
    dims = json.loads((paths.as_path(pretrained) / "model_dims.json").read_text())
    control = control_digest = None
    if config.get("control", True):
        # The control every pretraining claim needs: the same architecture and config, initialised with
        # the pretraining run's seed, no pretraining step, used exactly like the pretrained encoder.
        control = pretrain.build_model(pre_config, dims)
        control.eval()
        control_digest, run_digest = pretrain.init_digest(control), pretrain.saved_init_digest(pretrained)
        if run_digest is None:
            log(f"warning: {pretrained} records no init_digest.json (a run from before it was recorded): the "
                "untrained control cannot be checked against the run's own initial parameters")
        elif control_digest != run_digest:
            raise ValueError(
                f"the untrained control is not {pretrained}'s own initialisation (parameter digest "
                f"{control_digest[:12]} vs the run's {run_digest[:12]}): the model or its initialisation code "
                "changed since pretraining; pretrain again with this code, or pass --config.control=False")
    ds, prepared, extra = load_task(config, pre_config, model.mol_names, data_dir, log)
    log(f"{ds.name}: {len(prepared.features)} molecules, {ds.num_tasks} tasks ({ds.task_type}); encoder "
        f"{pretrained} step {meta['step']} ({config.encoder}); baselines: {', '.join(baselines) or 'none'}")
    y = ds.labels[prepared.features.rows]
    split = {part: prepared.split_indices(part) for part in ("train", "valid", "test")}
    check_scorable(ds, y, split)
    fp = prepared.features.fingerprints()
    x = x_control = None

    def frozen_inputs(encoder):
        emb = embeddings.embed(encoder, prepared.features, extra)
        if "tree" in parts:
            emb["tree"] = embeddings.tree_onehot(encoder, emb["anchor"])
        wanted = [p for p in parts if p in encoder.cell_names]
        if wanted:
            emb.update(embeddings.cellular_projections(encoder, pre_config, prepared.features, wanted, data_dir, config, log))
        return embeddings.head_inputs(emb, parts)

    ens = config.ensemble
    use_ensemble = (ens.enabled and ds.task_type == "classification"
                    and (config.csv or ds.name in config_util.parse_list(ens.datasets)))
    seeds = config_util.parse_list(config.seeds, int, "config.seeds")
    # (The ensemble needs this run's head predictions, which a results.json does not keep: no reuse.)
    runs = Runs(None if use_ensemble else reuse, log)
    if config.encoder == "frozen":
        x = frozen_inputs(model) if runs.missing("chmr", seeds) else None
        if control is not None and runs.missing("untrained", seeds):
            x_control = frozen_inputs(control)
    elif "tree" in parts or any(p in model.cell_names for p in parts):
        raise ValueError("head parts 'tree' and cellular projections need the frozen encoder (config.encoder='frozen')")
    reused, record = runs.reused, runs.record

    o = config.optim
    for seed in seeds:
        cfg = fit_config(config, seed)
        enc_cfg = dataclasses.replace(cfg, epochs=o.encoder_epochs, patience=o.encoder_patience)
        if reused("chmr", seed):
            out = None
        elif config.encoder == "frozen":
            out = head_lib.fit(x, y, split, ds.task_type, cfg)
        else:
            out = encoder_fit.fit_encoder(nnx.clone(model), prepared.features, y, split, ds.task_type, enc_cfg,
                              encoder_lr=o.encoder_lr, parts=parts, extra_inputs=extra)
        if out is not None:
            record("chmr", seed, out)
        if control is not None and not reused("untrained", seed):
            if config.encoder == "frozen":
                record("untrained", seed, head_lib.fit(x_control, y, split, ds.task_type, cfg))
            else:
                record("untrained", seed, encoder_fit.fit_encoder(nnx.clone(control), prepared.features, y, split, ds.task_type,
                                                      enc_cfg, encoder_lr=o.encoder_lr, parts=parts,
                                                      extra_inputs=extra))
        rf = None
        if ("rf" in baselines and not reused("rf", seed)) or use_ensemble:
            rf = baselines_lib.random_forest(fp, y, split, ds.task_type, seed, config.rf.trees)
            if "rf" in baselines:
                record("rf", seed, rf)
        if use_ensemble:
            pred = baselines_lib.ensemble(out["test_pred"], rf["test_pred"], ens.gamma)
            record("chmr+rf", seed, {"valid": {}, "test": head_lib.score(y[split["test"]], pred, ds.task_type)})
        if "mlp" in baselines and not reused("mlp", seed):
            record("mlp", seed, head_lib.fit(fp, y, split, ds.task_type, cfg))
        if "gnn" in baselines and not reused("gnn", seed):
            scratch_config = pre_config.copy_and_resolve_references()
            scratch_config.train.seed = seed
            scratch = pretrain.build_model(scratch_config, dims)
            record("gnn", seed, encoder_fit.fit_encoder(scratch, prepared.features, y, split, ds.task_type, enc_cfg,
                                            encoder_lr=cfg.lr, parts=parts, extra_inputs=extra))
    key = "roc_auc" if ds.task_type == "classification" else "mae"
    methods = {m: _summarise(r, key) for m, r in runs.by_method.items()}
    lift = paired_lift(methods, key) if "untrained" in methods else None
    result = {"dataset": ds.name, "metric": key, "pretrained": str(pretrained), "pretrained_step": meta["step"],
              "pretrained_epochs": meta.get("epochs_done", meta.get("epoch", -1) + 1),
              "encoder": config.encoder, "molecules": len(prepared.features),
              "rejects": len(prepared.features.rejects), "tasks": ds.num_tasks,
              "head_input": {"parts": list(parts), "width": int(x.shape[1]) if x is not None
                             else (reuse or {}).get("head_input", {}).get("width")}, "settings": run_settings(config, pretrained, data_dir), "wall_s": round(time.perf_counter() - t_start, 1),
              "methods": methods, "lift": lift, **methods["chmr"],
              "control_init_digest": control_digest if control is not None else None}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    log_summary(result, log)
    log(f"-> {workdir / 'results.json'}")
    return result


def log_summary(result: dict, log=print) -> None:
    """The summary lines of a results.json: test mean +- std per method, and the lift."""
    name, key, lift = result["dataset"], result["metric"], result.get("lift")
    for m, r in result.get("methods", {"chmr": result}).items():
        n = len(r["runs"])
        log(f"{name} {m} test {key}: {r['test_mean']:.4f} {format_std(r['test_std'], n)}"
            + (f" over {n} seeds" if n > 1 else ""))
    if lift is not None:
        n = len(lift.get("per_seed", {}))
        log(f"{name} lift over the untrained encoder (positive = pretrained better): "
            f"{lift['mean']:+.4f} {format_std(lift['std'], n)} (paired over seeds)")


def run_or_reuse(config, pretrained, workdir, data_dir=None, log=print) -> dict:
    """`run`, unless workdir/results.json exists with the same settings (then that result); with the
    same settings but other baselines, `run` reuses its (method, seed) runs."""
    import json
    from pathlib import Path

    done = paths.as_path(workdir) / "results.json"
    reuse = None
    if done.exists():
        previous = json.loads(done.read_text())
        settings = run_settings(config, pretrained, data_dir)
        if previous.get("settings") == settings:
            log(f"{previous['dataset']}: finished with the same settings (config, encoder checkpoint): "
                f"reusing {done}, nothing recomputed (delete it to recompute)")
            log_summary(previous, log)
            return previous
        # Same settings except the baselines: keep the runs it has, compute only the missing ones.
        without = lambda st: {**st, "config": {**st["config"], "baselines": None}}
        if previous.get("settings") and without(previous["settings"]) == without(settings):
            log(f"{previous['dataset']}: reusing the runs in {done}; computing the missing baselines")
            reuse = previous
    return run(config, pretrained, workdir, data_dir, log, reuse=reuse)
