"""The pretraining job end to end on the tiny config: configs, the CLI with overrides, metrics and
checkpoints, SIGKILL/SIGTERM resume with an identical loss curve, config errors, a modality with no
observed profile."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chmr_jax import cli, config_util
from chmr_jax.training import metric_writers, pretrain, workdir as workdir_lib
from helpers import event_class, read_event_records

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")


def test_config_files_and_variants():
    paper = config_util.load_config(str(ROOT / "configs" / "paper.py"))
    assert (paper.batch.batch_size, paper.optim.lr, paper.optim.weight_decay, paper.train.epochs) == (3072, 1e-4, 1e-8, 50)
    assert (paper.objective.lambda_sca, paper.objective.lambda_vq) == (10.0, 1.0)
    assert dict(paper.corpus.dims) == {"cell": 2749, "gene": 1973, "expression": 978}
    assert paper.model.molecular == "fingerprint,graph,geometry" and paper.geometry == "rdkit3d"   # 1D + 2D + 3D anchor
    pretrain.molecular_names(paper)                                   # a consistent config
    pod = config_util.load_config(str(ROOT / "configs" / "paper.py") + ":tpu_pod")
    assert pod.train.distributed and pod.objective.infonce_impl == "ring"
    default = config_util.load_config(str(ROOT / "configs" / "pretrain.py"))
    assert default.corpus.kind == "reachable" and default.model.gnn_layers == 5 and default.model.latent == 300
    assert default.pretrain_data.sca_mask == "observed"          # chosen by the lift experiments (issue 12)
    assert config_util.load_config(str(ROOT / "configs" / "default.py")).pretrain_data.sca_mask == "observed_or_propagated"
    assert config_util.load_config(str(ROOT / "configs" / "pretrain.py") + ":rdkit3d").geometry == "rdkit3d"
    with pytest.raises(ValueError, match="unknown config variant"):
        config_util.load_config(str(ROOT / "configs" / "paper.py") + ":nope")


def test_run_writes_metrics_checkpoints_and_summary(tiny_run):
    rows = metric_writers.read_jsonl(tiny_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))           # the override steps=10 took effect
    for r in rows:
        for key in ("loss", "loss/cpr", "loss/sca", "loss/vq", "grad_norm", "lr"):
            assert np.isfinite(r[key]), (r["step"], key)
    assert any(k.startswith("vq/") and "perplexity" in k for k in rows[0])
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[-1]["lr"] < rows[0]["lr"]   # release cosine decays
    assert sorted(int(p.name) for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 10]
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["devices"] == 8 and summary["molecules_per_s"] > 0
    assert summary["host_peak_rss_bytes"] > 0
    # Utilisation: XLA's FLOPs per step, the achieved rate over the steady steps, and its ratio to the
    # matmul rate measured at start, consistent with one another.
    assert summary["step_gflop"] > 0 and summary["matmul_gflop_per_s"] > 0
    # one device's share of the step's model FLOPs, unrounded (issue 21 §2); the GFLOP field is for reading
    assert isinstance(summary["step_flops_per_device"], int)
    assert summary["step_gflop"] == pytest.approx(summary["step_flops_per_device"] / 1e9, rel=1e-3)
    assert summary["utilisation"] == pytest.approx(summary["achieved_gflop_per_s"] / summary["matmul_gflop_per_s"],
                                                   rel=0.02, abs=1e-3)
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["train"]["steps"] == 10 and saved["corpus"]["kind"] == "synthetic"
    assert "modalities" in json.loads((tiny_run / "corpus_manifest.json").read_text())
    events = list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    decoded = [event_class().FromString(r) for r in read_event_records(events[0])]
    assert sorted(e.step for e in decoded for v in e.summary.value if v.tag == "loss") == list(range(1, 11))


def test_summary_records_the_excluded_molecules_and_the_initial_parameters_digest(tiny_run, tmp_path, cache_dir):
    """A run with corpus.exclude (a CSV of 5 of the corpus's molecules) trains on the rest and says so in
    summary.json (corpus_excluded, the profile rows lost) beside init_digest (issue 32)."""
    config = config_util.load_config(str(ROOT / "configs" / "test.py"))
    config.cache_dir = str(cache_dir)
    corpus = pretrain.load_corpus(config, None, cache_dir, log=lambda *a: None)
    chosen = list(corpus.smiles[:5])
    observed = {n: int(m.available[:5].sum()) for n, m in corpus.modalities.items()}
    csv = tmp_path / "held_out.csv"
    csv.write_text("smiles\n" + "".join(f"{s}\n" for s in chosen))
    workdir = tmp_path / "run"
    assert cli.main(["pretrain", "--config", str(ROOT / "configs" / "test.py"), "--workdir", str(workdir),
                     f"--config.cache_dir={cache_dir}", "--config.train.steps=2", f"--config.corpus.exclude={csv}",
                     "--config.train.devices=1"]) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["corpus_excluded"] == 5
    # Each excluded molecule had one aggregated profile per observed modality, from >= 1 profile rows.
    assert all(summary["corpus_excluded_profile_rows"][n] >= observed[n] for n in observed)
    assert json.loads((workdir / "corpus_manifest.json").read_text())["molecules"] == len(corpus) - 5
    assert summary["init_digest"] == json.loads((workdir / "init_digest.json").read_text())["init_digest"]
    assert json.loads((tiny_run / "summary.json").read_text())["corpus_excluded"] == 0


def test_rerun_of_a_finished_run_trains_no_further(tiny_run, cache_dir, capsys):
    before = (tiny_run / "metrics.jsonl").read_text()
    summary = (tiny_run / "summary.json").read_text()
    assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(tiny_run), f"--config.cache_dir={cache_dir}",
                     "--config.train.steps=10", "--config.train.checkpoint_every_steps=4"]) == 0
    # returns at once (no corpus, inputs or compilation) and keeps the original run's summary
    assert "already finished at step 10 of 10" in capsys.readouterr().out
    assert (tiny_run / "metrics.jsonl").read_text() == before and (tiny_run / "summary.json").read_text() == summary


def test_rerun_of_a_finished_full_schedule_says_so_and_keeps_the_summary(tmp_path, cache_dir, capsys):
    # steps=0: the full schedule (config.train.epochs), whose last step is only known to the saved run
    argv = ["pretrain", "--config", TEST_CONFIG, "--workdir", str(tmp_path / "run"), f"--config.cache_dir={cache_dir}",
            "--config.train.steps=0", "--config.train.epochs=1"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "molecules/s after compilation" in first
    summary = (tmp_path / "run" / "summary.json").read_text()
    total = json.loads(summary)["total_steps"]
    assert json.loads(summary)["steps"] == total > 0
    assert cli.main(argv) == 0
    again = capsys.readouterr().out
    assert f"already finished at step {total} of {total}" in again and "molecules/s" not in again
    assert (tmp_path / "run" / "summary.json").read_text() == summary   # wall time not grown


def test_restart_with_a_different_model_is_refused(tiny_run, cache_dir, capsys):
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(tiny_run), f"--config.cache_dir={cache_dir}",
                   "--config.model.latent=32"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "different config" in err and "model" in err and "new --workdir" in err


def test_wrong_dim_and_missing_modality_fail_at_start(tmp_path, cache_dir, capsys):
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(tmp_path / "a"), f"--config.cache_dir={cache_dir}",
                   "--config.corpus.dims.cell=21"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "config.corpus.dims.cell=21" in err and "has 20 features" in err
    config = config_util.load_config(TEST_CONFIG)
    config.cache_dir = str(cache_dir)
    config.corpus.dims.morphology = 7
    with pytest.raises(pretrain.ConfigError, match="modality 'morphology'.*has \\['cell', 'expression', 'gene'\\]"):
        pretrain.run(config, tmp_path / "b", log=lambda *a: None)
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(tmp_path / "c"), "--config.train.nope=1"])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_modality_with_no_observed_profile_trains_without_nan(tmp_path, cache_dir):
    config = config_util.load_config(TEST_CONFIG)
    corpus = pretrain.load_corpus(config, None, cache_dir, 1, log=lambda *a: None)
    gene = corpus.modalities["gene"]
    gene.values[:] = 0.0
    gene.available[:] = False
    corpus.save(tmp_path / "corpus")
    config.corpus.saved = str(tmp_path / "corpus")
    config.train.steps = 4
    summary = pretrain.run(config, tmp_path / "run", log=lambda *a: None)
    rows = metric_writers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 4 and summary["final_metrics"]["skipped"] == 0
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["sca/gene/rows"] == 0 and r["sca/gene/infonce"] == 0 for r in rows)


# ---- kill and resume (subprocesses: SIGKILL needs a process to kill) ----------------------------------

def _command(workdir, steps):
    return [sys.executable, "-m", "chmr_jax.cli", "pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir),
            f"--config.train.steps={steps}", "--config.train.checkpoint_every_steps=5", "--config.train.progress=log"]


def _env(cache_dir):
    env = {**os.environ, "CHMR_CACHE_DIR": str(cache_dir), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return env


def _wait_for_rows(workdir, n, proc, timeout=1200):   # a hang guard (a loaded machine compiles slowly)
    path = workdir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(metric_writers.read_jsonl(path)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {n}: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError(f"no step {n} within {timeout}s")


def _losses(workdir):
    return {r["step"]: r["loss"] for r in metric_writers.read_jsonl(workdir / "metrics.jsonl")}


STEPS = 40


@pytest.fixture(scope="module")
def reference_curve(tmp_path_factory, cache_dir):
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(_command(ref_dir, STEPS), env=_env(cache_dir), check=True, capture_output=True, cwd=ROOT)
    curve = _losses(ref_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    return curve, json.loads((ref_dir / "summary.json").read_text())


def test_killed_run_resumes_with_the_uninterrupted_loss_curve(tmp_path, cache_dir, reference_curve):
    # One run interrupted twice (three processes instead of two runs of two): first SIGTERM (graceful:
    # checkpoints the step it stopped at), then, after resuming, SIGKILL (no warning: resumes from the
    # last periodic checkpoint, redoing the steps after it).
    env = _env(cache_dir)
    reference, reference_summary = reference_curve
    run_dir = tmp_path / "killed"
    restored = []
    for kill_signal, after_rows in ((signal.SIGTERM, 12), (signal.SIGKILL, 26)):
        proc = subprocess.Popen(_command(run_dir, STEPS), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        _wait_for_rows(run_dir, after_rows, proc)
        proc.send_signal(kill_signal)
        out, _ = proc.communicate(timeout=120)
        killed_at = max(_losses(run_dir))
        assert killed_at < STEPS, "the run finished before it was killed; the test did not test resuming"
        if kill_signal == signal.SIGTERM:
            assert proc.returncode == 0 and "stopped by SIGTERM" in out, out
            assert (run_dir / "checkpoints" / str(killed_at)).is_dir()
        else:
            assert proc.returncode == -signal.SIGKILL
            assert re.search(r"resumed from \S+ \(step (\d+) of", out), out
        restored.append(killed_at)

    resumed = subprocess.run(_command(run_dir, STEPS), env=env, capture_output=True, text=True, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    restored_from = int(re.search(r"resumed from \S+ \(step (\d+) of", resumed.stdout).group(1))
    assert restored[0] < restored_from <= restored[1]
    curve = _losses(run_dir)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve == reference   # bit-identical: same data order, keys and state after each restore
    # The summary covers the whole run, not only the last process: the totals saved with each
    # checkpoint carry the molecules (and time) of the earlier processes up to that checkpoint.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["molecules_seen"] == reference_summary["molecules_seen"]
    assert summary["this_process"]["molecules"] < summary["molecules_seen"]
    assert summary["wall_s"] > summary["this_process"]["wall_s"]


def test_nan_inputs_skip_updates_then_stop_with_a_clear_error(tmp_path, cache_dir):
    config = config_util.load_config(TEST_CONFIG)
    corpus = pretrain.load_corpus(config, None, cache_dir, 1, log=lambda *a: None)
    corpus.modalities["cell"].values[corpus.modalities["cell"].available] = np.nan
    corpus.save(tmp_path / "corpus")
    config.corpus.saved = str(tmp_path / "corpus")
    config.train.steps = 20
    config.train.max_skipped = 3
    with pytest.raises(pretrain.TrainingDiverged, match="3 updates skipped.*max_skipped=3"):
        pretrain.run(config, tmp_path / "run", log=lambda *a: None)
    rows = metric_writers.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [1, 2, 3] and all(r["loss"] == "nan" for r in rows)
    # The stop is checkpointed, so the run can be inspected or resumed after a fix.
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()


def test_load_pretrained_rebuilds_the_encoder_in_eval_mode(tiny_run, tmp_path):
    import jax
    from flax import nnx

    model, config, meta = pretrain.load_pretrained(tiny_run)
    assert meta["step"] == 10 and config.model.latent == 16
    assert (tiny_run / "model_dims.json").exists()
    early, _, meta4 = pretrain.load_pretrained(tiny_run, step=4)
    assert meta4["step"] == 4
    diff = jax.tree_util.tree_map(lambda a, b: float(abs(a - b).max()), nnx.state(model, nnx.Param),
                                  nnx.state(early, nnx.Param))
    assert max(jax.tree_util.tree_leaves(diff)) > 0          # training moved the parameters
    assert model.gnn.dropout.deterministic and model.gnn.norms[0].use_running_average
    with pytest.raises(FileNotFoundError, match="not a chmr_jax pretraining workdir"):
        pretrain.load_pretrained(tmp_path)


def test_finetune_command_on_a_benchmark_with_the_pretrained_encoder(tiny_run, data_dir, cache_dir, tmp_path):
    out = tmp_path / "ft"
    rc = cli.main(["finetune", "--config", str(ROOT / "configs" / "finetune.py") + ":dataset=bace,seeds=0,1",
                   "--pretrained", str(tiny_run), "--workdir", str(out), f"--config.cache_dir={cache_dir}",
                   "--config.optim.epochs=3", "--config.head.hidden=32",
                   "--config.head.parts=fingerprint_raw,fingerprint,graph,tree,expression"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    # raw fingerprint (256 Morgan + 167 MACCS) + 2 projections (16) + tree one-hot (2+4+8) + expression (16)
    assert result["head_input"]["width"] == 256 + 167 + 2 * 16 + 14 + 16
    assert result["dataset"] == "bace" and result["metric"] == "roc_auc" and result["pretrained_step"] == 10
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for r in result["runs"]:
        assert 0.0 <= r["test"]["roc_auc"] <= 1.0 and r["test"]["tasks_evaluated"] == 1 and r["epochs_run"] <= 3
    assert result["test_mean"] == pytest.approx(np.mean([r["test"]["roc_auc"] for r in result["runs"]]))
    # The untrained control (same architecture, config and seed, no pretraining step) on the same
    # seeds, and the paired lift = pretrained - untrained per seed.
    control = {r["seed"]: r["test"]["roc_auc"] for r in result["methods"]["untrained"]["runs"]}
    ours = {r["seed"]: r["test"]["roc_auc"] for r in result["runs"]}
    assert sorted(control) == [0, 1]
    diffs = [ours[s] - control[s] for s in (0, 1)]
    assert result["lift"]["per_seed"] == {"0": pytest.approx(diffs[0]), "1": pytest.approx(diffs[1])}
    assert result["lift"]["mean"] == pytest.approx(np.mean(diffs)) and result["lift"]["std"] == pytest.approx(np.std(diffs, ddof=1))
    assert cli.main(["finetune", "--config", str(ROOT / "configs" / "finetune.py") + ":dataset=nope",
                     "--pretrained", str(tiny_run), "--workdir", str(out)]) == 2


def test_benchmark_command_writes_a_table_with_the_papers_numbers(tiny_run, data_dir, cache_dir, tmp_path):
    out = tmp_path / "bench"
    args = ["benchmark", "--datasets", "bace,biogenadme", "--config.seeds=0,1", "--pretrained", str(tiny_run),
            "--workdir", str(out), f"--config.cache_dir={cache_dir}", "--config.optim.epochs=2",
            "--config.optim.encoder_epochs=1", "--config.head.hidden=16", "--config.rf.trees=10",
            "--config.ensemble.enabled=True"]
    assert cli.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["dataset"] for r in results] == ["bace", "biogenadme"]
    assert results[1]["metric"] == "mae" and len(results[1]["runs"]) == 2
    # Every method on the same seeds; the RF ensemble only on bace (classification, spec §8).
    assert set(results[0]["methods"]) == {"chmr", "untrained", "chmr+rf", "mlp", "rf", "gnn"}
    assert set(results[1]["methods"]) == {"chmr", "untrained", "mlp", "rf", "gnn"}
    for method in results[1]["methods"].values():
        assert [r["seed"] for r in method["runs"]] == [0, 1] and method["test_mean"] > 0
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| dataset | metric | seeds | chmr_jax | untrained encoder | chmr_jax + RF | MLP (ours) "
                               "| RF (ours) | GNN scratch (ours) | lift (paired) |")
    assert table[3].startswith("| biogenadme | mae | 2 |") and "40.9 +- 0.3" in table[3]   # paper CHMR, spec §9
    assert table[-1].startswith("GNN scratch: ") and "at most 1 epochs" in table[-1]
    # lift.json: MAE's lift is untrained - pretrained (positive = pretrained better); best baseline = lowest MAE.
    lift = json.loads((out / "lift.json").read_text())
    assert lift["seeds"] == [0, 1] and lift["pretrain_steps"] == 10 and lift["command"].startswith("chmr-jax benchmark")
    bio, m = lift["datasets"]["biogenadme"], results[1]["methods"]
    assert bio["metric"] == "mae" and bio["higher_is_better"] is False
    assert bio["lift"]["mean"] == pytest.approx(m["untrained"]["test_mean"] - m["chmr"]["test_mean"])
    best = min(("mlp", "rf", "gnn"), key=lambda k: m[k]["test_mean"])
    assert bio["best_baseline"] == {"name": best, "mean": m[best]["test_mean"], "std": m[best]["test_std"]}
    assert lift["datasets"]["bace"]["pretrained"]["mean"] == results[0]["methods"]["chmr"]["test_mean"]
    assert (out / "bace" / "results.json").exists()
    # A second run with the same settings reuses the per-dataset results (an interrupted run continues).
    (out / "results.md").unlink()
    before = (out / "bace" / "results.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "bace" / "results.json").stat().st_mtime_ns == before and (out / "results.md").exists()
    assert cli.main(["benchmark", "--datasets", "nope", "--pretrained", str(tiny_run), "--workdir", str(out)]) == 2


def test_benchmark_adds_a_baseline_without_refitting_the_finished_runs(tiny_run, data_dir, cache_dir, tmp_path,
                                                                      monkeypatch):
    from chmr_jax.downstream import embeddings, head
    out = tmp_path / "bench"
    args = ["benchmark", "--datasets", "bace", "--config.seeds=0,1", "--pretrained", str(tiny_run), "--workdir",
            str(out), f"--config.cache_dir={cache_dir}", "--config.optim.epochs=1", "--config.head.hidden=16",
            "--config.rf.trees=5"]
    assert cli.main(args + ["--config.baselines=mlp"]) == 0
    first = json.loads((out / "bace" / "results.json").read_text())
    fail = lambda *a, **k: pytest.fail("re-embedded or refitted a run the first benchmark finished")
    monkeypatch.setattr(head, "fit", fail)
    monkeypatch.setattr(embeddings, "embed", fail)
    assert cli.main(args + ["--config.baselines=mlp,rf"]) == 0
    second = json.loads((out / "bace" / "results.json").read_text())
    assert set(second["methods"]) == {"chmr", "untrained", "mlp", "rf"}
    for method in ("chmr", "untrained", "mlp"):
        assert second["methods"][method] == first["methods"][method]
    assert [r["seed"] for r in second["methods"]["rf"]["runs"]] == [0, 1] and second["lift"] == first["lift"]
    assert second["settings"]["config"]["baselines"] == "mlp,rf"
    # --table_only: the finished datasets' table without computing (bbbp was never run: left out).
    (out / "lift.json").unlink()
    assert cli.main(["benchmark", "--datasets", "bbbp,bace", "--pretrained", str(tiny_run), "--workdir",
                     str(out), "--table_only"]) == 0
    lift = json.loads((out / "lift.json").read_text())
    assert list(lift["datasets"]) == ["bace"] and lift["datasets"]["bace"]["baselines_run"] == ["mlp", "rf"]
    assert cli.main(["benchmark", "--pretrained", str(tiny_run), "--workdir", str(tmp_path / "none"),
                     "--table_only"]) == 2


def test_finetune_on_a_generic_csv_with_the_whole_encoder_trained(tiny_run, data_dir, cache_dir, tmp_path):
    """--config.csv: any CSV with a SMILES column (here 300 ClinTox rows, its two task columns plus an
    unrelated column we exclude) fine-tuned end to end (encoder='finetune')."""
    rows = (data_dir / "moleculenet" / "clintox.csv").read_text().splitlines()
    csv = tmp_path / "my_assays.csv"
    csv.write_text("\n".join(["ID,SMILES,FDA_APPROVED,CT_TOX"] +
                             [f"mol{i},{r}" for i, r in enumerate(rows[1:301])]) + "\n")
    out = tmp_path / "ft"
    rc = cli.main(["finetune", "--config", str(ROOT / "configs" / "finetune.py") + ":seeds=3", "--pretrained",
                   str(tiny_run), "--workdir", str(out), f"--config.cache_dir={cache_dir}",
                   f"--config.csv={csv}", "--config.smiles_column=SMILES", "--config.task_columns=FDA_APPROVED,CT_TOX",
                   "--config.encoder=finetune", "--config.optim.encoder_epochs=2", "--config.head.hidden=16",
                   "--config.baselines=mlp"])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "my_assays" and result["tasks"] == 2
    assert result["molecules"] + result["rejects"] == 300 and result["molecules"] > 280
    assert result["encoder"] == "finetune" and set(result["methods"]) == {"chmr", "untrained", "mlp"}
    run = result["runs"][0]
    assert run["seed"] == 3 and run["epochs_run"] <= 2 and 0 <= run["test"]["roc_auc"] <= 1
    bad = cli.main(["finetune", "--config", str(ROOT / "configs" / "finetune.py"), "--pretrained", str(tiny_run),
                    "--workdir", str(out), f"--config.csv={csv}", "--config.task_columns=pIC50"])
    assert bad == 2


def test_stress_command_hides_profiles_and_reports_each_level_and_imputation(data_dir, cache_dir, tmp_path):
    # One level and two imputations (two pretrain + finetune runs: the CI budget); the table's layout
    # for several levels is checked on made-up rows below.
    from chmr_jax.downstream import stress
    out = tmp_path / "stress"
    args = ["stress", "--config", TEST_CONFIG, "--workdir", str(out), "--missing", "0.5",
            "--imputations", "propagate,zero", "--dataset", "bace", "--steps", "2", "--finetune_epochs", "2",
            f"--config.cache_dir={cache_dir}", "--config.train.log_every_steps=100"]
    assert cli.main(args) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [(r["missing"], r["imputation"]) for r in rows] == [(0.5, "propagate"), (0.5, "zero")]
    for r in rows:
        assert r["dataset"] == "bace" and 0.0 <= r["test_mean"] <= 1.0
    hidden = json.loads((out / "corpus-missing0.5" / "manifest.json").read_text())["hidden"]
    assert hidden["fraction"] == 0.5 and set(hidden["modalities"]) == {"cell", "gene", "expression"}
    from chmr_jax.data import corpus as corpus_lib
    saved = corpus_lib.Corpus.load(out / "corpus-missing0.5")
    for name, counts in hidden["modalities"].items():
        assert counts["hidden"] == round(0.5 * counts["observed_before"]) > 0
        left = int(saved.modalities[name].available.sum())      # what the saved corpus really holds
        assert rows[0]["observed"][name] == left == counts["observed_before"] - counts["hidden"]
    # The pretraining runs saw the hidden corpus and their imputation.
    run = out / "zero-missing0.5" / "pretrain"
    assert json.loads((run / "config.json").read_text())["pretrain_data"]["imputation"] == "zero"
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| extra missing | observed profiles | propagate (roc_auc x100) | zero")
    assert len(table) == 3 and table[2].startswith("| 0.5 |")
    # The structure-only arm (issue 32): pretrained once without any cellular modality, its score one
    # column of the table, each row's paired difference over it recorded.
    struct = out / "structure_only"
    assert json.loads((struct / "pretrain" / "config.json").read_text())["pretrain_data"]["modalities"] == "none"
    assert json.loads((struct / "pretrain" / "model_dims.json").read_text())["cell_dims"] == {}
    s_result = json.loads((struct / "finetune" / "results.json").read_text())
    assert table[0].endswith("| structure-only pretraining |")
    for r in rows:
        assert r["structure_only_mean"] == s_result["test_mean"]
        own = json.loads((out / f"{r['imputation']}-missing0.5" / "finetune" / "results.json").read_text())
        assert r["lift_over_structure"]["mean"] == pytest.approx(np.mean(
            [a["test"]["roc_auc"] - b["test"]["roc_auc"] for a, b in zip(own["runs"], s_result["runs"])]))
    width, height = stress.read_png_size(out / "stress.png")
    assert width > 300 and height > 200
    # Re-running reuses every stage (nothing retrained): the fine-tuning results are untouched.
    before = (out / "zero-missing0.5" / "finetune" / "results.json").stat().st_mtime_ns
    assert cli.main(args) == 0
    assert (out / "zero-missing0.5" / "finetune" / "results.json").stat().st_mtime_ns == before
    assert cli.main(args[:-2] + ["--missing", "1.5"]) == 2        # a bad flag value: one line, exit 2


def test_stress_table_has_a_row_per_level_and_a_column_per_imputation():
    from chmr_jax.downstream import stress
    rows = [{"missing": f, "imputation": m, "metric": "roc_auc", "test_mean": 0.7 - f / 10 - (m == "zero") / 100,
             "test_std": 0.01, "observed": {"cell": int(100 * (1 - f))}} for f in (0.0, 0.5) for m in ("propagate", "zero")]
    table = stress.format_table(rows)
    assert table.splitlines() == [
        "| extra missing | observed profiles | propagate (roc_auc x100) | zero (roc_auc x100) |",
        "|---|---|---|---|",
        "| 0 | cell 100 | 70.0 +- 1.0 | 69.0 +- 1.0 |",
        "| 0.5 | cell 50 | 65.0 +- 1.0 | 64.0 +- 1.0 |"]
    # With the untrained control: each cell adds the paired lift, and the control has its own column.
    for r in rows:
        r.update(untrained_mean=0.6, untrained_std=0.02, lift={"mean": r["test_mean"] - 0.6, "std": 0.005})
    assert stress.format_table(rows).splitlines()[::3] == [
        "| extra missing | observed profiles | propagate (roc_auc x100) | zero (roc_auc x100) | untrained control |",
        "| 0.5 | cell 50 | 65.0 +- 1.0 (+5.0 +- 0.5) | 64.0 +- 1.0 (+4.0 +- 0.5) | 60.0 +- 2.0 |"]


def test_stress_never_finetunes_an_interrupted_pretraining(monkeypatch, tmp_path):
    from chmr_jax import config_util
    from chmr_jax.downstream import stress
    monkeypatch.setattr(pretrain, "load_corpus", lambda *a, **k: pytest.fail("corpus already saved"))
    (tmp_path / "corpus-missing0").mkdir()
    (tmp_path / "corpus-missing0" / "manifest.json").write_text(json.dumps({"hidden": {"modalities": {}}}))
    monkeypatch.setattr(pretrain, "run", lambda *a, **k: {"steps": 3, "stopped_by": "SIGTERM"})
    monkeypatch.setattr(stress.finetune, "run_or_reuse", lambda *a, **k: pytest.fail("fine-tuned a partial run"))
    config = config_util.load_config(TEST_CONFIG)
    config.train.steps = 5
    with pytest.raises(KeyboardInterrupt, match="stopped at step 3"):
        stress.run(config, None, [0.0], ["zero"], tmp_path)


def test_first_step_loss_does_not_depend_on_padding_or_device_count(tmp_path, cache_dir):
    """Through the CLI: the same model and molecules on 1 device (17 graph slots for 16 molecules)
    and on 8 devices (slots rounded up to 24) give the same first-step loss and terms. Before padding
    was masked out of CPR's mean, the two differed by 3e-3 (122.03 vs 121.62); float32 rounding of
    the two reduction orders is ~1e-6 relative (two-pass batch-norm variance). In the global layout
    (device_blocks=False): per-device blocks put the molecules in other graph slots, and the context
    walks draw their steps per slot, so their CPR term is another sample (test_graphs checks that the
    blocked encoder itself is the same function)."""
    rows = {}
    for devices in (1, 8):
        workdir = tmp_path / f"d{devices}"
        assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                         "--config.train.steps=1", f"--config.train.devices={devices}",
                         "--config.batch.device_blocks=False"]) == 0
        rows[devices] = metric_writers.read_jsonl(workdir / "metrics.jsonl")[0]
        budget = json.loads((workdir / "summary.json").read_text())
        assert budget["devices"] == devices
    one, eight = rows[1], rows[8]
    for key in ("loss", "loss/cpr", "loss/sca", "loss/vq", "cpr/molecule", "cpr/cell", "sca/cell/infonce"):
        assert one[key] == pytest.approx(eight[key], rel=2e-5, abs=1e-6), key
    assert one["sca/cell/rows"] == eight["sca/cell/rows"]


def test_vicreg_invariance_is_not_zero_with_sca_on_measured_rows(tmp_path, cache_dir):
    """Through the CLI, configs/pretrain.py's SCA mask (measured rows only): the first step logs a
    non-zero VICReg invariance for every cellular modality with rows in the batch. With the clamped
    propagated copy as the second view it was exactly 0.0 (issue 21)."""
    workdir = tmp_path / "observed"
    assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                     "--config.train.steps=1", "--config.pretrain_data.sca_mask=observed"]) == 0
    row = metric_writers.read_jsonl(workdir / "metrics.jsonl")[0]
    names = [k.split("/")[1] for k in row if k.startswith("sca/") and k.endswith("/invariance")]
    assert names
    used = [n for n in names if row[f"sca/{n}/rows"] > 1]
    assert used, row
    for name in used:
        assert row[f"sca/{name}/invariance"] > 0, (name, row)


def test_step_flops_per_device_of_one_global_batch_on_1_and_8_devices(tmp_path, cache_dir):
    """Through the CLI and summary.json: 15 molecules per step pad to the same global budget on 1 and 8
    devices (16 graph slots, node / edge budgets multiples of 32, the global layout), so each of 8 devices does 1/8 of the
    one device's FLOPs. The count used to be XLA's count of the unpartitioned program divided by
    nothing: the same number on 8 devices as on 1 (utilisation overstated 8x; issue 21 §2)."""
    got = {}
    for devices in (1, 8):
        workdir = tmp_path / f"d{devices}"
        assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                         "--config.train.steps=1", f"--config.train.devices={devices}",
                         "--config.batch.batch_size=15", "--config.batch.device_blocks=False"]) == 0
        got[devices] = json.loads((workdir / "summary.json").read_text())
    one, eight = got[1]["step_flops_per_device"], got[8]["step_flops_per_device"]
    assert isinstance(one, int) and isinstance(eight, int) and one > 0
    assert abs(one - 8 * eight) <= 8          # integer division of the same total


def test_one_argument_parser_for_every_config_file():
    parse = config_util.parse_arg
    assert parse(None, variant="default").variant == "default"
    assert parse("paper", variant="default").variant == "paper"
    got = parse("dataset=bace,seeds=0,1,2,control=false,rf_trees=7", dataset="x", seeds="0", control=True, rf_trees=1)
    assert (got.dataset, got.seeds, got.control, got.rf_trees) == ("bace", "0,1,2", False, 7)
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        parse("nope=1", dataset="x")
    with pytest.raises(ValueError, match="not a int"):
        parse("rf_trees=many", rf_trees=1)
    with pytest.raises(ValueError, match="not key=value"):
        parse("stray", dataset="x")
    ft = config_util.load_config(str(ROOT / "configs" / "finetune.py") + ":dataset=bace,seeds=0,1,encoder=finetune")
    assert (ft.dataset, ft.seeds, ft.encoder) == ("bace", "0,1", "finetune")
    with pytest.raises(ValueError, match="not key=value"):
        config_util.load_config(TEST_CONFIG + ":paper")      # the tiny config takes no argument


def test_config_sections_are_the_components_keyword_arguments():
    # Every key of these sections is an argument of the component built from it (a key the
    # constructor lacks would raise TypeError), including after the JSON round trip of config.json.
    import dataclasses

    import ml_collections
    from chmr_jax.mechanisms import objective
    from chmr_jax.training import pretrain_data, train
    config = config_util.load_config(TEST_CONFIG)
    saved = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
    cfg = pretrain.objective_config(saved)
    assert isinstance(cfg.vicreg_weights, tuple) and cfg == objective.ObjectiveConfig(**config.objective)
    data = pretrain.data_config(saved, n_devices=3)
    assert (data.batch_size, data.knn_k, data.modalities) == (16, 5, "all")
    assert (data.pad_multiple, data.graph_multiple, data.device_blocks) == (32, 3, True)   # 3 blocks of multiples of 32
    saved.batch.device_blocks = False
    data = pretrain.data_config(saved, n_devices=3)
    assert (data.pad_multiple, data.graph_multiple) == (96, 3)          # lcm(32, 3): every device the same share
    fields = {f.name for f in dataclasses.fields(pretrain_data.DataConfig)}
    assert set(config.batch) | set(config.pretrain_data) <= fields
    train.make_optimizer(**saved.optim, total_steps=10)
    model = pretrain.build_model(saved, {"mol_dims": {"fingerprint": 8, "graph": saved.model.gnn_width},
                                         "cell_dims": {"cell": 4}, "target_dims": {"molecule": 6}})
    assert model.gnn is not None and model.mol_names == ["fingerprint", "graph"]


def test_a_workdir_saved_before_a_config_field_existed_still_resumes(tmp_path):
    config = config_util.load_config(TEST_CONFIG)
    saved = json.loads(config.to_json_best_effort())
    for section, key in workdir_lib.ADDED_FIELDS:
        del saved[section][key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    # VICReg's held-out second view changed the objective: an old run does not silently resume with it...
    with pytest.raises(pretrain.ConfigError, match="pretrain_data.vicreg_second_view: 'propagated' -> 'held_out'"):
        workdir_lib.check_same_run(tmp_path, config)
    config.pretrain_data.vicreg_second_view = "propagated"
    workdir_lib.check_same_run(tmp_path, config)        # ...but with what it did, it is accepted
    workdir_lib.check_same_run(tmp_path, config, n_devices=1)   # one device: either batch layout is the same
    # On several devices the per-device blocks are other batches than the run's global layout...
    with pytest.raises(pretrain.ConfigError, match="batch.device_blocks: False -> True.*did not exist"):
        workdir_lib.check_same_run(tmp_path, config, n_devices=8)
    config.batch.device_blocks = False
    workdir_lib.check_same_run(tmp_path, config, n_devices=8)   # ...which the saved value restores
    config.objective.collapse_every = 2                 # diagnostics do not define the run
    workdir_lib.check_same_run(tmp_path, config, n_devices=8)
    config.model.dtype = "bfloat16"                     # a real change is still refused
    with pytest.raises(pretrain.ConfigError, match="model.dtype: 'float32' -> 'bfloat16'"):
        workdir_lib.check_same_run(tmp_path, config)


def _copy_of_finished_run(tiny_run, tmp_path):
    """A copy of the tiny run as a killed one would leave it (no summary.json), to restart."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    (workdir / "summary.json").unlink()
    return workdir


def test_restoring_after_a_width_change_exits_2_with_every_checkpoint_in_place(tiny_run, cache_dir, tmp_path, capsys):
    # The run was built from a corpus with 21 cell features; the corpus was rebuilt since (20 now). The
    # config is unchanged, so only the model's dims can tell.
    workdir = _copy_of_finished_run(tiny_run, tmp_path)
    dims = json.loads((workdir / "model_dims.json").read_text())
    dims["cell_dims"]["cell"] = 21
    (workdir / "model_dims.json").write_text(json.dumps(dims))
    metrics = (workdir / "metrics.jsonl").read_text()
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                   "--config.train.steps=12", "--config.train.checkpoint_every_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "cell_dims.cell 21 -> 20" in err and "corpus" in err and "new --workdir" in err
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "4", "8"]
    assert not (workdir / "corrupt").exists() and (workdir / "metrics.jsonl").read_text() == metrics
    assert json.loads((workdir / "model_dims.json").read_text()) == dims


