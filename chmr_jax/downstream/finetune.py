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

from chmr_jax.data import graphs
from chmr_jax.downstream import metrics as metrics_lib
from chmr_jax.mechanisms import model as model_lib
from chmr_jax.training import progress as progress_lib


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


def tree_onehot(model, anchor: np.ndarray) -> np.ndarray:
    """The anchor's Tree-VQ path as one-hot codes per level, concatenated: [n, 2 + 4 + ... + 2^H]."""
    from chmr_jax.mechanisms import tree_vq
    codes = np.asarray(jax.jit(tree_vq.tree_vq)(model.codebook[...], jnp.asarray(anchor)).codes)
    return np.concatenate([np.eye(2 ** h, dtype=np.float32)[codes[:, h - 1] - 2 ** h]
                           for h in range(1, codes.shape[1] + 1)], axis=1)


def cellular_projections(model, pre_config, features, names, data_dir, config, log=print) -> dict:
    """{cellular modality: [n, D]} projections of the pretraining corpus' main input (observed, else
    propagated/imputed as in pretraining) for molecules found in the corpus by 14-char InChIKey block;
    zeros for molecules outside it (counted in the log)."""
    from chmr_jax.data import paths
    from chmr_jax.training import pretrain, pretrain_data
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or pre_config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or pre_config.cache_dir or None)
    corpus = pretrain.load_corpus(pre_config, data_dir, cache_dir, pre_config.workers or None, log=lambda *a: None)
    data = pretrain_data.prepare(corpus, pretrain.data_config(pre_config, 1))
    index = {str(k)[:14]: i for i, k in enumerate(corpus.keys)}
    rows = np.array([index.get(str(k)[:14], -1) for k in features.keys])
    found = rows >= 0
    out = {}
    for name in names:
        proj = np.zeros((len(rows), model.codebook.shape[-1]), np.float32)
        if found.any():
            x = data.inputs[name][rows[found]]
            proj[found] = np.asarray(jax.jit(lambda v: model.projectors[name](v))(x))
        out[name] = proj
        log(f"  head input {name}: {int(found.sum())} of {len(rows)} molecules in the pretraining corpus "
            f"({int(data.reached[name][rows[found]].sum())} observed or propagated), zeros for the rest")
    return out


def head_inputs(emb: dict, parts=DEFAULT_PARTS) -> np.ndarray:
    """The spec's head input: the available parts, concatenated in order."""
    return np.concatenate([emb[p] for p in parts if p in emb], axis=1).astype(np.float32)


class Head(nnx.Module):
    def __init__(self, d_in: int, tasks: int, hidden: int = 600, norm: str = "layer", dropout: float = 0.5,
                 *, rngs: nnx.Rngs):
        if norm not in ("layer", "batch"):
            raise ValueError(f"head norm must be 'layer' or 'batch', got {norm!r}")
        self.lin1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs) if norm == "layer" else model_lib.batch_norm(hidden, rngs=rngs)
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
    test_pred = np.asarray(predict(params, rest, x[split["test"]]))
    test = score(y[split["test"]], test_pred, task_type)
    head = nnx.merge(graphdef, params, rest)
    head.eval()
    return {"head": head, "best_epoch": best_epoch, "valid": best, "test": test, "test_pred": test_pred,
            "history": history}


# ---- training the encoder too: full fine-tuning, and the GNN-from-scratch baseline -----------------------

class EncoderWithHead(nnx.Module):
    """encoder.encode -> the head's input parts (raw fingerprint passed through) -> Head."""

    def __init__(self, encoder, head: Head, parts):
        self.encoder = encoder
        self.head = head
        self.parts = tuple(p for p in parts if p == "fingerprint_raw" or p in encoder.mol_names)

    def __call__(self, graph, inputs, fp_raw):
        emb = dict(self.encoder.encode(graph, inputs), fingerprint_raw=fp_raw)
        return self.head(jnp.concatenate([emb[p] for p in self.parts], axis=1))


