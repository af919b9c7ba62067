"""Downstream property prediction on a frozen pretrained encoder (spec §8).

  embed(model, features)          the frozen encoder's outputs per molecule, in batches (eval mode:
                                  no dropout, batch norm from running statistics), so the head trains
                                  on fixed arrays: exactly the frozen-encoder computation, at the cost
                                  of one encoder pass per molecule instead of one per epoch
  head_inputs(emb, parts)         [raw fingerprint, p_fingerprint, p_graph, (p_geometry)] concatenated
  Head                            Linear(in, hidden) -> LayerNorm|BatchNorm -> GELU -> Dropout -> Linear(tasks)
  fit(x, y, split, task_type, cfg)  Adam at a constant lr, BCE on labelled entries (classification) or L1
                                  (regression); after every epoch the validation metric decides the best
                                  epoch; stops after `patience` epochs without improvement; returns the
                                  best epoch's state (parameters and batch-norm statistics) and its scores
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chmr_jax import graphs, metrics as metrics_lib, progress as progress_lib


def embed(model, features, extra_inputs: dict | None = None, batch_size: int = 256,
          pad_multiple: int = 64, show_progress: bool = True) -> dict:
    """{'fingerprint_raw': [n, d_fp], each molecular projection [n, D], 'anchor': [n, D]} (float32).

    extra_inputs: {molecular modality: [n, d]} for inputs other than the fingerprint (e.g. geometry).
    """
    model.eval()
    n = len(features)
    budget = graphs.estimate_budget(features.n_atoms, features.n_edges, batch_size, pad_multiple)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, graph, inputs):
        return nnx.merge(graphdef, state).encode(graph, inputs)

    fp = features.fingerprints()
    inputs_all = {"fingerprint": fp, **(extra_inputs or {})}
    out: dict = {"fingerprint_raw": fp}
    with progress_lib.Progress(n, "embed", unit="mol", enabled=show_progress) as bar:
        for group in graphs.partition(features, np.arange(n), budget):
            graph = graphs.pack(features, group, budget)
            inputs = {}
            for name in model.mol_names:
                if name == "graph":
                    continue
                x = np.zeros((budget.n_graph, inputs_all[name].shape[1]), np.float32)
                x[:len(group)] = inputs_all[name][group]
                inputs[name] = x
            res = jax.device_get(encode(state, graph, inputs))
            for key in list(model.mol_names) + ["anchor"]:
                if key not in out:
                    out[key] = np.zeros((n, res[key].shape[1]), np.float32)
                out[key][group] = res[key][:len(group)]
            bar.update(len(group))
    return out


DEFAULT_PARTS = ("fingerprint_raw", "fingerprint", "graph", "geometry")


def head_inputs(emb: dict, parts=DEFAULT_PARTS) -> np.ndarray:
    """The spec's head input: the available parts, concatenated in order."""
    return np.concatenate([emb[p] for p in parts if p in emb], axis=1).astype(np.float32)


