"""Fine-tuning core: masked losses against numpy, best-epoch selection, early stopping, frozen-encoder
embeddings independent of batching."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_corpus, tiny_data_config, tiny_model

from chmr_jax.downstream import baselines, embeddings, encoder_fit, head
from chmr_jax.training import pretrain_data as PD

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_masked_losses_use_labelled_entries_only():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 3)).astype(np.float32)
    y = (rng.random((10, 3)) < 0.5).astype(np.float32)
    y[rng.random((10, 3)) < 0.4] = np.nan
    m = ~np.isnan(y)
    p = 1 / (1 + np.exp(-logits))
    bce = -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log(1 - p))
    assert float(head.masked_loss(jnp.asarray(logits), jnp.asarray(y), "classification")) == pytest.approx(
        bce[m].mean(), rel=1e-5)
    assert float(head.masked_loss(jnp.asarray(logits), jnp.asarray(y), "regression")) == pytest.approx(
        np.abs(logits - np.nan_to_num(y))[m].mean(), rel=1e-5)
    assert float(head.masked_loss(jnp.asarray(logits), jnp.full((10, 3), jnp.nan), "classification")) == 0.0


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
    cfg = head.FitConfig(hidden=32, norm=norm, dropout=0.1, lr=3e-3, batch_size=32, epochs=30, patience=30)
    out = head.fit(x, y, split, "classification", cfg)
    assert out["test"]["roc_auc"] > 0.85 and out["test"]["tasks_evaluated"] == 3
    aucs = [h["valid_roc_auc"] for h in out["history"]]
    assert out["best_epoch"] == int(np.argmax(aucs)) and out["valid"]["roc_auc"] == max(aucs)
    # The returned head is that epoch's state: it reproduces the best validation score exactly.
    pred = np.asarray(1 / (1 + np.exp(-np.asarray(out["head"](jnp.asarray(x[split["valid"]]))))))
    assert head.score(y[split["valid"]], pred, "classification")["roc_auc"] == pytest.approx(max(aucs), abs=1e-6)


def test_early_stopping_on_patience_and_regression_mae():
    x, y, split = _toy(noise_only=True, seed=1)
    out = head.fit(x, y, split, "classification", head.FitConfig(hidden=16, epochs=200, patience=3, lr=1e-2))
    assert len(out["history"]) == out["best_epoch"] + 1 + 3 < 200
    rng = np.random.default_rng(2)
    xr = rng.normal(size=(400, 8)).astype(np.float32)
    yr = (xr[:, :2] @ np.array([[1.0, -0.5], [0.5, 2.0]])).astype(np.float32)
    reg = head.fit(xr, yr, split, "regression", head.FitConfig(hidden=64, dropout=0.0, lr=3e-3, epochs=60))
    baseline = np.abs(yr[split["test"]] - yr[split["train"]].mean(0)).mean()
    assert reg["test"]["mae"] < 0.5 * baseline


def test_embeddings_do_not_depend_on_batching(tmp_path):
    corpus = tiny_corpus(tmp_path, n_molecules=40, seed=4)
    data = PD.prepare(corpus, tiny_data_config())
    model = tiny_model(data)
    small = embeddings.embed(model, corpus.features, batch_size=3, pad_multiple=8, show_progress=False)
    large = embeddings.embed(model, corpus.features, batch_size=64, pad_multiple=64, show_progress=False)
    assert set(small) == {"fingerprint_raw", "fingerprint", "graph", "anchor"}
    for key in small:
        assert small[key].shape[0] == 40 and np.isfinite(small[key]).all()
        np.testing.assert_allclose(small[key], large[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(small["anchor"], small["fingerprint"] + small["graph"], rtol=1e-5, atol=1e-6)
    x = embeddings.head_inputs(small)
    assert x.shape == (40, small["fingerprint_raw"].shape[1] + 2 * small["graph"].shape[1])


def _graph_task(tmp_path, n=64):
    """A tiny corpus with a label the structure determines (more atoms than the median)."""
    corpus = tiny_corpus(tmp_path, n_molecules=n, seed=5)
    data = PD.prepare(corpus, tiny_data_config())
    atoms = corpus.features.n_atoms
    y = (atoms > np.median(atoms)).astype(np.float32)[:, None]
    idx = np.random.default_rng(0).permutation(n)
    return corpus.features, data, y, {"train": idx[:40], "valid": idx[40:52], "test": idx[52:]}


def test_fit_encoder_trains_the_encoder_only_when_given_a_learning_rate(tmp_path):
    import jax
    from flax import nnx
    features, data, y, split = _graph_task(tmp_path)
    cfg = head.FitConfig(hidden=16, dropout=0.0, lr=3e-3, batch_size=16, epochs=4, patience=4)
    before = nnx.state(tiny_model(data, dropout=0.0), nnx.Param)
    frozen = encoder_fit.fit_encoder(tiny_model(data, dropout=0.0), features, y, split, "classification", cfg,
                                  encoder_lr=0.0)
    moved = encoder_fit.fit_encoder(tiny_model(data, dropout=0.0), features, y, split, "classification", cfg,
                                 encoder_lr=1e-3)
    delta = lambda out: max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        nnx.state(out["model"].encoder, nnx.Param), before)))
    assert delta(frozen) == 0.0 and delta(moved) > 0.0
    # The GNN's batch statistics move in training mode even with a zero learning rate (they are not
    # parameters); the head must have learnt in both cases.
    for out in (frozen, moved):
        assert len(out["history"]) == 4 and np.isfinite(out["history"][-1]["train_loss"])
        assert out["valid"]["roc_auc"] == max(h["valid_roc_auc"] for h in out["history"])
        assert out["test_pred"].shape == (len(split["test"]), 1)


def test_fit_encoder_returns_the_best_epochs_model_in_eval_mode(tmp_path):
    features, data, y, split = _graph_task(tmp_path)
    cfg = head.FitConfig(hidden=16, dropout=0.2, lr=3e-3, batch_size=16, epochs=5, patience=5)
    out = encoder_fit.fit_encoder(tiny_model(data), features, y, split, "classification", cfg, encoder_lr=1e-3)
    # Re-predicting the test rows with the returned model (its own batching) gives the stored scores.
    again = embeddings.embed(out["model"].encoder, features, show_progress=False)
    x = embeddings.head_inputs(again, out["model"].parts)
    pred = 1 / (1 + np.exp(-np.asarray(out["model"].head(jnp.asarray(x[split["test"]])))))
    np.testing.assert_allclose(pred, out["test_pred"], rtol=1e-4, atol=1e-5)


def test_random_forest_fits_each_task_on_its_labelled_rows():
    from sklearn.ensemble import RandomForestClassifier
    x, y, split = _toy(tasks=3, seed=3)
    y[split["train"], 2] = 1.0                     # one class in training: constant prediction
    out = baselines.random_forest(x, y, split, "classification", seed=7, trees=20)
    tr = split["train"][~np.isnan(y[split["train"], 0])]
    ref = RandomForestClassifier(n_estimators=20, max_features="sqrt", random_state=7).fit(x[tr], y[tr, 0])
    np.testing.assert_allclose(out["test_pred"][:, 0], ref.predict_proba(x[split["test"]])[:, 1], atol=1e-6)
    assert np.all(out["test_pred"][:, 2] == 1.0)
    assert out["test"]["tasks_evaluated"] == 3 and out["test"]["roc_auc"] > 0.6
    reg = baselines.random_forest(x, np.nan_to_num(y), split, "regression", trees=10)
    assert set(reg["test"]) == {"mae", "rmse"}


def test_ensemble_is_gamma_head_plus_forest():
    head_prob, rf = np.array([[0.9], [0.1]]), np.array([[0.2], [0.3]])
    np.testing.assert_allclose(baselines.ensemble(head_prob, rf, 0.1), [[0.29], [0.31]])


def test_tree_onehot_encodes_the_anchors_path(tmp_path):
    from chmr_jax.mechanisms import tree_vq
    corpus = tiny_corpus(tmp_path, n_molecules=30, seed=6)
    model = tiny_model(PD.prepare(corpus, tiny_data_config()))
    emb = embeddings.embed(model, corpus.features, show_progress=False)
    onehot = embeddings.tree_onehot(model, emb["anchor"])
    codes = np.asarray(tree_vq.tree_vq(model.codebook[...], jnp.asarray(emb["anchor"])).codes)
    assert onehot.shape == (30, 2 + 4 + 8) and np.all(onehot.sum(1) == 3)
    for h, start in ((1, 0), (2, 2), (3, 6)):
        np.testing.assert_array_equal(np.argmax(onehot[:, start:start + 2 ** h], 1), codes[:, h - 1] - 2 ** h)


def test_projector_apply_compiles_once_per_structure():
    # cellular_projections applies each cellular projector through one jitted function of
    # (graphdef, state): equal to calling the module, and a second module of the same structure with
    # other parameters reuses the compilation (no new trace per call, as a jitted lambda over the
    # live module would need).
    from flax import nnx
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    first, second = nnx.Linear(7, 3, rngs=nnx.Rngs(0)), nnx.Linear(7, 3, rngs=nnx.Rngs(1))
    before = embeddings._apply._cache_size()
    for module in (first, second):
        graphdef, state = nnx.split(module)
        np.testing.assert_allclose(embeddings._apply(graphdef, state, x), module(x), rtol=1e-6, atol=1e-6)
    assert embeddings._apply._cache_size() - before == 1


def test_seed_spread_is_the_sample_std():
    # The paper's +- is pandas' .std() (ddof=1); numpy's default (ddof=0) is smaller by sqrt((n-1)/n).
    from chmr_jax.downstream import finetune
    ours, base = [0.80, 0.82, 0.79, 0.85], [0.78, 0.78, 0.80, 0.81]
    methods = {m: {"runs": [{"seed": s, "test": {"roc_auc": v}} for s, v in enumerate(vals)]}
               for m, vals in (("chmr", ours), ("untrained", base))}
    diffs = np.subtract(ours, base)
    lift = finetune.paired_lift(methods, "roc_auc")
    assert lift["std"] == pytest.approx(np.sqrt(((diffs - diffs.mean()) ** 2).sum() / 3), rel=1e-12)
    summary = finetune._summarise(methods["chmr"]["runs"], "roc_auc")
    assert summary["test_std"] == pytest.approx(np.sqrt(((np.subtract(ours, np.mean(ours))) ** 2).sum() / 3), rel=1e-12)
    assert np.isnan(finetune.sample_std([0.5]))          # one seed: no spread to report


def test_an_unknown_head_part_is_an_error():
    emb = {"fingerprint_raw": np.zeros((3, 4)), "fingerprint": np.ones((3, 2)), "graph": np.ones((3, 2))}
    with pytest.raises(KeyError, match="fingerprnt"):
        embeddings.head_inputs(emb, ("fingerprint_raw", "fingerprnt", "graph"))
    assert embeddings.head_inputs(emb).shape == (3, 8)            # the spec's parts this encoder has
    mol, cell = ("fingerprint", "graph"), ("expression",)
    # 'geometry' is a spec part this encoder lacks: left out; a misspelt name is refused.
    assert embeddings.head_parts(["fingerprint_raw", "graph", "geometry", "tree", "expression"], mol, cell) == (
        "fingerprint_raw", "graph", "tree", "expression")
    with pytest.raises(ValueError, match=r"config.head.parts: unknown part\(s\) \['expresion'\]"):
        embeddings.head_parts(["fingerprint_raw", "expresion"], mol, cell)


def _finetune_config(arg: str):
    from chmr_jax import config_util
    return config_util.load_config(f"{CONFIGS / 'finetune.py'}:{arg}")


def test_the_control_is_a_fresh_initialisation_with_the_pretraining_seed(tiny_run, data_dir, cache_dir, tmp_path,
                                                                           monkeypatch):
    """The lift is measured against the encoder the pretraining run started from: the control's
    parameters equal a fresh initialisation with the run's seed and differ from the pretrained ones."""
    import json

    import jax
    from flax import nnx

    from chmr_jax import cli
    from chmr_jax.training import pretrain
    embedded = []
    real_embed = embeddings.embed
    monkeypatch.setattr(embeddings, "embed", lambda model, *a, **k: (
        embedded.append(jax.device_get(nnx.state(model, nnx.Param))), real_embed(model, *a, **k))[1])
    rc = cli.main(["finetune", "--config", f"{CONFIGS / 'finetune.py'}:dataset=bace,seeds=0,1",
                   "--pretrained", str(tiny_run), "--workdir", str(tmp_path / "ft"),
                   f"--config.cache_dir={cache_dir}", f"--config.data_dir={data_dir}", "--config.optim.epochs=2",
                   "--config.head.hidden=16"])
    assert rc == 0 and len(embedded) == 2                     # the pretrained encoder, then the control
    pretrained, pre_config, _ = pretrain.load_pretrained(tiny_run)
    dims = json.loads((tiny_run / "model_dims.json").read_text())

    def fresh(seed):
        """The pretraining run's model as initialised with `seed`, before any step."""
        cfg = pre_config.copy_and_resolve_references()
        cfg.train.seed = seed
        return jax.device_get(nnx.state(pretrain.build_model(cfg, dims), nnx.Param))

    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert same(embedded[0], jax.device_get(nnx.state(pretrained, nnx.Param)))
    assert same(embedded[1], fresh(pre_config.train.seed))
    assert not same(embedded[1], embedded[0]) and not same(embedded[1], fresh(pre_config.train.seed + 1))
    result = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert result["head_input"]["parts"] == ["fingerprint_raw", "fingerprint", "graph"]   # no geometry here
    # The digest pretraining recorded of its initial parameters is the control's (issue 32): computed here
    # independently from the fresh initialisation's arrays, and not the trained parameters' digest.
    recorded = json.loads((tiny_run / "summary.json").read_text())["init_digest"]
    assert recorded == json.loads((tiny_run / "init_digest.json").read_text())["init_digest"]
    assert result["control_init_digest"] == recorded
    cfg = pre_config.copy_and_resolve_references()
    assert pretrain.init_digest(pretrain.build_model(cfg, dims)) == recorded != pretrain.init_digest(pretrained)
    # A misspelt head part stops the job (exit 2) instead of shrinking the head input unnoticed.
    assert cli.main(["finetune", "--config", f"{CONFIGS / 'finetune.py'}:dataset=bace,seeds=0", "--pretrained",
                     str(tiny_run), "--workdir", str(tmp_path / "bad"), f"--config.data_dir={data_dir}",
                     "--config.head.parts=fingerprint_raw,fingerprnt"]) == 2