def _head_width(encoder, fp_width: int, parts) -> int:
    latent = encoder.codebook.shape[-1]
    return sum(fp_width if p == "fingerprint_raw" else latent for p in parts)


def fit_encoder(encoder, features, y: np.ndarray, split: dict, task_type: str, cfg: FitConfig = FitConfig(),
                encoder_lr: float = 1e-4, parts=DEFAULT_PARTS, extra_inputs: dict | None = None,
                pad_multiple: int = 64, log=None) -> dict:
    """Trains encoder + a new Head end to end (Adam: `encoder_lr` for the encoder, cfg.lr for the head).

    Same protocol as `fit` (masked loss, best validation epoch, patience); the encoder is used in train
    mode for updates (dropout, batch statistics) and eval mode for scoring. With a pretrained encoder this
    is full fine-tuning; with a freshly initialised one it is the GNN-from-scratch baseline.
    Returns {'model': EncoderWithHead at the best epoch (eval mode), 'best_epoch', 'valid', 'test',
    'test_pred', 'history'}.
    """
    y = np.asarray(y, np.float32)
    fp = features.fingerprints()
    inputs_all = {"fingerprint": fp, **(extra_inputs or {})}
    parts = tuple(p for p in parts if p == "fingerprint_raw" or p in encoder.mol_names)
    head = Head(_head_width(encoder, fp.shape[1], parts), y.shape[1], cfg.hidden, cfg.norm, cfg.dropout,
                rngs=nnx.Rngs(cfg.seed))
    net = EncoderWithHead(encoder, head, parts)
    is_head = lambda path, _: path[0] == "head"
    graphdef, head_params, enc_params, rest = nnx.split(net, nnx.All(nnx.Param, is_head), nnx.Param, ...)
    tx_enc, tx_head = optax.adam(encoder_lr), optax.adam(cfg.lr)
    opt_state = (tx_enc.init(enc_params), tx_head.init(head_params))
    budget = graphs.estimate_budget(features.n_atoms, features.n_edges, cfg.batch_size, pad_multiple)

    def batch(group):
        pad = lambda a, fill=0.0: np.concatenate(
            [a[group], np.full((budget.n_graph - len(group),) + a.shape[1:], fill, a.dtype)])
        inputs = {n: pad(inputs_all[n]) for n in encoder.mol_names if n != "graph"}
        return graphs.pack(features, group, budget), inputs, pad(fp), pad(y, np.nan)

    @jax.jit
    def train_step(enc_params, head_params, rest, opt_state, graph, inputs, fp_b, yb):
        def loss_fn(enc_params, head_params):
            model = nnx.merge(graphdef, head_params, enc_params, rest, copy=True)
            model.train()
            loss = masked_loss(model(graph, inputs, fp_b), yb, task_type)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), (g_enc, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            enc_params, head_params)
        u_enc, s_enc = tx_enc.update(g_enc, opt_state[0], enc_params)
        u_head, s_head = tx_head.update(g_head, opt_state[1], head_params)
        return (optax.apply_updates(enc_params, u_enc), optax.apply_updates(head_params, u_head), rest,
                (s_enc, s_head), loss)

    @jax.jit
    def predict_step(enc_params, head_params, rest, graph, inputs, fp_b):
        model = nnx.merge(graphdef, head_params, enc_params, rest, copy=True)
        model.eval()
        out = model(graph, inputs, fp_b)
        return jax.nn.sigmoid(out) if task_type == "classification" else out

    def predict(state, rows):
        out = np.zeros((len(rows), y.shape[1]), np.float32)
        pos = {r: i for i, r in enumerate(rows)}
        for group in graphs.partition(features, np.asarray(rows), budget):
            g, inputs, fp_b, _ = batch(group)
            res = np.asarray(predict_step(*state, g, inputs, fp_b))
            out[[pos[r] for r in group]] = res[:len(group)]
        return out

    rng = np.random.default_rng(cfg.seed)
    best, best_state, best_epoch, history, waited = None, None, -1, [], 0
    loss = np.nan
    for epoch in range(cfg.epochs):
        for group in graphs.partition(features, rng.permutation(np.asarray(split["train"])), budget):
            g, inputs, fp_b, yb = batch(group)
            enc_params, head_params, rest, opt_state, loss = train_step(
                enc_params, head_params, rest, opt_state, g, inputs, fp_b, yb)
        state = (enc_params, head_params, rest)
        valid = score(y[split["valid"]], predict(state, split["valid"]), task_type)
        history.append({"epoch": epoch, "train_loss": float(loss), **{f"valid_{k}": v for k, v in valid.items()}})
        if log:
            log(history[-1])
        if _better(task_type, valid, best):
            best, best_epoch, waited, best_state = valid, epoch, 0, jax.device_get(state)
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    test_pred = predict(best_state, split["test"])
    enc_params, head_params, rest = best_state
    model = nnx.merge(graphdef, head_params, enc_params, rest)
    model.eval()
    return {"model": model, "best_epoch": best_epoch, "valid": best,
            "test": score(y[split["test"]], test_pred, task_type), "test_pred": test_pred, "history": history}