class Head(nnx.Module):
    def __init__(self, d_in: int, tasks: int, hidden: int = 600, norm: str = "layer", dropout: float = 0.5,
                 *, rngs: nnx.Rngs):
        if norm not in ("layer", "batch"):
            raise ValueError(f"head norm must be 'layer' or 'batch', got {norm!r}")
        self.lin1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs) if norm == "layer" else nnx.BatchNorm(hidden, momentum=0.9,
                                                                                          rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.lin2 = nnx.Linear(hidden, tasks, rngs=rngs)

    def __call__(self, x):
        return self.lin2(self.dropout(jax.nn.gelu(self.norm(self.lin1(x)), approximate=False)))


@dataclasses.dataclass(frozen=True)
class FitConfig:
    hidden: int = 600
    norm: str = "layer"
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 100
    patience: int = 20
    seed: int = 0


def masked_loss(pred, y, task_type: str):
    """Mean BCE-with-logits (classification) or L1 (regression) over labelled entries (y not NaN)."""
    mask = ~jnp.isnan(y)
    y0 = jnp.where(mask, y, 0.0)
    if task_type == "classification":
        per = optax.sigmoid_binary_cross_entropy(pred, y0)
    else:
        per = jnp.abs(pred - y0)
    return jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def score(y, pred, task_type: str) -> dict:
    """Classification: ROC-AUC (mean over valid tasks), their count, PR-AUC; regression: MAE, RMSE."""
    if task_type == "classification":
        auc = metrics_lib.mean_roc_auc(y, pred)
        return {"roc_auc": auc["roc_auc"], "tasks_evaluated": auc["tasks_evaluated"],
                "pr_auc": metrics_lib.mean_average_precision(y, pred)}
    reg = metrics_lib.regression(y, pred)
    return {"mae": reg["mae"], "rmse": reg["rmse"]}


def _better(task_type: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if task_type == "classification":
        return np.nan_to_num(new["roc_auc"], nan=-1) > np.nan_to_num(best["roc_auc"], nan=-1)
    return new["mae"] < best["mae"]


def fit(x: np.ndarray, y: np.ndarray, split: dict, task_type: str, cfg: FitConfig = FitConfig(),
        log=None) -> dict:
    """Trains a Head on rows split['train'], selects the epoch by split['valid'], scores split['test'].

    Returns {'head': the best epoch's Head (eval mode), 'best_epoch', 'valid', 'test', 'history'}.
    Predictions for scoring are probabilities (classification) or values (regression).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    head = Head(x.shape[1], y.shape[1], cfg.hidden, cfg.norm, cfg.dropout, rngs=nnx.Rngs(cfg.seed))
    tx = optax.adam(cfg.lr)
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, rest, opt_state, xb, yb):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            model.train()
            loss = masked_loss(model(xb), yb, task_type)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    @jax.jit
    def predict(params, rest, xb):
        model = nnx.merge(graphdef, params, rest, copy=True)
        model.eval()
        out = model(xb)
        return jax.nn.sigmoid(out) if task_type == "classification" else out

    train_idx = np.asarray(split["train"])
    rng = np.random.default_rng(cfg.seed)
    bs = min(cfg.batch_size, len(train_idx))
    best, best_state, best_epoch, history, waited = None, None, -1, [], 0
    for epoch in range(cfg.epochs):
        order = rng.permutation(train_idx)
        # Full batches only (fixed shapes: one compilation); the remainder rotates with the permutation.
        for i in range(0, len(order) - bs + 1, bs):
            b = order[i:i + bs]
            params, rest, opt_state, loss = train_step(params, rest, opt_state, x[b], y[b])
        valid = score(y[split["valid"]], np.asarray(predict(params, rest, x[split["valid"]])), task_type)
        history.append({"epoch": epoch, "train_loss": float(loss), **{f"valid_{k}": v for k, v in valid.items()}})
        if _better(task_type, valid, best):
            best, best_epoch, waited = valid, epoch, 0
            best_state = jax.device_get((params, rest))
        else:
            waited += 1
            if waited >= cfg.patience:
                break
        if log:
            log(history[-1])
    params, rest = best_state
    test = score(y[split["test"]], np.asarray(predict(params, rest, x[split["test"]])), task_type)
    head = nnx.merge(graphdef, params, rest)
    head.eval()
    return {"head": head, "best_epoch": best_epoch, "valid": best, "test": test, "history": history}


# ---- the job: one dataset, several seeds ---------------------------------------------------------------

def fit_config(config, seed: int) -> FitConfig:
    h = config.head
    return FitConfig(hidden=h.hidden, norm=h.norm, dropout=h.dropout, lr=config.optim.lr,
                     batch_size=config.optim.batch_size, epochs=config.optim.epochs,
                     patience=config.optim.patience, seed=seed)


def run(config, pretrained, workdir, data_dir=None, log=print) -> dict:
    """Fine-tunes heads on a frozen pretrained encoder for config.dataset over config.seeds.

    Writes <workdir>/results.json (per-seed valid/test scores, best epochs, mean +- std) and returns it.
    """
    import json
    from pathlib import Path

    from chmr_jax import datasets, featurize, paths, prepare, pretrain

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model, pre_config, meta = pretrain.load_pretrained(pretrained)
    settings = featurize.FeaturizerSettings.from_config(pre_config.featurize)   # one radius for both (spec §8)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    if config.csv:
        ds = datasets.load_csv(config.csv, config.smiles_column, None, config.task_type or None,
                               cache_dir=cache_dir)
    else:
        if config.dataset not in datasets.BENCHMARKS:
            raise ValueError(f"config.dataset={config.dataset!r}: choose one of {list(datasets.ALL_BENCHMARKS)} "
                             "or set config.csv")
        ds = datasets.load_benchmark(config.dataset, data_dir, cache_dir)
    prepared = prepare.prepare(ds, settings, cache_dir, config.split or None)
    log(f"{ds.name}: {len(prepared.features)} molecules, {ds.num_tasks} tasks ({ds.task_type}); encoder "
        f"{pretrained} step {meta['step']}")
    emb = embed(model, prepared.features)
    x = head_inputs(emb, tuple(p.strip() for p in config.head.parts.split(",")))
    y = ds.labels[prepared.features.rows]
    split = {part: prepared.split_indices(part) for part in ("train", "valid", "test")}
    runs = []
    for seed in [int(s) for s in str(config.seeds).split(",")]:
        out = fit(x, y, split, ds.task_type, fit_config(config, seed))
        runs.append({"seed": seed, "best_epoch": out["best_epoch"], "epochs_run": len(out["history"]),
                     "valid": out["valid"], "test": out["test"]})
        log(f"  seed {seed}: best epoch {out['best_epoch']}, valid {out['valid']}, test {out['test']}")
    key = "roc_auc" if ds.task_type == "classification" else "mae"
    scores = np.array([r["test"][key] for r in runs], np.float64)
    result = {"dataset": ds.name, "metric": key, "pretrained": str(pretrained), "pretrained_step": meta["step"],
              "molecules": len(prepared.features), "tasks": ds.num_tasks, "runs": runs,
              "test_mean": float(scores.mean()), "test_std": float(scores.std())}
    (workdir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    log(f"{ds.name} test {key}: {scores.mean():.4f} +- {scores.std():.4f} over {len(runs)} seed(s) "
        f"-> {workdir / 'results.json'}")
    return result


# Paper Table 1 (spec §9): test mean, std over 5 seeds, x100 (ROC-AUC; MAE for biogenadme).
PAPER_TABLE = {
    "chembl2k": {"CHMR": (84.7, 0.2), "InfoAlign": (81.3, 0.6), "MLP": (76.8, 2.2), "RF": (54.7, 0.7)},
    "moltoxcast": {"CHMR": (69.3, 0.3), "InfoAlign": (66.4, 1.1), "MLP": (57.6, 1.0), "RF": (52.3, 0.1)},
    "broad6k": {"CHMR": (71.4, 0.2), "InfoAlign": (70.0, 0.1), "MLP": (63.3, 0.3), "RF": (55.5, 0.1)},
    "biogenadme": {"CHMR": (40.9, 0.3), "InfoAlign": (49.4, 0.2), "MLP": (66.2, 2.4), "RF": (52.8, 0.2)},
}


def benchmark_table(results: list[dict]) -> str:
    """Markdown: dataset, metric, chmr_jax mean +- std (x100), seeds, and the paper's numbers."""
    lines = ["| dataset | metric | chmr_jax (x100) | seeds | paper CHMR | paper InfoAlign | paper MLP | paper RF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        paper = PAPER_TABLE.get(r["dataset"], {})
        cell = lambda k: f"{paper[k][0]} +- {paper[k][1]}" if k in paper else "-"
        lines.append(f"| {r['dataset']} | {r['metric']} | {100 * r['test_mean']:.1f} +- {100 * r['test_std']:.1f} | "
                     f"{len(r['runs'])} | {cell('CHMR')} | {cell('InfoAlign')} | {cell('MLP')} | {cell('RF')} |")
    return "\n".join(lines)


def run_benchmark(config, pretrained, workdir, names, data_dir=None, log=print) -> list[dict]:
    """finetune.run for each dataset in `names` (workdir/<dataset>/), then results.md / results.json."""
    import json
    from pathlib import Path

    workdir = Path(workdir)
    results = []
    for name in names:
        cfg = config.copy_and_resolve_references()
        cfg.dataset = name
        results.append(run(cfg, pretrained, workdir / name, data_dir, log))
    table = benchmark_table(results)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    log("\n" + table + f"\n\nwritten to {workdir / 'results.md'} and results.json")
    return results
