"""A prediction head on fixed inputs (frozen-encoder features or raw fingerprints), spec §8.

  Head                            Linear(in, hidden) -> LayerNorm|BatchNorm -> GELU -> Dropout -> Linear(tasks)
  masked_loss / score             BCE or L1 over labelled entries; ROC-AUC + PR-AUC or MAE + RMSE
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

from chmr_jax.downstream import metrics as metrics_lib
from chmr_jax.mechanisms import model as model_lib


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


def better(task_type: str, new: dict, best: dict | None) -> bool:
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
        if better(task_type, valid, best):
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