# ---- baselines on the same splits and seeds -----------------------------------------------------------

def random_forest(x: np.ndarray, y: np.ndarray, split: dict, task_type: str, seed: int = 0,
                  trees: int = 100) -> dict:
    """sklearn random forest on x (raw fingerprints), one forest per task on its labelled training rows.

    Classification predicts P(class 1) (a constant for a task whose training labels have one class);
    max_features='sqrt' for both task types. Returns {'valid', 'test', 'test_pred'}.
    """
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    preds = {part: np.zeros((len(split[part]), y.shape[1]), np.float32) for part in ("valid", "test")}
    train = np.asarray(split["train"])
    for t in range(y.shape[1]):
        rows = train[~np.isnan(y[train, t])]
        labels = y[rows, t]
        if len(rows) == 0 or (task_type == "classification" and len(np.unique(labels)) < 2):
            const = float(labels.mean()) if len(rows) else 0.0
            for part in preds:
                preds[part][:, t] = const
            continue
        cls = RandomForestClassifier if task_type == "classification" else RandomForestRegressor
        forest = cls(n_estimators=trees, max_features="sqrt", n_jobs=-1, random_state=seed).fit(x[rows], labels)
        for part in preds:
            p = forest.predict_proba(x[split[part]])[:, 1] if task_type == "classification" \
                else forest.predict(x[split[part]])
            preds[part][:, t] = p
    return {"valid": score(y[split["valid"]], preds["valid"], task_type),
            "test": score(y[split["test"]], preds["test"], task_type), "test_pred": preds["test"]}


def ensemble(head_prob: np.ndarray, rf_prob: np.ndarray, gamma: float) -> np.ndarray:
    """The release's ensemble for BACE/ClinTox/SIDER/HIV: gamma * head probability + RF probability
    (not renormalised; rankings, hence ROC-AUC, are what it changes; gamma <= 0.1 lets the forest dominate)."""
    return gamma * head_prob + rf_prob


# ---- the job: one dataset, several seeds ---------------------------------------------------------------

def fit_config(config, seed: int) -> FitConfig:
    h = config.head
    return FitConfig(hidden=h.hidden, norm=h.norm, dropout=h.dropout, lr=config.optim.lr,
                     batch_size=config.optim.batch_size, epochs=config.optim.epochs,
                     patience=config.optim.patience, seed=seed)


BASELINES = ("mlp", "rf", "gnn")


def run_settings(config, pretrained) -> dict:
    """What a results.json depends on besides the code: the fine-tuning config and the checkpoint."""
    import json
    from pathlib import Path

    ckpts = Path(pretrained) / "checkpoints"
    steps = [int(d.name) for d in ckpts.iterdir() if d.name.isdigit()] if ckpts.is_dir() else []
    return {"config": json.loads(config.to_json()), "pretrained": str(Path(pretrained).resolve()),
            "pretrained_step": max(steps) if steps else None}


def _parse_list(value) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def higher_is_better(metric: str) -> bool:
    return metric in ("roc_auc", "pr_auc")


