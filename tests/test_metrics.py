"""Downstream metrics against sklearn on random data with ties, missing labels and one-class tasks."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, mean_absolute_error, mean_squared_error, roc_auc_score

from chmr_jax.downstream import metrics


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_and_average_precision_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(200) < 0.3).astype(float)
    score = np.round(rng.random(200) + 0.4 * y, 1)        # rounded: many ties
    assert metrics.roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert metrics.average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)


def test_mean_roc_auc_skips_unlabelled_entries_and_one_class_tasks():
    rng = np.random.default_rng(0)
    n, t = 120, 4
    y = (rng.random((n, t)) < 0.4).astype(float)
    y[rng.random((n, t)) < 0.3] = np.nan
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)     # task 2: negatives only -> skipped
    score = rng.random((n, t))
    out = metrics.mean_roc_auc(y, score)
    expected = [roc_auc_score(y[~np.isnan(y[:, k]), k], score[~np.isnan(y[:, k]), k]) for k in (0, 1, 3)]
    assert out["tasks_evaluated"] == 3 and np.isnan(out["per_task"][2])
    assert out["roc_auc"] == pytest.approx(np.mean(expected), abs=1e-12)
    ap = [average_precision_score(y[~np.isnan(y[:, k]), k], score[~np.isnan(y[:, k]), k]) for k in (0, 1, 3)]
    assert metrics.mean_average_precision(y, score) == pytest.approx(np.mean(ap), abs=1e-12)


def test_regression_metrics_per_task_over_labelled_entries():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(50, 3))
    y[rng.random((50, 3)) < 0.2] = np.nan
    pred = rng.normal(size=(50, 3))
    out = metrics.regression(y, pred)
    per = [mean_absolute_error(y[~np.isnan(y[:, k]), k], pred[~np.isnan(y[:, k]), k]) for k in range(3)]
    rmse = [np.sqrt(mean_squared_error(y[~np.isnan(y[:, k]), k], pred[~np.isnan(y[:, k]), k])) for k in range(3)]
    np.testing.assert_allclose(out["mae_per_task"], per, rtol=1e-12)
    assert out["mae"] == pytest.approx(np.mean(per)) and out["rmse"] == pytest.approx(np.mean(rmse))
