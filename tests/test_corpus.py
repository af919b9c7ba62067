"""Corpus: importers on the real shared files (exact counts), the paper layout, aggregation, bad input."""
import gzip
import re

import numpy as np
import pytest

from chmr_jax import cli, config_util
from chmr_jax.data import corpus as C, datasets, prepare, profiles, registry, synthetic


# ---- real files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lookup(data_dir):
    return profiles.read_repurposing_samples(
        registry.fetch("cellpainting_plate", "repurposing_samples_20200324.txt", data_dir))


def test_l1000_consensus_real(data_dir, cache_dir):
    t = profiles.read_l1000_consensus(registry.fetch("l1000_drugbank", "consensi-drugbank.tsv.gz", data_dir),
                                      registry.fetch("l1000_drugbank", "drugbank_structures.tsv", data_dir))
    assert t.values.shape == (1170, 978) and len(t.skipped) == 0
    assert len(set(t.keys)) == 1098                       # some DrugBank entries share a connectivity block
    assert t.feature_names[:3] == ["10007", "1001", "10013"]
    chembl = datasets.load_benchmark("chembl2k", data_dir, cache_dir)
    assert len(set(t.keys) & set(chembl.keys)) == 331       # as ../shared/data/README.md states
    assert np.isclose(t.values[0, 0], 0.649)


def test_l1000_plate_real(data_dir, lookup):
    t = profiles.read_l1000_plate(registry.fetch("l1000_plate", "LJP005_A375_24H_X1_B19_level3.gct", data_dir), lookup)
    # 351 treated wells (328 compound + 23 positive control), 26 DMSO wells excluded;
    # 238 wells of 40 compounds resolve to a structure, 113 wells have none (counted, not dropped silently).
    assert t.values.shape == (238, 978) and len(set(t.keys)) == 40 and len(t.skipped) == 113
    assert all(reason.startswith("no structure") for _, reason in t.skipped)
    assert np.isfinite(t.values).all()
    # z-scores against DMSO: treated wells spread around 0 with unit-scale robust spread
    assert abs(np.median(t.values)) < 0.5 and 0.5 < np.median(np.abs(t.values)) < 3


def test_cellpainting_plate_real(data_dir, lookup):
    path = registry.fetch("cellpainting_plate", "SQ00015054_normalized_feature_select.csv.gz", data_dir)
    t = profiles.read_cellprofiler_plate(path, lookup)
    assert t.values.shape == (354, 454) and len(set(t.keys)) == 57 and len(t.skipped) == 6
    assert not any(k == "" for k in t.keys)
    top = profiles.read_cellprofiler_plate(path, lookup, dose="max")
    assert 50 <= len(top.keys) < 120                       # about one well per compound at its top dose
    ten = profiles.read_cellprofiler_plate(path, lookup, dose="10")
    assert 0 < len(ten.keys) <= 60


def test_robust_z_closed_form():
    x = np.array([[1.0, 2.0, 3.0, 10.0], [5.0, 5.0, 5.0, 7.0]])
    controls = np.array([True, True, True, False])
    z = profiles.robust_z(x, controls)
    # row 0: median 2, MAD 1 -> scale 1.4826; row 1: MAD 0 and std 0 -> scale 1
    np.testing.assert_allclose(z[0], (x[0] - 2) / 1.4826, rtol=1e-6)
    np.testing.assert_allclose(z[1], [0, 0, 0, 2])