def paired_lift(methods: dict, metric: str, method: str = "chmr", control: str = "untrained",
                part: str = "test") -> dict:
    """Pretrained minus untrained score on split `part` per seed (sign flipped for MAE, so positive =
    pretrained better), with the mean and the std of those paired differences, on the seeds both ran."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    ours = {r["seed"]: r[part][metric] for r in methods[method]["runs"]}
    base = {r["seed"]: r[part][metric] for r in methods[control]["runs"]}
    seeds = sorted(set(ours) & set(base))
    diffs = np.array([sign * (ours[s] - base[s]) for s in seeds], np.float64)
    return {"mean": float(diffs.mean()), "std": float(diffs.std()), "per_seed": dict(zip(map(str, seeds), diffs.tolist()))}


def _summarise(runs: list[dict], key: str) -> dict:
    scores = np.array([r["test"][key] for r in runs], np.float64)
    return {"runs": runs, "test_mean": float(scores.mean()), "test_std": float(scores.std())}


def load_task(config, pre_config, mol_names, data_dir=None, log=print):
    """(dataset, prepared, extra encoder inputs) for config.dataset or config.csv, featurized with the
    pretraining run's featurizer settings (one Morgan radius for both, spec §8)."""
    from chmr_jax.data import datasets, featurize, paths, prepare

    settings = featurize.FeaturizerSettings.from_config(pre_config.featurize)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    if config.csv:
        ds = datasets.load_csv(config.csv, config.smiles_column, _parse_list(config.task_columns) or None,
                               config.task_type or None, cache_dir=cache_dir)
    else:
        if config.dataset not in datasets.BENCHMARKS:
            raise ValueError(f"config.dataset={config.dataset!r}: choose one of {list(datasets.ALL_BENCHMARKS)} "
                             "or set config.csv")
        ds = datasets.load_benchmark(config.dataset, paths.resolve_data_dir(data_dir or config.data_dir or None),
                                     cache_dir)
    uses_geometry = "geometry" in mol_names
    prepared = prepare.prepare(ds, settings, cache_dir, config.split or None,
                               geometry=pre_config.geometry if uses_geometry else "none",
                               geometry_settings=featurize.GeometrySettings(seed=pre_config.geometry_seed))
    extra = {}
    if uses_geometry:
        # z-scored with training-split statistics, as the encoder saw z-scored corpus descriptors
        extra["geometry"] = prepared.geometry.standardized(prepared.split_indices("train")).astype(np.float32)
    return ds, prepared, extra


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
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.encoder not in ("frozen", "finetune"):
        raise ValueError(f"config.encoder={config.encoder!r}: choose 'frozen' or 'finetune'")
    baselines = _parse_list(config.baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"config.baselines: unknown {unknown}; choose from {list(BASELINES)} (comma separated)")
    model, pre_config, meta = pretrain.load_pretrained(pretrained, config.get("pretrained_step", 0) or None)
    ds, prepared, extra = load_task(config, pre_config, model.mol_names, data_dir, log)
    dims = json.loads((Path(pretrained) / "model_dims.json").read_text())
    control = None
    if config.get("control", True):
        # The control every pretraining claim needs: the same architecture and config, initialised with
        # the pretraining run's seed, no pretraining step, used exactly like the pretrained encoder.
        control = pretrain.build_model(pre_config, dims)
        control.eval()
    parts = tuple(_parse_list(config.head.parts))
    log(f"{ds.name}: {len(prepared.features)} molecules, {ds.num_tasks} tasks ({ds.task_type}); encoder "
        f"{pretrained} step {meta['step']} ({config.encoder}); baselines: {', '.join(baselines) or 'none'}")
    y = ds.labels[prepared.features.rows]
    split = {part: prepared.split_indices(part) for part in ("train", "valid", "test")}
    fp = prepared.features.fingerprints()
    x = x_control = None

    def frozen_inputs(encoder):
        emb = embed(encoder, prepared.features, extra)
        if "tree" in parts:
            emb["tree"] = tree_onehot(encoder, emb["anchor"])
        wanted = [p for p in parts if p in encoder.cell_names]
        if wanted:
            emb.update(cellular_projections(encoder, pre_config, prepared.features, wanted, data_dir, config, log))
        return head_inputs(emb, parts)

    ens = config.ensemble
    use_ensemble = (ens.enabled and ds.task_type == "classification"
                    and (config.csv or ds.name in _parse_list(ens.datasets)))
    runs: dict[str, list] = {}
    seeds = [int(s) for s in _parse_list(config.seeds)]
    done = {} if use_ensemble else {(m, r["seed"]): r for m, v in (reuse or {}).get("methods", {}).items()
                                    for r in v["runs"]}
    need = lambda method: any((method, s) not in done for s in seeds)
    if config.encoder == "frozen":
        x = frozen_inputs(model) if need("chmr") else None
        if control is not None and need("untrained"):
            x_control = frozen_inputs(control)
    elif "tree" in parts or any(p in model.cell_names for p in parts):
        raise ValueError("head parts 'tree' and cellular projections need the frozen encoder (config.encoder='frozen')")

    def reused(method, seed) -> bool:
        if (method, seed) in done:
            runs.setdefault(method, []).append(done[(method, seed)])
            return True
        return False

    def record(method, seed, out):
        entry = {"seed": seed, "valid": out["valid"], "test": out["test"]}
        if "history" in out:
            entry.update(best_epoch=out["best_epoch"], epochs_run=len(out["history"]))
        runs.setdefault(method, []).append(entry)
        log(f"  {method:8s} seed {seed}: test {out['test']}" +
            (f" (best epoch {out['best_epoch']})" if "best_epoch" in out else ""))

    o = config.optim
    for seed in seeds:
        cfg = fit_config(config, seed)
        enc_cfg = dataclasses.replace(cfg, epochs=o.encoder_epochs, patience=o.encoder_patience)
        if reused("chmr", seed):
            out = None
        elif config.encoder == "frozen":
            out = fit(x, y, split, ds.task_type, cfg)
        else:
            out = fit_encoder(nnx.clone(model), prepared.features, y, split, ds.task_type, enc_cfg,
                              encoder_lr=o.encoder_lr, parts=parts, extra_inputs=extra)
        if out is not None:
            record("chmr", seed, out)
        if control is not None and not reused("untrained", seed):
            if config.encoder == "frozen":
                record("untrained", seed, fit(x_control, y, split, ds.task_type, cfg))
            else:
                record("untrained", seed, fit_encoder(nnx.clone(control), prepared.features, y, split, ds.task_type,
                                                      enc_cfg, encoder_lr=o.encoder_lr, parts=parts,
                                                      extra_inputs=extra))
        rf = None
        if ("rf" in baselines and not reused("rf", seed)) or use_ensemble:
            rf = random_forest(fp, y, split, ds.task_type, seed, config.rf.trees)
            if "rf" in baselines:
                record("rf", seed, rf)
        if use_ensemble:
            pred = ensemble(out["test_pred"], rf["test_pred"], ens.gamma)
            record("chmr+rf", seed, {"valid": {}, "test": score(y[split["test"]], pred, ds.task_type)})
        if "mlp" in baselines and not reused("mlp", seed):
            record("mlp", seed, fit(fp, y, split, ds.task_type, cfg))
        if "gnn" in baselines and not reused("gnn", seed):
            scratch_config = pre_config.copy_and_resolve_references()
            scratch_config.train.seed = seed
            scratch = pretrain.build_model(scratch_config, dims)
            record("gnn", seed, fit_encoder(scratch, prepared.features, y, split, ds.task_type, enc_cfg,
                                            encoder_lr=cfg.lr, parts=parts, extra_inputs=extra))
    key = "roc_auc" if ds.task_type == "classification" else "mae"
    methods = {m: _summarise(r, key) for m, r in runs.items()}
    lift = paired_lift(methods, key) if "untrained" in methods else None
    result = {"dataset": ds.name, "metric": key, "pretrained": str(pretrained), "pretrained_step": meta["step"],
              "pretrained_epochs": meta.get("epochs_done", meta.get("epoch", -1) + 1),
              "encoder": config.encoder, "molecules": len(prepared.features),
              "rejects": len(prepared.features.rejects), "tasks": ds.num_tasks,
              "head_input": {"parts": list(parts), "width": int(x.shape[1]) if x is not None
                             else (reuse or {}).get("head_input", {}).get("width")}, "settings": run_settings(config, pretrained), "wall_s": round(time.perf_counter() - t_start, 1),
              "methods": methods, "lift": lift, **methods["chmr"]}
    (workdir / "results.json").write_text(json.dumps(result, indent=1, default=float))
    for m, r in methods.items():
        log(f"{ds.name} {m} test {key}: {r['test_mean']:.4f} +- {r['test_std']:.4f} over {len(r['runs'])} seed(s)")
    if lift is not None:
        log(f"{ds.name} lift over the untrained encoder (positive = pretrained better): "
            f"{lift['mean']:+.4f} +- {lift['std']:.4f} (paired over seeds)")
    log(f"-> {workdir / 'results.json'}")
    return result