def test_reuse_is_keyed_on_the_checkpoints_content(tiny_run, cache_dir, tmp_path, monkeypatch):
    """An ablation pretrained again into the same workdir with the same step count is fine-tuned
    again, not served the earlier results.json."""
    import json
    import shutil

    from chmr_jax import cli
    from chmr_jax.downstream import finetune
    calls = []

    def fake_run(config, pretrained, workdir, *a, **k):
        calls.append(str(pretrained))
        result = {"dataset": "bace", "metric": "roc_auc", "methods": {}, "settings": finetune.run_settings(config, pretrained)}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(finetune, "run", fake_run)
    config, run_dir, out = _finetune_config("dataset=bace"), tmp_path / "pretrain", tmp_path / "ft"
    shutil.copytree(tiny_run, run_dir)
    first = finetune.run_or_reuse(config, run_dir, out)["settings"]
    finetune.run_or_reuse(config, run_dir, out)
    assert len(calls) == 1 and first["pretrained_step"] == 10 and first["checkpoint_digest"]
    # Another checkpoint of the same run (pretrained_step=4) has other content.
    config.pretrained_step = 4
    assert finetune.run_settings(config, run_dir)["checkpoint_digest"] != first["checkpoint_digest"]
    config.pretrained_step = 0
    # The same workdir pretrained again (another seed), to the same step.
    shutil.rmtree(run_dir)
    assert cli.main(["pretrain", "--config", str(CONFIGS / "test.py"),
                     "--workdir", str(run_dir), f"--config.cache_dir={cache_dir}", "--config.train.steps=10",
                     "--config.train.checkpoint_every_steps=10", "--config.train.seed=1"]) == 0
    again = finetune.run_or_reuse(config, run_dir, out)["settings"]
    assert len(calls) == 2 and again["pretrained_step"] == 10
    assert again["checkpoint_digest"] != first["checkpoint_digest"]
    assert again["pretrain_config_digest"] != first["pretrain_config_digest"]