def test_reachable_corpus(data_dir, cache_dir, tmp_path):
    # The reachable profiles without the 9 benchmarks' structures (include_benchmarks adds ~59k
    # molecules to featurize: 160 s of the CI budget for a union; with them the corpus has 60,498
    # molecules, benchmarks/RESULTS.md). Every molecule with an L1000 signature is in either way.
    config = config_util.load_config()
    config.corpus.include_benchmarks = False
    corpus = prepare.build_corpus(config.corpus, data_dir=data_dir, cache_dir=cache_dir, verbose=False)
    assert len(corpus) == 1158 and corpus.manifest["counts"]["structures_in"] == 0
    assert corpus.modalities["expression"].dim == 978 and corpus.modalities["cell"].dim == 454
    assert int(corpus.modalities["expression"].available.sum()) == 1128
    # 57 plate compounds: 54 join here; two more join only through a benchmark's structure, and one has
    # only an InChIKey block matching no molecule: their 3 x 6 wells are counted, not silently lost.
    assert int(corpus.modalities["cell"].available.sum()) == 54
    cell_counts = corpus.manifest["modalities"]["cell"]["source_counts"]["cellpainting_plate"]
    assert cell_counts == {"rows": 354, "inf_entries": 0, "dropped_nan_rows": 0, "not_in_corpus": 18,
                           "molecules": 54, "replicate_rows_merged": 282, "skipped_by_importer": 6}
    groups = prepare.benchmark_keys(["chembl2k"], "inchikey14", data_dir, cache_dir)
    (row,) = C.overlap_table(corpus, groups)
    assert row["cell"] == 11 and row["expression"] == 334       # 331 consensus + 3 from the plate
    m = corpus.modalities["expression"]
    assert (m.values[~m.available] == 0).all() and np.isfinite(m.values).all()
    corpus.save(tmp_path / "c")
    again = C.Corpus.load(tmp_path / "c")
    np.testing.assert_array_equal(again.keys, corpus.keys)
    np.testing.assert_array_equal(again.modalities["cell"].values, corpus.modalities["cell"].values)
    assert again.manifest["modalities"]["expression"]["observed"] == 1128


def test_leakage_guard_keys(data_dir, cache_dir):
    from chmr_jax.data import splits
    keys = prepare.test_split_keys("chembl2k", "inchikey14", data_dir, cache_dir)
    ds = datasets.load_benchmark("chembl2k", data_dir, cache_dir)
    split = splits.load_or_make_split(ds.smiles, "paper_scaffold", cache_dir, "chembl2k")
    assert keys == {ds.keys[i] for i in split["test"]} and len(split["test"]) == 589
    table = C.ProfileTable("t", keys=sorted(keys)[:3], smiles=[""] * 3, values=np.ones((3, 2)),
                           feature_names=["a", "b"], row_ids=["1", "2", "3"])
    structures = [(s, "chembl2k") for s in ds.smiles]
    corpus = C.assemble(structures, {"m": [table]}, exclude_keys=keys, verbose=False)
    assert not (set(corpus.keys) & keys)
    assert corpus.manifest["counts"]["excluded_leakage"] == len(keys)
    assert corpus.modalities["m"].available.sum() == 0


def test_exclude_a_csv_removes_its_molecules_structures_and_profiles_by_connectivity_key(tmp_path, cache_dir):
    """corpus.exclude with a user's evaluation CSV (issue 32): its molecules leave the corpus, as
    structures and as profile rows, matched by the connectivity key (the 14-char InChIKey block: another
    SMILES or stereo form of the same molecule is the same key); the counts are in the manifest."""
    import ml_collections
    from rdkit import Chem
    key = lambda s: Chem.MolToInchiKey(Chem.MolFromSmiles(s))[:14]   # the reference, straight from RDKit
    csv = tmp_path / "my_eval.csv"
    csv.write_text("smiles,pIC50\nC[C@H](N)C(=O)O,5.1\nOCC,4.0\nnot a smiles,3.0\n")
    structures = [("CC(N)C(=O)O", "lib"), ("CCO", "lib"), ("c1ccccc1", "lib"), ("CCN", "lib")]
    # Profile rows: alanine twice (replicates), benzene once, and a profile-only molecule (propane).
    table = C.ProfileTable("t", keys=[key("CC(N)C(=O)O"), key("CC(N)C(=O)O"), key("c1ccccc1"), key("CCC")],
                           smiles=["CC(N)C(=O)O", "CC(N)C(=O)O", "c1ccccc1", "CCC"],
                           values=np.arange(8, dtype=float).reshape(4, 2), feature_names=["a", "b"],
                           row_ids=["1", "2", "3", "4"])
    cfg = ml_collections.ConfigDict(dict(exclude=str(csv), exclude_split="", exclude_smiles_column="smiles",
                                         exclude_test_of=""))
    keys, report = prepare.exclusion_keys(cfg, "inchikey14", None, cache_dir)
    assert keys == {key("CC(N)C(=O)O"), key("CCO")} and report["csv"] == {str(csv): 2}
    corpus = C.assemble(structures, {"m": [table]}, exclude_keys=keys, verbose=False, exclusion=report)
    assert set(corpus.keys) == {key("c1ccccc1"), key("CCN"), key("CCC")}
    assert corpus.manifest["counts"]["excluded_leakage"] == 2
    assert corpus.manifest["counts"]["excluded_profile_rows"] == {"m": 2}
    assert corpus.manifest["exclusion"]["csv"] == {str(csv): 2}
    assert corpus.modalities["m"].available.sum() == 2                    # benzene and propane keep theirs
    # A CSV without the named column, and an item that is neither a benchmark nor a CSV, are one-line errors.
    cfg.exclude_smiles_column = "SMILES"
    with pytest.raises(ValueError, match=r"has no column 'SMILES'.*exclude_smiles_column"):
        prepare.exclusion_keys(cfg, "inchikey14", None, cache_dir)
    with pytest.raises(ValueError, match="neither a benchmark nor a .csv file"):
        prepare.exclusion_items("bace,my_eval")