def test_quarantined_checkpoints_keep_a_run_from_starting_over(tiny_run, cache_dir, tmp_path, capsys):
    workdir = _copy_of_finished_run(tiny_run, tmp_path)
    (workdir / "corrupt").mkdir()
    for p in (workdir / "checkpoints").iterdir():
        p.rename(workdir / "corrupt" / f"{p.name}-1700000000")
    metrics = (workdir / "metrics.jsonl").read_text()
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                   "--config.train.steps=12", "--config.train.checkpoint_every_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "quarantined" in err and "step 0" in err
    assert (workdir / "metrics.jsonl").read_text() == metrics and not list((workdir / "checkpoints").iterdir())


def test_a_final_checkpoint_that_fails_its_read_back_does_not_finish_the_run(tmp_path, cache_dir, monkeypatch, capsys):
    """The last save is read back when the checkpointer closes; when it fails, it is moved to corrupt/.
    The run must then not write a summary naming it (fine-tuning would silently load an older step)."""
    from chmr_jax.training import checkpoint as checkpoint_lib
    real = checkpoint_lib.Checkpointer.restore

    def restore(self, template, step=None, *a, **k):
        if step == 6 and self.directory.name == "checkpoints":
            raise checkpoint_lib.CorruptCheckpoint(f"{self.directory}/6: digest mismatch (simulated)")
        return real(self, template, step, *a, **k)
    monkeypatch.setattr(checkpoint_lib.Checkpointer, "restore", restore)
    workdir = tmp_path / "run"
    rc = cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                   "--config.train.steps=6", "--config.train.checkpoint_every_steps=4"])
    err = capsys.readouterr().err
    assert rc == 2 and "final checkpoint of step 6 failed its read-back check" in err and "step 4" in err
    assert not (workdir / "summary.json").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


