"""Benchmark loaders on the shared data and the generic CSV loader."""
import numpy as np
import pytest

from chmr_jax.data import datasets

# name: (rows, tasks, task type), from ../shared/data/README.md
EXPECTED = {
    "chembl2k": (2355, 41, "classification"),
    "broad6k": (6567, 32, "classification"),
    "biogenadme": (3521, 6, "regression"),
    "moltoxcast": (8576, 617, "classification"),
    "bbbp": (2039, 1, "classification"),
    "bace": (1513, 1, "classification"),
    "clintox": (1478, 2, "classification"),
    "sider": (1427, 27, "classification"),
    "hiv": (41127, 1, "classification"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_benchmark_loader(name, data_dir, cache_dir):
    ds = datasets.load_benchmark(name, data_dir, cache_dir)
    rows, tasks, task_type = EXPECTED[name]
    assert len(ds) == rows and ds.labels.shape == (rows, tasks) and len(ds.task_names) == tasks
    assert ds.task_type == task_type
    assert ds.metric == ("mae" if task_type == "regression" else "roc_auc")
    assert ds.labels.dtype == np.float32
    observed = ds.labels[np.isfinite(ds.labels)]
    if task_type == "classification":
        assert set(np.unique(observed)) <= {0.0, 1.0}
    assert ds.keys.shape == (rows,)
    parsed = ds.keys != ""
    assert all(len(k) == 14 for k in ds.keys[parsed])
    assert parsed.mean() > 0.999


def test_benchmark_label_details(data_dir, cache_dir):
    chembl = datasets.load_benchmark("chembl2k", data_dir, cache_dir)
    assert chembl.task_names[:3] == ["ABCB1", "ABL1", "ADRA1D"]
    assert abs(np.isnan(chembl.labels).mean() - 0.83) < 0.01          # "83% of labels missing"
    # The file's own connectivity-block column agrees with RDKit's InChIKey for (nearly) all rows.
    import csv, gzip
    with gzip.open(data_dir / "infoalign/chembl2k/assays.csv.gz", "rt") as fh:
        file_keys = [r["inchikey"] for r in csv.DictReader(fh)]
    assert np.mean(np.array(file_keys) == chembl.keys) > 0.98
    biogen = datasets.load_benchmark("biogenadme", data_dir, cache_dir)
    assert biogen.task_names[0] == "LOG HLM_CLint (mL/min/kg)"
    assert np.isclose(biogen.labels[0, 0], 0.675686709)
    sider = datasets.load_benchmark("sider", data_dir, cache_dir)
    assert "Neoplasms_benign,_malignant_and_unspecified_(incl_cysts_and_polyps)" in sider.task_names


def test_generic_csv(tmp_path, cache_dir):
    path = tmp_path / "assay.csv"
    path.write_text("id,SMILES,active,logd,note\n"
                    "a,CCO,1,0.5,x\n"
                    "b,c1ccccc1,0,,y\n"
                    "c,CC(=O)O,,1.25,z\n")
    # column names match exactly (issue 36): 'smiles' is not silently taken to mean 'SMILES'
    with pytest.raises(ValueError, match=r"no SMILES column 'smiles'; .*did you mean smiles_column=SMILES\?"):
        datasets.load_csv(path, task_columns=["active"])
    ds = datasets.load_csv(path, smiles_column="SMILES", task_columns=["active"], cache_dir=cache_dir)
    assert ds.task_type == "classification" and ds.metric == "roc_auc"
    np.testing.assert_array_equal(ds.labels[:, 0], [1, 0, np.nan])
    ds = datasets.load_csv(path, smiles_column="SMILES", task_columns=["active", "logd"])
    assert ds.task_type == "regression" and ds.metric == "mae"
    ds = datasets.load_csv(path, "SMILES", task_columns=["active"], task_type="regression")
    assert ds.task_type == "regression"
    assert ds.keys.tolist() == ["LFQSCWFLJHTTHZ", "UHOVQNZJYSORNB", "QTBSBXVTEAMEQO"]


def test_generic_csv_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("smiles,y\nCCO,1\nCCN,high\n")
    with pytest.raises(ValueError, match=r"line 3, column 'y': label 'high' is not a number"):
        datasets.load_csv(path)
    path.write_text("smiles,y\nCCO,1,2\n")
    with pytest.raises(ValueError, match="line 2: 3 fields but the header has 2"):
        datasets.load_csv(path)
    path.write_text("mol,y\nCCO,1\n")
    with pytest.raises(ValueError, match="no SMILES column 'smiles'"):
        datasets.load_csv(path)
    with pytest.raises(ValueError, match=r"task columns \['z'\] not found"):
        datasets.load_csv(path, smiles_column="mol", task_columns=["z"])
    with pytest.raises(KeyError, match="unknown benchmark"):
        datasets.load_benchmark("tox21")


def test_csv_tasks_need_a_label_and_the_file_rows(tmp_path):
    path = tmp_path / "assay.csv"
    path.write_text("smiles,a,b,c\nCCO,1,,\nCCN,0,,\n")
    with pytest.raises(ValueError, match=r"task columns 'b', 'c' have no label in any of the 2 rows; leave them out "
                                         r"with --task_columns a$"):
        datasets.load_csv(path, flags={"task_columns": "--task_columns "})
    assert datasets.load_csv(path, task_columns=["a"]).task_names == ["a"]
    path.write_text("smiles,a\n")
    with pytest.raises(ValueError, match="the file has no rows"):
        datasets.load_csv(path)