@pytest.mark.parametrize("split_kind", ["", "key_scaffold"])
def test_exclude_all_leaves_out_the_test_part_of_the_split_each_benchmark_is_evaluated_with(
        split_kind, data_dir, cache_dir):
    """exclude=all names the nine benchmarks; each contributes the test rows of the split fine-tuning
    scores it on (finetune's config.split: the default protocol, or key_scaffold), as prepare.prepare
    (fine-tuning's own path) splits it. Checked on bace and bbbp (the other seven take the same path)."""
    import ml_collections
    assert prepare.exclusion_items("all") == (list(datasets.ALL_BENCHMARKS), [])
    assert sorted(prepare.exclusion_items("bace, all")[0]) == sorted(datasets.ALL_BENCHMARKS)   # no repeats
    from chmr_jax.data import featurize
    for name in ("bace", "bbbp"):
        cfg = ml_collections.ConfigDict(dict(exclude=name, exclude_split=split_kind, exclude_smiles_column="smiles",
                                             exclude_test_of=""))
        keys, report = prepare.exclusion_keys(cfg, "inchikey14", data_dir, cache_dir)
        ds = datasets.load_benchmark(name, data_dir, cache_dir)
        evaluated = prepare.prepare(ds, featurize.FeaturizerSettings(), cache_dir, split_kind or None,
                                    show_progress=False)
        test_keys = {ds.keys[i] for i in evaluated.split["test"] if ds.keys[i]}
        assert keys == test_keys and len(keys) > 0, name
        assert report["split"] == (split_kind or "default")


# ---- the paper layout ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return synthetic.write_synthetic_paper_layout(tmp_path_factory.mktemp("raw"), n_molecules=300, seed=1)


def test_paper_layout_reader_on_generated_layout(layout):
    structures, tables, gene_edges, l1k = profiles.read_paper_layout(layout, expected_dims=profiles.PAPER_MODALITIES)
    assert len(structures) == 300
    assert {n: t.values.shape[1] for n, t in tables.items()} == profiles.PAPER_MODALITIES
    for name, t in tables.items():
        with np.load(layout / f"{name}_feature.npz") as data:
            assert len(t.keys) == len(data["data"])          # every row joined to a structure
    assert gene_edges.shape[1] == 2 and len(l1k) == 978
    corpus = C.assemble(structures, {"cell": [tables["CP-Bray"], tables["CP-JUMP"]],
                                     "gene": [tables["G-CRISPR"], tables["G-ORF"]], "expression": [tables["GE"]]},
                        expected_dims={"cell": 2749, "gene": 1973, "expression": 978}, verbose=False)
    assert len(corpus) == 300
    frac = {m: corpus.modalities[m].available.mean() for m in corpus.modalities}
    assert frac["gene"] < 0.2 and frac["expression"] < 0.1   # > 90% missing
    assert 0.3 < frac["cell"] < 0.9
    # A molecule with a Bray profile but no JUMP profile is available for 'cell'; its JUMP half is
    # imputed with the JUMP column mean and counted.
    info = corpus.manifest["modalities"]["cell"]
    assert info["imputed_entries"] > 0 and info["dim"] == 2749


def test_replicates_aggregate_by_median_mean_first(layout):
    _, tables, _, _ = profiles.read_paper_layout(layout, ["GE"])
    t = tables["GE"]
    dup = next(k for k in t.keys if t.keys.count(k) > 1)
    rows = t.values[[i for i, k in enumerate(t.keys) if k == dup]]
    for how, expected in (("median", np.median(rows, 0)), ("mean", rows.mean(0)), ("first", rows[0])):
        profiles_by_key, counts = C.aggregate_table(t, how)
        np.testing.assert_allclose(profiles_by_key[dup], expected, rtol=1e-6)
        assert counts["replicate_rows_merged"] == len(t.keys) - len(set(t.keys))