def test_collapse_every_logs_the_statistics_on_their_steps_only(tmp_path, cache_dir):
    """collapse_every=2, logged every step for 3 steps: step 2 carries the collapse statistics (finite),
    steps 1 and 3 (the final one) carry none (not NaN placeholders), nor does summary.json; a value
    that does not divide log_every_steps is refused (exit 2)."""
    workdir = tmp_path / "every2"
    assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(workdir), f"--config.cache_dir={cache_dir}",
                     "--config.train.steps=3", "--config.train.log_every_steps=2",
                     "--config.objective.collapse_every=2"]) == 0
    rows = {r["step"]: r for r in metric_writers.read_jsonl(workdir / "metrics.jsonl")}
    assert sorted(rows) == [2, 3]
    assert [k for k in rows[2] if k.startswith("collapse/")] and all(
        np.isfinite(v) for k, v in rows[2].items() if k.startswith("collapse/"))
    assert not [k for k in rows[3] if k.startswith("collapse/")]
    summary = json.loads((workdir / "summary.json").read_text())
    assert not [k for k in summary["final_metrics"] if k.startswith("collapse/")]
    assert cli.main(["pretrain", "--config", TEST_CONFIG, "--workdir", str(tmp_path / "bad"),
                     f"--config.cache_dir={cache_dir}", "--config.train.log_every_steps=3",
                     "--config.objective.collapse_every=2"]) == 2
