"""The `chmr-jax prepare` command end to end on shared data and on a user CSV."""
import re

import numpy as np
import pytest

from chmr_jax import cli


def test_prepare_benchmarks_prints_counts_and_splits(data_dir, cache_dir, capsys):
    assert cli.main(["prepare", "--dataset", "chembl2k,bace", "--data_dir", str(data_dir),
                     "--cache_dir", str(cache_dir), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"chembl2k\s+2355\s+2355\s+41\s+class\s+0\s+1413\s+353\s+589", out)
    assert re.search(r"bace\s+1513\s+1513\s+1\s+class\s+0\s+1210\s+151\s+152", out)
    assert re.search(r"prepared 2 dataset\(s\): 3868 molecules, 0 rejected, [\d.]+s wall", out)
    assert list(cache_dir.glob("chembl2k-*.npz")) and list(cache_dir.glob("chembl2k-split-paper_scaffold-*.json"))


def test_prepare_csv_reports_rejects(tmp_path, capsys):
    path = tmp_path / "mine.csv"
    rows = ["CCO,5.1", "not_a_smiles,6.0", "c1ccccc1O,7.2", ",4"] + [f"{s},{i}" for i, s in enumerate(_alcohols(12)[2:])]
    path.write_text("SMILES,pIC50\n" + "\n".join(rows) + "\n")
    assert cli.main(["prepare", "--csv", str(path), "--smiles_column", "SMILES", "--split", "random",
                     "--geometry", "rdkit3d", "--cache_dir", str(tmp_path / "cache"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    # 14 rows, 12 molecules, 2 rejects; the split is over the 12 accepted molecules
    assert re.search(r"mine\s+14\s+12\s+1\s+regre\s+2\s+9\s+1\s+2\s+0", captured.out), captured.out
    (rejects,) = (tmp_path / "cache").glob("mine-*.rejects.csv")
    # row: the 0-based data row, header excluded (embed's manifest and embed_smiles number rejects so too)
    assert rejects.read_text().splitlines() == ["row,smiles,reason", "1,not_a_smiles,unparsable SMILES",
                                                "3,,empty molecule (no atoms)"]
    assert "2 of 14 molecules rejected" in captured.err


def test_unknown_command_and_dataset(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 2 and "prepare" in capsys.readouterr().err
    import pytest
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--dataset", "tox21"])
    assert "unknown dataset(s) ['tox21']" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("name,y\na,1\n", "no SMILES column 'smiles'; columns are ['name', 'y']"),
    ("smiles,y\nCCO,abc\n", "line 2, column 'y': label 'abc' is not a number"),
    ("", "empty file"),
    (None, "no such file"),
])
def test_prepare_reports_a_bad_csv_in_one_line_and_exits_2(tmp_path, capsys, content, message):
    path = tmp_path / "assays.csv"
    if content is not None:
        path.write_text(content)
    assert cli.main(["prepare", "--csv", str(path), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"chmr-jax prepare: {path}") and message in err and len(err.splitlines()) == 1


def test_prepare_with_user_supplied_geometry_matrix(tmp_path, capsys):
    import numpy as np
    from chmr_jax.data import datasets, featurize, prepare
    path = tmp_path / "mine.csv"
    path.write_text("smiles,y\nCCO,1\nc1ccccc1O,0\nCCN,1\n")
    matrix = tmp_path / "unimol.npz"
    np.savez(matrix, keys=np.array(["LFQSCWFLJHTTHZ", "QUSNBJAOOMFDIB"]), data=np.eye(2, 4))
    ds = datasets.load_csv(path)
    prepared = prepare.prepare(ds, featurize.FeaturizerSettings(), None, "random", str(matrix), n_workers=1,
                               check_split=False)   # 3 molecules: too few for three labelled parts
    # CCO (LFQSCWFLJHTTHZ) has row 0; phenol has no row; CCN (QUSNBJAOOMFDIB) has row 1.
    assert prepared.geometry.ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(prepared.geometry.values, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert prepared.row()["3d_fail"] == 1
    import pytest
    with pytest.raises(ValueError, match="does not exist"):
        prepare.prepare(ds, featurize.FeaturizerSettings(), None, "random", str(tmp_path / "nope.npz"), check_split=False)


# ---- issue 25: every error in what the user gave is one line and exit 2; every command's help is complete

@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--config", "configs/tst.py", "--workdir", "{tmp}/run"],
     "config file configs/tst.py not found; did you mean "),
    (["finetune", "--config", "{repo}/configs/finetune.py:dataset=bace,seedz=0", "--pretrained", "{tmp}/p",
      "--workdir", "{tmp}/ft"], "unknown key 'seedz'"),
    (["pretrain", "--config", "{repo}/configs/test.py", "--workdir", "{tmp}/run", "--config.train.stepz=3"],
     "--config.train.stepz: config.train has no field 'stepz'; did you mean --config.train.steps?"),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    from pathlib import Path
    repo = Path(cli.__file__).resolve().parents[1]
    rc = cli.main([a.format(tmp=tmp_path, repo=repo) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not list(tmp_path.iterdir())   # nothing created either


def test_report_checks_the_benchmark_name_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"   # not even a workdir: the name is checked first, nothing is created
    assert cli.main(["report", "--pretrained", str(run), "--benchmark", "foo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chmr-jax report: --benchmark 'foo': unknown benchmark") and len(err.splitlines()) == 1
    assert not run.exists()


def test_benchmark_that_fails_leaves_no_empty_dataset_folder(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()   # a data directory without bace (CHMR_OFFLINE: no download)
    out = tmp_path / "bench"
    rc = cli.main(["benchmark", "--datasets", "bace", "--pretrained", str(tiny_run), "--workdir", str(out),
                   "--data_dir", str(tmp_path / "empty"), "--config.seeds=0", "--config.baselines="])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert not (out / "bace").exists()


def _alcohols(n):
    return [f"{'C' * k}O" for k in range(1, n + 1)]


def test_csv_split_is_over_accepted_molecules_and_rejects_name_data_rows(tmp_path):
    from chmr_jax.data import datasets, featurize, prepare
    smiles = _alcohols(20)
    smiles[1:1] = ["not_a_smiles"]    # data row 1 (file line 3)
    smiles[5:5] = ["C1CC"]            # data row 5 (file line 7; unclosed ring)
    path = tmp_path / "mine.csv"
    path.write_text("smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(smiles)))
    ds = datasets.load_csv(path)
    prepared = prepare.prepare(ds, featurize.FeaturizerSettings(), tmp_path / "cache", "random", n_workers=1)
    parts = np.concatenate([prepared.split[p] for p in ("train", "valid", "test")])
    # every accepted molecule in exactly one part, no rejected row taking a slot
    assert sorted(parts.tolist()) == prepared.features.rows.tolist() and len(parts) == 20
    assert [len(prepared.split_indices(p)) for p in ("train", "valid", "test")] == [16, 2, 2]
    (rejects,) = (tmp_path / "cache").glob("mine-*.rejects.csv")
    lines = rejects.read_text().splitlines()
    assert lines[0] == "row,smiles,reason" and [l.split(",")[:2] for l in lines[1:]] == [["1", "not_a_smiles"],
                                                                                         ["5", "C1CC"]]


def test_csv_split_part_without_a_labelled_molecule_is_one_line(tmp_path, capsys):
    path = tmp_path / "tiny.csv"   # 7 accepted molecules: a 80/10/10 random split leaves valid empty
    path.write_text("smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(_alcohols(7))) + "not_a_smiles,8\n")
    rc = cli.main(["prepare", "--csv", str(path), "--split", "random", "--cache_dir", str(tmp_path / "cache"),
                   "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith(f"chmr-jax prepare: {path}: the valid part of the random split has no "
                                      "labelled molecule") and "--config.split=random" in err


def test_label_errors_name_the_file_line_after_a_multiline_field(tmp_path):
    from chmr_jax.data import datasets
    path = tmp_path / "notes.csv"
    path.write_text('smiles,note,y\nCCO,"two\nlines",1\nCCN,x,abc\n')
    with pytest.raises(ValueError, match=r"line 4, column 'y': label 'abc' is not a number"):
        datasets.load_csv(path, task_columns=["y"])


@pytest.mark.parametrize("command, flags", [
    ("pretrain", ["--workdir", "--data_dir", "--cache_dir", "--config.a.b=VALUE"]),
    ("finetune", ["--workdir", "--data_dir", "--cache_dir", "--pretrained"]),
    ("benchmark", ["--workdir", "--data_dir", "--pretrained", "--datasets", "--table_only"]),
    ("stress", ["--workdir", "--data_dir", "--missing", "--imputations", "--dataset", "--seeds", "--steps",
                "--finetune_epochs", "--finetune_config", "--hide_seed", "--structure_only"]),
])
def test_every_subcommand_help_lists_its_flags(capsys, command, flags):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("\nflags:\n", 1)[1].splitlines() if line.strip()}
    assert set(flags) <= listed, sorted(set(flags) - listed)


def test_pretrain_accepts_cache_dir(capsys):
    # parsed (not 'Unknown command line flag'): the next problem reported is the missing workdir
    assert cli.main(["pretrain", "--cache_dir", "/tmp/somewhere"]) == 2
    assert capsys.readouterr().err.strip().startswith("chmr-jax pretrain: --workdir is required")


def test_version_and_bare_command(capsys):
    import chmr_jax
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"chmr-jax {chmr_jax.__version__}"
    assert cli.main([]) == 2   # no command: a usage error, the list once on stderr
    listed = [line.split()[0] for line in capsys.readouterr().err.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    assert cli.main(["--help"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")] == listed


# ---- issue 36: a newcomer's second afternoon

@pytest.mark.parametrize("argv, typed, suggested", [
    (["prepare", "--datset", "bbbp"], "--datset", "--dataset"),
    (["embed", "--pretrained", "p", "--input", "i.csv", "--out", "o", "--shard_sise", "3"], "--shard_sise",
     "--shard_size"),
    (["report", "--pretrained", "p", "--benchmrk=bace"], "--benchmrk", "--benchmark"),
    (["convert", "--torch", "m.pt", "--out", "o", "--drop_geometri"], "--drop_geometri", "--drop_geometry"),
])
def test_a_flag_typo_is_one_line_naming_the_closest_flag(capsys, argv, typed, suggested):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err == (f"chmr-jax {argv[0]}: unknown flag {typed}; did you mean {suggested}? "
                   f"(chmr-jax {argv[0]} --help lists the flags)")


def test_a_missing_flag_is_one_line_too(capsys):
    with pytest.raises(SystemExit):
        cli.main(["embed", "--input", "i.csv"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pretrained, --out" in err and "usage:" not in err


def _prepare_csv(tmp_path, text, *flags):
    path = tmp_path / "my_assays.csv"
    path.write_text(text)
    rc = cli.main(["prepare", "--csv", str(path), "--split", "random", "--cache_dir", str(tmp_path / "cache"),
                   "--workers", "1", *flags])
    return path, rc


def _assays(n=20, extra=lambda i: ""):
    return "".join(f"{'C' * k}O,{5 + k / 10}{extra(k)}\n" for k in range(1, n + 1))


def test_an_all_empty_task_column_is_one_line_naming_it(tmp_path, capsys):
    path, rc = _prepare_csv(tmp_path, "SMILES,pIC50,empty\n" + _assays(extra=lambda k: ","),
                            "--smiles_column", "SMILES", "--task_columns", "pIC50,empty")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [
        f"chmr-jax prepare: {path}: task column 'empty' has no label in any of the 20 rows; leave it out with "
        "--task_columns pIC50"]


def test_a_task_without_a_label_in_one_split_part_is_one_line_naming_it(tmp_path, capsys):
    # 'sparse' is labelled on the first two molecules only: the random split's valid and test parts
    # hold two molecules each, so at least one of them has no 'sparse' label
    path, rc = _prepare_csv(tmp_path, "smiles,pIC50,sparse\n" + _assays(extra=lambda k: ",1" if k <= 2 else ","))
    err = capsys.readouterr().err.strip().splitlines()[-1]   # (after the featurization progress line)
    assert rc == 2 and err.startswith(f"chmr-jax prepare: {path}: task column 'sparse' has no label in the "), err
    assert "--task_columns" in err


def test_a_smiles_column_in_another_case_is_named_not_taken(tmp_path, capsys):
    path, rc = _prepare_csv(tmp_path, "id,SMILES,pIC50,empty\n" + "".join(
        f"m{k},{'C' * k}O,{k},\n" for k in range(1, 21)), "--smiles_column", "smiles")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"chmr-jax prepare: {path}: no SMILES column 'smiles'; columns are ['id', 'SMILES', "
                               "'pIC50', 'empty']; did you mean --smiles_column SMILES? (column names match exactly)")
    assert not list((tmp_path / "cache").glob("*.npz"))      # nothing featurized


def test_the_default_task_list_is_printed(tmp_path, capsys):
    path, rc = _prepare_csv(tmp_path, "smiles,pIC50,logD\n" + _assays(extra=lambda k: f",{k % 3}"))
    out = capsys.readouterr().out
    assert rc == 0 and "my_assays: tasks pIC50, logD (every column after 'smiles'; --task_columns chooses)" in out
    assert re.search(r"my_assays\s+20\s+20\s+2\s+regre", out)


def test_a_csv_with_only_a_header_says_the_file_has_no_rows(tmp_path, capsys):
    path, rc = _prepare_csv(tmp_path, "smiles,y\n")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == f"chmr-jax prepare: {path}: the file has no rows (only a header); add molecules below it"


def test_the_closing_line_names_the_rejects_file(tmp_path, capsys):
    path, rc = _prepare_csv(tmp_path, "smiles,y\n" + _assays(12) + "not_a_smiles,3\n")
    out = capsys.readouterr().out.strip().splitlines()
    (rejects,) = (tmp_path / "cache").glob("my_assays-*.rejects.csv")
    assert rc == 0 and out[-1] == f"rejected molecules (row, smiles, reason) are listed in {rejects}"
    assert "<" not in out[-1]


def test_an_unknown_exclude_test_benchmark_names_the_flag(tmp_path, capsys):
    assert cli.main(["prepare", "--corpus", "synthetic", "--exclude_test", "chembl3k",
                     "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chmr-jax prepare: --exclude_test chembl3k: unknown benchmark(s) ['chembl3k']; did you "
                          "mean chembl2k?") and "corpus." not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache").exists()


def _with_rejects(tmp_path):
    """A CSV of 22 rows whose data rows 2 and 7 are rejected (0-based, header excluded)."""
    smiles = _alcohols(20)
    smiles[2:2] = ["not_a_smiles"]
    smiles[7:7] = ["C1CC"]
    path = tmp_path / "mols.csv"
    path.write_text("smiles,y\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(smiles)))
    return path, smiles


def test_one_reject_numbering_across_prepare_embed_and_embed_smiles(tiny_run, tmp_path, capsys):
    import json

    import chmr_jax
    path, smiles = _with_rejects(tmp_path)
    assert cli.main(["prepare", "--csv", str(path), "--split", "random", "--cache_dir", str(tmp_path / "cache"),
                     "--workers", "1"]) == 0
    (rejects,) = (tmp_path / "cache").glob("mols-*.rejects.csv")
    prepared = [(int(line.split(",")[0]), line.split(",")[1]) for line in rejects.read_text().splitlines()[1:]]
    out = tmp_path / "out"
    assert cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(path), "--out", str(out), "--workers", "1",
                     "--no_progress", "--batch_size", "4"]) == 0
    manifest = [(r["row"], r["smiles"]) for r in json.loads((out / "manifest.json").read_text())["rejects"]]
    _, in_memory = chmr_jax.embed_smiles(str(tiny_run), smiles, return_rejects=True)
    in_memory = [(r["row"], r["smiles"]) for r in in_memory]
    assert prepared == manifest == in_memory == [(2, "not_a_smiles"), (7, "C1CC")]
    assert [smiles[row] for row, _ in prepared] == ["not_a_smiles", "C1CC"]   # the index into the data rows


def test_ctrl_c_in_embed_is_one_line_and_the_rerun_resumes(tiny_run, tmp_path, capsys, monkeypatch):
    import chmr_jax
    from chmr_jax import progress
    path, smiles = _with_rejects(tmp_path)
    out = tmp_path / "out"
    args = ["embed", "--pretrained", str(tiny_run), "--input", str(path), "--out", str(out), "--shard_size", "8",
            "--batch_size", "4", "--workers", "1", "--no_progress"]
    update, armed = progress.Progress.update, [True]

    def ctrl_c_after_the_first_shard(self, n=1):
        update(self, n)
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt     # what Python raises in the main thread on SIGINT
    monkeypatch.setattr(progress.Progress, "update", ctrl_c_after_the_first_shard)
    assert cli.main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"chmr-jax embed: interrupted; finished shards are kept in {out}: run the same command "
                       "again to resume (only the missing shards are embedded)")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err), err
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["00000.json"]
    assert cli.main(args) == 0
    assert "resuming: 1 of 3 shards of this process already written (digests checked), skipped: [0]" in \
        capsys.readouterr().out
    got, manifest = chmr_jax.load_embeddings(out)
    want = chmr_jax.embed_smiles(str(tiny_run), smiles, ids=[f"row{i}" for i in range(len(smiles))], batch_size=4)
    assert manifest["molecules"] == 20 and [r["row"] for r in manifest["rejects"]] == [2, 7]
    for name in ("id", "tree_codes", "anchor"):
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]), err_msg=name)


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler during the test, as in a terminal: a test run started in the background
    (nohup, a script's `&`) inherits SIGINT ignored, and embed then leaves it ignored (tested below)."""
    import signal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_swallowed_by_a_callback_still_stops_embed(tiny_run, tmp_path, capsys, monkeypatch, default_sigint):
    """A SIGINT that lands while Python runs a callback (jax's gc hook during its import, a __del__) has its
    KeyboardInterrupt swallowed there ("Exception ignored in ..."); embed still stops before its next shard
    with the one line and exit 130 (before: the export ran to the end and exited 0)."""
    import signal

    from chmr_jax.downstream import export
    path, _ = _with_rejects(tmp_path)
    out = tmp_path / "out"
    real = export.export

    class InterruptedInACallback:
        def __del__(self):   # the installed SIGINT handler, called where Python ignores what it raises
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    def export_after_a_swallowed_interrupt(*a, **k):
        InterruptedInACallback()
        return real(*a, **k)
    monkeypatch.setattr(export, "export", export_after_a_swallowed_interrupt)
    assert cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(path), "--out", str(out), "--shard_size",
                     "8", "--batch_size", "4", "--workers", "1", "--no_progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("chmr-jax embed: interrupted; finished shards")
    assert not list((out / "shards").glob("*.json"))          # stopped before its first shard
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is put back


def test_embed_leaves_an_ignored_sigint_ignored(tiny_run, tmp_path, capsys, monkeypatch):
    """Started with SIGINT ignored (nohup, a script's background job), embed does not start reacting to
    it: a SIGINT sent during the export is ignored, the export runs to the end and SIGINT is still
    ignored afterwards, as Python itself behaves."""
    import os
    import signal

    from chmr_jax.downstream import export
    path, _ = _with_rejects(tmp_path)
    real = export.export

    def export_after_a_sigint(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(export, "export", export_after_a_sigint)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(path), "--out", str(tmp_path / "out"),
                         "--shard_size", "8", "--batch_size", "4", "--workers", "1", "--no_progress"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_embed_step_that_the_run_lacks_is_one_line_listing_its_steps(tiny_run, tmp_path, capsys):
    path, _ = _with_rejects(tmp_path)
    rc = cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(path), "--out", str(tmp_path / "o"),
                   "--step", "123"])
    assert rc == 2 and capsys.readouterr().err.strip() == (
        f"chmr-jax embed: --step=123: {tiny_run} has no checkpoint of step 123; its checkpoints are steps 4, 8, 10 "
        "(leave the flag out for the newest)")


def test_finetune_messages_name_flags_and_steps(tiny_run, tmp_path, capsys):
    from chmr_jax import config_util
    from chmr_jax.downstream import finetune
    from pathlib import Path
    repo = Path(cli.__file__).resolve().parents[1]
    rc = cli.main(["finetune", "--config", f"{repo}/configs/finetune.py:dataset=bace", "--pretrained", str(tiny_run),
                   "--workdir", str(tmp_path / "ft"), "--config.pretrained_step=123"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == (f"chmr-jax finetune: --config.pretrained_step=123: {tiny_run} has no checkpoint of step "
                               "123; its checkpoints are steps 4, 8, 10 (leave the flag out for the newest)")
    # a CSV's settings record no benchmark name (config.dataset defaults to chembl2k and is unused)
    csv = tmp_path / "assay.csv"
    csv.write_text("smiles,y\nCCO,1\n")
    config = config_util.load_config(f"{repo}/configs/finetune.py")
    assert finetune.run_settings(config, tiny_run)["config"]["dataset"] == "chembl2k"
    config.csv = str(csv)
    assert finetune.run_settings(config, tiny_run)["config"]["dataset"] is None


def test_one_seed_says_it_has_no_std():
    lines = []
    run = lambda score: {"seed": 0, "test": {"roc_auc": score}}
    result = {"dataset": "bace", "metric": "roc_auc", "methods": {
        "chmr": {"runs": [run(0.7)], "test_mean": 0.7, "test_std": float("nan")},
        "mlp": {"runs": [run(0.6), run(0.8)], "test_mean": 0.7, "test_std": 0.1414}},
        "lift": {"mean": 0.05, "std": float("nan"), "per_seed": {"0": 0.05}}}
    from chmr_jax.downstream import finetune
    finetune.log_summary(result, lines.append)
    assert lines == ["bace chmr test roc_auc: 0.7000 (1 seed: no std)",
                     "bace mlp test roc_auc: 0.7000 +- 0.1414 over 2 seeds",
                     "bace lift over the untrained encoder (positive = pretrained better): +0.0500 (1 seed: no std) "
                     "(paired over seeds)"]


@pytest.mark.parametrize("command", ["pretrain", "finetune", "benchmark", "stress", "compile"])
def test_a_stray_word_on_a_config_command_is_one_line(command, capsys):
    """absl keeps positional words instead of refusing them: `finetune --pretrained RUN bbbp` trained the
    config's default dataset without a word. Now one line naming the word, exit 2, before any work."""
    assert cli.main([command, "bbbp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"chmr-jax {command}: unexpected argument(s) bbbp (every value is a --flag or --config.field=value; "
                   f"chmr-jax {command} --help lists the flags)"]