def test_nan_policy_and_inf_counting():
    values = np.array([[1, np.nan, 3, 4], [np.nan, np.nan, np.nan, 1], [1, 2, np.inf, 4], [3, 4, 5, 6]], np.float32)
    t = C.ProfileTable("toy", keys=["A", "B", "C", "A"], smiles=["CCO", "CCN", "CCC", "CCO"], values=values,
                       feature_names=list("wxyz"), row_ids=list("1234"))
    by_key, counts = C.aggregate_table(t, "median", max_nan_fraction=0.5)
    assert counts["dropped_nan_rows"] == 1 and "B" not in by_key     # 75% NaN > 50%
    assert counts["inf_entries"] == 1
    np.testing.assert_allclose(by_key["A"], [2, 4, 4, 5])              # nanmedian of rows 0 and 3
    corpus = C.assemble([], {"m": [t]}, verbose=False)
    m = corpus.modalities["m"]
    i = corpus.index_of()
    # B (its only profile dropped) is in the corpus as a molecule, but not available.
    assert [bool(m.available[i[k]]) for k in "ABC"] == [True, False, True]
    # C's inf entry is imputed with the column mean over observed molecules (A: 4) and counted.
    assert m.values[i["C"], 2] == pytest.approx(4.0)
    assert corpus.manifest["modalities"]["m"]["imputed_entries"] == 1


# ---- bad input -----------------------------------------------------------------------------------

def _write_csv_gz(path, header, rows):
    with gzip.open(path, "wt") as fh:
        fh.write(",".join(header) + "\n")
        for r in rows:
            fh.write(",".join(r) + "\n")


def test_bad_layouts(tmp_path, layout):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(layout, bad)
    _write_csv_gz(bad / "GE.csv.gz", ["express_id", "mol_id"], [["e1", "m1"], ["e1", "m1"]])
    np.savez(bad / "GE_feature.npz", data=np.zeros((2, 978), np.float32))
    with pytest.raises(C.CorpusError, match=r"GE.csv.gz, lines 2 and 3: duplicate id express_id=e1"):
        profiles.read_paper_layout(bad, ["GE"])
    _write_csv_gz(bad / "GE.csv.gz", ["express_id", "mol_id"], [["e1", "m1"], ["e2", "m2"], ["e3", "nope"]])
    with pytest.raises(C.CorpusError, match=r"shape \(2, 978\) but GE.csv.gz has 3 rows"):
        profiles.read_paper_layout(bad, ["GE"])
    np.savez(bad / "GE_feature.npz", data=np.zeros((3, 970), np.float32))
    with pytest.raises(C.CorpusError, match="970 features but GE should have 978"):
        profiles.read_paper_layout(bad, ["GE"], expected_dims=profiles.PAPER_MODALITIES)
    np.savez(bad / "GE_feature.npz", data=np.zeros((3, 978), np.float32))
    _, tables, _, _ = profiles.read_paper_layout(bad, ["GE"])
    assert tables["GE"].skipped == [("e3", "mol_id nope not in structure.csv.gz")]