# Paper Table 1 (spec §9): test mean, std over 5 seeds, x100 (ROC-AUC; MAE for biogenadme).
PAPER_TABLE = {
    "chembl2k": {"CHMR": (84.7, 0.2), "InfoAlign": (81.3, 0.6), "MLP": (76.8, 2.2), "RF": (54.7, 0.7)},
    "moltoxcast": {"CHMR": (69.3, 0.3), "InfoAlign": (66.4, 1.1), "MLP": (57.6, 1.0), "RF": (52.3, 0.1)},
    "broad6k": {"CHMR": (71.4, 0.2), "InfoAlign": (70.0, 0.1), "MLP": (63.3, 0.3), "RF": (55.5, 0.1)},
    "biogenadme": {"CHMR": (40.9, 0.3), "InfoAlign": (49.4, 0.2), "MLP": (66.2, 2.4), "RF": (52.8, 0.2)},
}


METHOD_LABELS = {"chmr": "chmr_jax", "untrained": "untrained encoder", "chmr+rf": "chmr_jax + RF", "mlp": "MLP (ours)", "rf": "RF (ours)",
                 "gnn": "GNN scratch (ours)"}


def benchmark_table(results: list[dict]) -> str:
    """Markdown: dataset, metric, seeds, mean +- std (x100) per method run here, then the paper's numbers."""
    methods = [m for m in METHOD_LABELS if any(m in r.get("methods", {"chmr": r}) for r in results)]
    paper_cols = ("CHMR", "InfoAlign", "MLP", "RF")
    with_lift = any(r.get("lift") for r in results)
    lines = ["| dataset | metric | seeds | " + " | ".join(METHOD_LABELS[m] for m in methods) + " | "
             + ("lift (paired) | " if with_lift else "")
             + " | ".join(f"paper {c}" for c in paper_cols) + " |",
             "|---|---|---|" + "---|" * (len(methods) + len(paper_cols) + with_lift)]
    for r in results:
        got = r.get("methods", {"chmr": r})
        paper = PAPER_TABLE.get(r["dataset"], {})
        ours = [f"{100 * got[m]['test_mean']:.1f} +- {100 * got[m]['test_std']:.1f}" if m in got else "-"
                for m in methods]
        theirs = [f"{paper[c][0]} +- {paper[c][1]}" if c in paper else "-" for c in paper_cols]
        lift = r.get("lift")
        lift_cell = ([f"{100 * lift['mean']:+.1f} +- {100 * lift['std']:.1f}" if lift else "-"] if with_lift else [])
        lines.append(f"| {r['dataset']} | {r['metric']} | {len(got['chmr']['runs'])} | " + " | ".join(ours + lift_cell)
                     + " | " + " | ".join(theirs) + " |")
    budgets = {(o["encoder_epochs"], o["encoder_patience"], o["lr"]) for r in results if "gnn" in r.get("methods", {})
               for o in [r.get("settings", {}).get("config", {}).get("optim")] if o}
    if budgets:
        lines.append("\nGNN scratch: the encoder architecture from a random initialisation trained end to end, "
                     + "; ".join(f"at most {e} epochs (early stop after {p} without a better validation score), "
                                 f"lr {lr}" for e, p, lr in sorted(budgets)) + ".")
    return "\n".join(lines)


