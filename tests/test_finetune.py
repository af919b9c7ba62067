"""Fine-tuning core: masked losses against numpy, best-epoch selection, early stopping, frozen-encoder
embeddings independent of batching."""
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax import finetune, pretrain_data as PD


def test_masked_losses_use_labelled_entries_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    y = (rng.random((10, 3)) < 0.5).astype(np.float32)
    y[rng.random((10, 3)) < 0.4] = np.nan
    m = ~np.isnan(y)
    p = 1 / (1 + np.exp(-logits))
    bce = -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log(1 - p))
    assert float(finetune.masked_loss(jnp.asarray(logits), jnp.asarray(y), "classification")) == pytest.approx(
        bce[m].mean(), rel=1e-5)
    assert float(finetune.masked_loss(jnp.asarray(logits), jnp.asarray(y), "regression")) == pytest.approx(
        np.abs(logits - np.nan_to_num(y))[m].mean(), rel=1e-5)
    assert float(finetune.masked_loss(jnp.asarray(logits), jnp.full((10, 3), jnp.nan), "classification")) == 0.0


def _toy(n=400, d=16, tasks=3, seed=0, noise_only=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, tasks))
    y = ((rng.normal(size=(n, tasks)) if noise_only else x @ w) > 0).astype(np.float32)
    y[rng.random((n, tasks)) < 0.3] = np.nan
    idx = rng.permutation(n)
    return x, y, {"train": idx[:240], "valid": idx[240:320], "test": idx[320:]}


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fit_learns_and_returns_the_best_validation_epochs_state(norm):
    x, y, split = _toy()
    cfg = finetune.FitConfig(hidden=32, norm=norm, dropout=0.1, lr=3e-3, batch_size=32, epochs=30, patience=30)
    out = finetune.fit(x, y, split, "classification", cfg)
    assert out["test"]["roc_auc"] > 0.85 and out["test"]["tasks_evaluated"] == 3
    aucs = [h["valid_roc_auc"] for h in out["history"]]
    assert out["best_epoch"] == int(np.argmax(aucs)) and out["valid"]["roc_auc"] == max(aucs)
    # The returned head is that epoch's state: it reproduces the best validation score exactly.
    pred = np.asarray(1 / (1 + np.exp(-np.asarray(out["head"](jnp.asarray(x[split["valid"]]))))))
    assert finetune.score(y[split["valid"]], pred, "classification")["roc_auc"] == pytest.approx(max(aucs), abs=1e-6)


def test_early_stopping_on_patience_and_regression_mae():
    x, y, split = _toy(noise_only=True, seed=1)
    out = finetune.fit(x, y, split, "classification", finetune.FitConfig(hidden=16, epochs=200, patience=3, lr=1e-2))
    assert len(out["history"]) == out["best_epoch"] + 1 + 3 < 200
    rng = np.random.default_rng(2)
    xr = rng.normal(size=(400, 8)).astype(np.float32)
    yr = (xr[:, :2] @ np.array([[1.0, -0.5], [0.5, 2.0]])).astype(np.float32)
    reg = finetune.fit(xr, yr, split, "regression", finetune.FitConfig(hidden=64, dropout=0.0, lr=3e-3, epochs=60))
    baseline = np.abs(yr[split["test"]] - yr[split["train"]].mean(0)).mean()
    assert reg["test"]["mae"] < 0.5 * baseline


def test_embeddings_do_not_depend_on_batching(tmp_path):
    corpus = tiny_corpus(tmp_path, n_molecules=40, seed=4)
    data = PD.prepare(corpus, tiny_data_config())
    model = tiny_model(data)
    small = finetune.embed(model, corpus.features, batch_size=3, pad_multiple=8, show_progress=False)
    large = finetune.embed(model, corpus.features, batch_size=64, pad_multiple=64, show_progress=False)
    assert set(small) == {"fingerprint_raw", "fingerprint", "graph", "anchor"}
    for key in small:
        assert small[key].shape[0] == 40 and np.isfinite(small[key]).all()
        np.testing.assert_allclose(small[key], large[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(small["anchor"], small["fingerprint"] + small["graph"], rtol=1e-5, atol=1e-6)
    x = finetune.head_inputs(small)
    assert x.shape == (40, small["fingerprint_raw"].shape[1] + 2 * small["graph"].shape[1])