def test_finetune_command_reuses_a_finished_run_and_prints_rounded_seed_lines(tiny_run, data_dir, cache_dir,
                                                                               tmp_path, capsys, monkeypatch):
    """`chmr-jax finetune` run twice with the same settings computes once: the second run says it
    reuses results.json and prints the same summary; per-seed lines give each metric to 4 decimals."""
    import re

    from chmr_jax import cli
    from chmr_jax.downstream import finetune
    argv = ["finetune", "--config", f"{CONFIGS / 'finetune.py'}:dataset=bace,seeds=0,1", "--pretrained",
            str(tiny_run), "--workdir", str(tmp_path / "ft"), f"--config.cache_dir={cache_dir}",
            f"--config.data_dir={data_dir}", "--config.optim.epochs=2", "--config.head.hidden=16"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    seed_lines = [line for line in first.splitlines() if " seed " in line]
    assert len(seed_lines) == 4                                  # chmr and untrained, seeds 0 and 1
    for line in seed_lines:
        assert re.fullmatch(r"  (chmr|untrained) +seed [01]: test roc_auc (\d\.\d{4}|nan), pr_auc (\d\.\d{4}|nan) "
                            r"over 1 task; best epoch \d+", line), line
    written = (tmp_path / "ft" / "results.json").read_text()
    monkeypatch.setattr(finetune, "run", lambda *a, **k: pytest.fail("a finished run was recomputed"))
    assert cli.main(argv) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "nothing recomputed" in second
    summary = lambda out: [line for line in out.splitlines() if line.startswith("bace ")]
    assert summary(second) == summary(first) and len(summary(first)) == 3   # chmr, untrained, lift
    assert (tmp_path / "ft" / "results.json").read_text() == written


def test_a_csvs_content_keys_its_result(tmp_path, tiny_run):
    """The same CSV path with other content is another setting (fine-tuned again, not reused)."""
    from chmr_jax.downstream import finetune
    csv = tmp_path / "assay.csv"
    csv.write_text("SMILES,y\nCCO,1.0\n")
    config = _finetune_config("dataset=bace")
    config.csv = str(csv)
    before = finetune.run_settings(config, tiny_run)
    assert finetune.run_settings(config, tiny_run) == before
    csv.write_text("SMILES,y\nCCO,2.0\n")
    assert finetune.run_settings(config, tiny_run)["csv_sha256"] != before["csv_sha256"]


def test_a_control_that_is_not_the_runs_own_initialisation_is_refused(tiny_run, data_dir, tmp_path, capsys):
    """A run whose recorded initial parameters differ from what this code initialises (the model or its
    init changed since pretraining) is refused before any fine-tuning: its lift would be measured
    against another encoder's start."""
    import json
    import shutil

    from chmr_jax import cli
    run_dir = tmp_path / "pretrain"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "init_digest.json").write_text(json.dumps({"init_digest": "0" * 64, "seed": 0}))
    rc = cli.main(["finetune", "--config", f"{CONFIGS / 'finetune.py'}:dataset=bace,seeds=0", "--pretrained",
                   str(run_dir), "--workdir", str(tmp_path / "ft"), f"--config.data_dir={data_dir}"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not" in err and "own initialisation" in err and "000000000000" in err, err
    assert not (tmp_path / "ft" / "results.json").exists()


def test_reuse_is_keyed_on_the_split_version_and_the_data_files_content(tiny_run, data_dir, tmp_path, monkeypatch):
    """A changed splitter (its SPLIT_VERSION) or a data file edited under the same name makes
    `benchmark` / `finetune` recompute instead of serving the earlier results.json (issue 32)."""
    import json
    import shutil

    from chmr_jax.data import datasets, registry, splits
    from chmr_jax.downstream import finetune
    source = registry.fetch("bace", datasets.BENCHMARKS["bace"][0], data_dir)
    local_data = tmp_path / "data"
    copy = local_data / source.relative_to(data_dir)
    copy.parent.mkdir(parents=True)
    shutil.copy(source, copy)
    calls = []

    def fake_run(config, pretrained, workdir, data_dir=None, *a, **k):
        calls.append(1)
        result = {"dataset": "bace", "metric": "roc_auc", "methods": {},
                  "settings": finetune.run_settings(config, pretrained, data_dir)}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps(result))
        return result

    monkeypatch.setattr(finetune, "run", fake_run)
    config, out = _finetune_config("dataset=bace"), tmp_path / "ft"
    first = finetune.run_or_reuse(config, tiny_run, out, local_data)["settings"]["data"]
    finetune.run_or_reuse(config, tiny_run, out, local_data)
    assert len(calls) == 1 and first["data_sha256"] == registry.sha256_of(source)
    monkeypatch.setattr(splits, "SPLIT_VERSION", splits.SPLIT_VERSION + 1)
    finetune.run_or_reuse(config, tiny_run, out, local_data)
    assert len(calls) == 2                                     # another splitter: recomputed
    finetune.run_or_reuse(config, tiny_run, out, local_data)
    assert len(calls) == 2                                     # ... once
    with open(copy, "ab") as fh:                               # the same file name, other content
        fh.write(b"\n")
    finetune.run_or_reuse(config, tiny_run, out, local_data)
    assert len(calls) == 3


def test_a_csv_part_with_one_class_is_one_line_not_a_nan_score(tiny_run, cache_dir, tmp_path, capsys):
    """A user's classification CSV whose valid part has one class everywhere could only score NaN:
    `chmr-jax finetune` says which file and part, exit 2, before any training; a part where one task
    has both classes is scored (the one-class tasks are skipped and counted, as for the benchmarks)."""
    from chmr_jax import cli
    from chmr_jax.downstream import finetune
    path = tmp_path / "actives.csv"
    path.write_text("smiles,active\n" + "".join(f"{'C' * k}O,1\n" for k in range(1, 21)))
    argv = ["finetune", "--config", f"{CONFIGS / 'finetune.py'}:seeds=0", "--pretrained", str(tiny_run),
            "--workdir", str(tmp_path / "ft"), f"--config.cache_dir={cache_dir}", f"--config.csv={path}",
            "--config.task_type=classification", "--config.split=random", "--config.optim.epochs=1"]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chmr-jax")]   # (not the progress bar)
    assert len(err) == 1 and str(path) in err[0] and "valid part" in err[0] and "labels [1] only" in err[0], err
    assert not (tmp_path / "ft").exists()

    # The check itself, against the definition: a part passes when some task has both classes.
    class Dataset:
        task_type, split_over_accepted, source = "classification", True, "x.csv"
    split = {"train": np.arange(4), "valid": np.arange(4, 8), "test": np.arange(8, 12)}
    y = np.ones((12, 2))
    y[5, 1], y[9, 0] = 0.0, 0.0                      # task 1 has both classes in valid, task 0 in test
    finetune.check_scorable(Dataset, y, split)
    y[9, 0] = np.nan                                  # test: one class in each task (NaN is unlabelled)
    with pytest.raises(ValueError, match="test part"):
        finetune.check_scorable(Dataset, y, split)
    Dataset.split_over_accepted = False               # a benchmark keeps its protocol
    finetune.check_scorable(Dataset, y, split)
