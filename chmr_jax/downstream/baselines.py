"""In-house baselines on the same splits and seeds as the pretrained encoder: the random forest on
raw fingerprints and the release's head + forest ensemble. (The MLP baseline is `head.fit` on the
raw fingerprint; the GNN from scratch is `encoder_fit.fit_encoder` on a fresh encoder.)"""
from __future__ import annotations

import numpy as np

from chmr_jax.downstream import head as head_lib


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
    return {"valid": head_lib.score(y[split["valid"]], preds["valid"], task_type),
            "test": head_lib.score(y[split["test"]], preds["test"], task_type), "test_pred": preds["test"]}


def ensemble(head_prob: np.ndarray, rf_prob: np.ndarray, gamma: float) -> np.ndarray:
    """The release's ensemble for BACE/ClinTox/SIDER/HIV: gamma * head probability + RF probability
    (not renormalised; rankings, hence ROC-AUC, are what it changes; gamma <= 0.1 lets the forest dominate)."""
    return gamma * head_prob + rf_prob
