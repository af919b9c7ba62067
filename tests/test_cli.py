"""The `chmr-jax prepare` command end to end on shared data and on a user CSV."""
import re

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
    path.write_text("SMILES,pIC50\nCCO,5.1\nnot_a_smiles,6.0\nc1ccccc1O,7.2\n,4\n")
    assert cli.main(["prepare", "--csv", str(path), "--smiles_column", "SMILES", "--split", "random",
                     "--geometry", "rdkit3d", "--cache_dir", str(tmp_path / "cache"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"mine\s+4\s+2\s+1\s+regre\s+2\s+3\s+0\s+1\s+0", captured.out)
    (rejects,) = (tmp_path / "cache").glob("mine-*.rejects.csv")
    assert rejects.read_text().splitlines()[1:] == ["1,not_a_smiles,unparsable SMILES",
                                                    "3,,empty molecule (no atoms)"]
    assert "2 of 4 molecules rejected" in captured.err


def test_unknown_command_and_dataset(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert cli.main([]) == 0 and "prepare" in capsys.readouterr().out
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
    prepared = prepare.prepare(ds, featurize.FeaturizerSettings(), None, "random", str(matrix), n_workers=1)
    # CCO (LFQSCWFLJHTTHZ) has row 0; phenol has no row; CCN (QUSNBJAOOMFDIB) has row 1.
    assert prepared.geometry.ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(prepared.geometry.values, [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]])
    assert prepared.row()["3d_fail"] == 1
    import pytest
    with pytest.raises(ValueError, match="does not exist"):
        prepare.prepare(ds, featurize.FeaturizerSettings(), None, "random", str(tmp_path / "nope.npz"))