def test_bad_profiles(tmp_path, capsys):
    a = C.ProfileTable("a.csv", ["K1"], ["CCO"], np.ones((1, 2)), ["g1", "g2"], ["1"])
    b = C.ProfileTable("b.csv", ["K2"], ["CCN"], np.ones((1, 3)), ["g1", "g2", "g3"], ["1"])
    with pytest.raises(C.CorpusError, match=r"cannot stack b.csv \(3 features\) onto a.csv \(2 features\)"):
        profiles.stack_tables([a, b])
    with pytest.raises(C.CorpusError, match=r"sources \['a.csv'\] give 2 columns but the config says dim=5"):
        C.assemble([("CCO", "x")], {"m": [a]}, expected_dims={"m": 5}, verbose=False)
    with pytest.raises(C.CorpusError, match="has no source files"):
        C.assemble([("CCO", "x")], {"m": []}, verbose=False)
    # A profile whose molecule does not parse is counted, not silently dropped.
    bad = C.ProfileTable("c.csv", ["K9"], ["C1CC"], np.ones((1, 2)), ["g1", "g2"], ["1"])
    corpus = C.assemble([("CCO", "x")], {"m": [bad]}, verbose=False)
    assert corpus.modalities["m"].available.sum() == 0
    assert corpus.manifest["counts"]["featurize_rejects"] == 1
    # An empty modality is allowed (100% missing) with a warning.
    empty = C.ProfileTable("e.csv", [], [], np.zeros((0, 2)), ["g1", "g2"], [])
    corpus = C.assemble([("CCO", "x")], {"m": [empty]}, verbose=False)
    assert corpus.modalities["m"].available.sum() == 0
    assert "no observed molecule" in capsys.readouterr().err
    sig = tmp_path / "sig.tsv"
    sig.write_text("perturbagen\tg1\nDB1\t1.0\nDB1\t2.0\n")
    st = tmp_path / "st.tsv"
    st.write_text("drugbank_id\tname\tinchikey\tinchi\nDB1\tethanol\tx\tInChI=1S/C2H6O/c1-2-3/h3H,2H2,1H3\n")
    with pytest.raises(C.CorpusError, match="line 3: duplicate perturbagen DB1"):
        profiles.read_l1000_consensus(sig, st)
    with pytest.raises(C.CorpusError, match="no manifest.json"):
        C.Corpus.load(tmp_path)


def test_prepare_synthetic_corpus_command(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert cli.main(["prepare", "--corpus", "synthetic", "--cache_dir", str(tmp_path / "cache"),
                     "--out", str(out), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"\(molecules\)\s+-\s+400\s+100.0%", text)
    assert re.search(r"gene\s+1973\s+\d+\s+\d+\.\d%", text)
    corpus = C.Corpus.load(out)
    assert set(corpus.modalities) == {"cell", "gene", "expression"} and corpus.gene_edges.shape[1] == 2
    assert (out / "records-p00000-of-00001.array_record").exists()   # per-molecule records, one process' shard


def test_subset_keeps_each_molecules_graph_profiles_and_fingerprints(tmp_path):
    from helpers import tiny_corpus
    corpus = tiny_corpus(tmp_path, n_molecules=40, seed=3)
    idx = np.array([17, 3, 3, 39, 0])
    sub = corpus.subset(idx)
    assert len(sub) == 5 and list(sub.keys) == [corpus.keys[i] for i in idx]
    for j, i in enumerate(idx):
        for a, b in zip(sub.features.graph(j), corpus.features.graph(i)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(sub.features.fingerprints(), corpus.features.fingerprints(idx))
    np.testing.assert_array_equal(sub.features.targets(), corpus.features.targets(idx))
    for name, m in corpus.modalities.items():
        np.testing.assert_array_equal(sub.modalities[name].values, m.values[idx])
        np.testing.assert_array_equal(sub.modalities[name].available, m.available[idx])


def test_hide_marks_a_fraction_of_observed_profiles_missing(tmp_path):
    from helpers import tiny_corpus
    corpus = tiny_corpus(tmp_path, n_molecules=60, seed=2)
    hidden = corpus.hide(0.5, seed=1)
    for name, m in corpus.modalities.items():
        h = hidden.modalities[name]
        n_obs = int(m.available.sum())
        assert int(h.available.sum()) == n_obs - round(0.5 * n_obs)
        assert not np.any(h.available & ~m.available)              # nothing newly observed
        gone = m.available & ~h.available
        assert np.all(h.values[gone] == 0) and np.array_equal(h.values[h.available], m.values[h.available])
        assert hidden.manifest["hidden"]["modalities"][name] == {"observed_before": n_obs,
                                                                 "hidden": round(0.5 * n_obs)}
    assert int(corpus.modalities["cell"].available.sum()) > 0      # the original is untouched
    np.testing.assert_array_equal(corpus.hide(0.0).modalities["cell"].available, corpus.modalities["cell"].available)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        corpus.hide(1.5)


def test_exclude_test_of_takes_a_list_or_all():
    # The transductive check excludes the test parts of all nine benchmarks at once (issue 21 §7).
    assert prepare.excluded_benchmarks("") == []
    assert prepare.excluded_benchmarks("bace, chembl2k") == ["bace", "chembl2k"]
    assert prepare.excluded_benchmarks("all") == list(datasets.ALL_BENCHMARKS)
    with pytest.raises(ValueError, match="'baec' is neither a benchmark nor a .csv file \\(did you mean 'bace'\\?\\)"):
        prepare.excluded_benchmarks("bace,baec")