def run_or_reuse(config, pretrained, workdir, data_dir=None, log=print) -> dict:
    """`run`, unless workdir/results.json exists with the same settings (then that result); with the
    same settings but other baselines, `run` reuses its (method, seed) runs."""
    import json
    from pathlib import Path

    done = Path(workdir) / "results.json"
    reuse = None
    if done.exists():
        previous = json.loads(done.read_text())
        settings = run_settings(config, pretrained)
        if previous.get("settings") == settings:
            log(f"{previous['dataset']}: reusing {done} (same settings)")
            return previous
        # Same settings except the baselines: keep the runs it has, compute only the missing ones.
        without = lambda st: {**st, "config": {**st["config"], "baselines": None}}
        if previous.get("settings") and without(previous["settings"]) == without(settings):
            log(f"{previous['dataset']}: reusing the runs in {done}; computing the missing baselines")
            reuse = previous
    return run(config, pretrained, workdir, data_dir, log, reuse=reuse)


def lift_report(results: list[dict], command: str = "") -> dict:
    """The benchmark's lift summary (issue 12's lift.json): per dataset the pretrained and untrained
    scores, their paired lift (positive = pretrained better) and the best in-house baseline."""
    out = {"pretrain_epochs": None, "pretrain_steps": None, "seeds": None, "command": command, "datasets": {}}
    for r in results:
        if not r.get("lift"):
            continue
        got, metric = r["methods"], r["metric"]
        pick = max if higher_is_better(metric) else min
        base = [m for m in BASELINES if m in got]
        best = pick(base, key=lambda m: got[m]["test_mean"]) if base else None
        stat = lambda m: {"mean": got[m]["test_mean"], "std": got[m]["test_std"]}
        out["seeds"] = [run["seed"] for run in got["chmr"]["runs"]]
        out["pretrain_steps"] = r["pretrained_step"]
        out["pretrain_epochs"] = r.get("pretrained_epochs")
        out["datasets"][r["dataset"]] = {
            "metric": metric, "higher_is_better": higher_is_better(metric),
            "pretrained": stat("chmr"), "untrained": stat("untrained"),
            "lift": {"mean": r["lift"]["mean"], "std": r["lift"]["std"]},
            "best_baseline": {"name": best, **stat(best)} if best else None, "baselines_run": base}
    return out


def run_benchmark(config, pretrained, workdir, names, data_dir=None, log=print, command: str = "",
                  table_only: bool = False) -> list[dict]:
    """finetune.run for each dataset in `names` (workdir/<dataset>/), then results.md / results.json.

    table_only: compute nothing; tabulate the datasets whose workdir/<dataset>/results.json exists, with
    whatever methods each holds (e.g. to report a benchmark that is still being extended)."""
    import json
    from pathlib import Path

    workdir = Path(workdir)
    results = []
    for name in names:
        if table_only:
            done = workdir / name / "results.json"
            if done.exists():
                results.append(json.loads(done.read_text()))
            else:
                log(f"{name}: no {done} yet; left out of the table")
            continue
        cfg = config.copy_and_resolve_references()
        cfg.dataset = name
        results.append(run_or_reuse(cfg, pretrained, workdir / name, data_dir, log))
    if not results:
        raise FileNotFoundError(f"{workdir}: no finished dataset (<dataset>/results.json) to tabulate")
    table = benchmark_table(results)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if any(r.get("lift") for r in results):
        (workdir / "lift.json").write_text(json.dumps(lift_report(results, command), indent=1))
    log("\n" + table + f"\n\nwritten to {workdir / 'results.md'} and results.json")
    return results
