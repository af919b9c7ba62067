"""Evaluation metrics for the downstream benchmarks (spec §8), in numpy, checked against sklearn.

Labels are float arrays [n, tasks] with NaN for unlabelled entries (the benchmarks' missing labels).
  roc_auc / average_precision   one task, labelled entries only
  mean_roc_auc                  unweighted mean over tasks with both classes present, and that count
  mae / rmse                    per task over labelled entries, and their mean
"""
from __future__ import annotations

import numpy as np


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based) with ties sharing their mean rank, as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    boundaries = np.concatenate([[True], xs[1:] != xs[:-1], [True]])
    idx = np.nonzero(boundaries)[0]
    starts, ends = idx[:-1], idx[1:]
    avg = (starts + ends + 1) / 2.0          # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(y_true, y_score) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg)); NaN if one class is absent."""
    y_true = np.asarray(y_true, np.float64)
    y_score = np.asarray(y_score, np.float64)
    keep = ~np.isnan(y_true)
    y_true, y_score = y_true[keep] > 0.5, y_score[keep]
    n_pos = int(y_true.sum())
    n_neg = len(y_true) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rankdata(y_score)
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true, y_score) -> float:
    """Area under the precision-recall curve as sklearn's average_precision_score (step-wise,
    thresholds at distinct scores); NaN without positives."""
    y_true = np.asarray(y_true, np.float64)
    y_score = np.asarray(y_score, np.float64)
    keep = ~np.isnan(y_true)
    y_true, y_score = y_true[keep] > 0.5, y_score[keep]
    n_pos = int(y_true.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-y_score, kind="mergesort")
    s, t = y_score[order], y_true[order]
    last_of_tie = np.concatenate([s[1:] != s[:-1], [True]])
    tp = np.cumsum(t)[last_of_tie]
    fp = np.cumsum(~t)[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_prev = np.concatenate([[0.0], recall[:-1]])
    return float(np.sum((recall - recall_prev) * precision))


def _per_task(fn, y_true, y_score) -> np.ndarray:
    y_true = np.asarray(y_true, np.float64)
    y_score = np.asarray(y_score, np.float64)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score[:, None]
    return np.array([fn(y_true[:, k], y_score[:, k]) for k in range(y_true.shape[1])])


def mean_roc_auc(y_true, y_score) -> dict:
    """{'roc_auc': mean over valid tasks, 'tasks_evaluated': count, 'per_task': [T] (NaN = skipped)}."""
    per = _per_task(roc_auc, y_true, y_score)
    valid = ~np.isnan(per)
    return {"roc_auc": float(per[valid].mean()) if valid.any() else float("nan"),
            "tasks_evaluated": int(valid.sum()), "per_task": per}


def mean_average_precision(y_true, y_score) -> float:
    per = _per_task(average_precision, y_true, y_score)
    return float(np.nanmean(per)) if (~np.isnan(per)).any() else float("nan")


def regression(y_true, y_pred) -> dict:
    """{'mae': mean over tasks of the per-task MAE, 'mae_per_task', 'rmse' (mean of per-task RMSE),
    'rmse_per_task'}; labelled entries only."""
    y_true = np.asarray(y_true, np.float64)
    y_pred = np.asarray(y_pred, np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    mae, rmse = [], []
    for k in range(y_true.shape[1]):
        keep = ~np.isnan(y_true[:, k])
        err = y_pred[keep, k] - y_true[keep, k]
        mae.append(np.abs(err).mean() if keep.any() else np.nan)
        rmse.append(np.sqrt((err ** 2).mean()) if keep.any() else np.nan)
    mae, rmse = np.array(mae), np.array(rmse)
    return {"mae": float(np.nanmean(mae)), "mae_per_task": mae, "rmse": float(np.nanmean(rmse)),
            "rmse_per_task": rmse}
