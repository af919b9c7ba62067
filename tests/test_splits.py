"""Splits: exact sizes of the paper protocol, OGB sizes, and agreement with reference code."""
import numpy as np
import pytest

from chmr_jax.data import datasets, splits

PAPER_SIZES = {"chembl2k": (1413, 353, 589), "broad6k": (3940, 985, 1642),
               "biogenadme": (2112, 528, 881), "moltoxcast": (5145, 1286, 2145)}
# Sizes of OGB's published scaffold splits of the same MoleculeNet sets (ogbg-mol*).
OGB_SIZES = {"bbbp": (1631, 204, 204), "bace": (1210, 151, 152), "sider": (1141, 143, 143),
             "hiv": (32901, 4113, 4113), "clintox": (1182, 148, 148)}


def reference_scaffolds(smiles):
    """The protocol's scaffolds written independently of chmr_jax (the OGB / InfoAlign idiom):
    RDKit's MurckoScaffoldSmiles with chirality (isomeric scaffold SMILES); None if unparsable."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold
    RDLogger.DisableLog("rdApp.*")
    return [MurckoScaffold.MurckoScaffoldSmiles(smiles=str(s), includeChirality=True)
            if Chem.MolFromSmiles(str(s)) is not None else None for s in smiles]


def reference_paper_split(scaffolds):
    """InfoAlign's scaffold_split, written the way the release does it: a list of index lists
    shuffled in place with numpy's global legacy RNG."""
    groups = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    inds_all = list(groups.values())
    state = np.random.get_state()
    try:
        np.random.seed(3)
        np.random.shuffle(inds_all)
    finally:
        np.random.set_state(state)
    n = len(scaffolds)
    train_cut = int(0.6 * n)
    valid_cut = int(0.15 * n) + train_cut
    flat = [i for g in inds_all for i in g]
    return flat[:train_cut], flat[train_cut:valid_cut], flat[valid_cut:]


def check_partition(split, n):
    allrows = np.concatenate([split["train"], split["valid"], split["test"]])
    assert len(allrows) == n and len(np.unique(allrows)) == n


@pytest.mark.parametrize("name", list(PAPER_SIZES))
def test_paper_split_sizes_and_reference(name, data_dir, cache_dir):
    ds = datasets.load_benchmark(name, data_dir, cache_dir)
    split = splits.load_or_make_split(ds.smiles, "paper_scaffold", cache_dir, name)
    assert tuple(len(split[k]) for k in ("train", "valid", "test")) == PAPER_SIZES[name]
    check_partition(split, len(ds))
    # The sizes are fixed by the cuts for any grouping; membership pins the scaffold definition.
    ref = reference_paper_split(reference_scaffolds(ds.smiles))
    for part, ref_rows in zip(("train", "valid", "test"), ref):
        assert split[part].tolist() == ref_rows


# biogenadme rows whose isomeric scaffold (the protocol's) differs from the non-isomeric one, which
# would put each in another part: (row, isomeric scaffold, part), from the reference protocol above.
PINNED_BIOGENADME = [
    (1844, "O=C1C=CC2C3=CC(=O)C4C5CCCCC5CCC4C3CC[C@H]2C1", "train"),
    (1899, "O=C(C1CCCC1)N1C[C@H](c2ccccc2)[C@H]2CN(CC3CC3)CC[C@H]21", "valid"),
    (1911, "O=C(/C=C/C=C/c1ccccc1)Nc1ccc2c(c1)CCNC(=O)CN2", "test"),
]


def test_paper_split_pins_known_molecules(data_dir, cache_dir):
    ds = datasets.load_benchmark("biogenadme", data_dir, cache_dir)
    split = splits.load_or_make_split(ds.smiles, "paper_scaffold", cache_dir, "biogenadme")
    part_of = {int(r): k for k, rows in split.items() for r in rows}
    ours = splits.scaffolds_of(ds.smiles)
    for row, scaffold, part in PINNED_BIOGENADME:
        assert reference_scaffolds([ds.smiles[row]]) == [scaffold]
        assert ours[row] == scaffold and part_of[row] == part


@pytest.mark.parametrize("name", list(OGB_SIZES))
def test_ogb_split_sizes(name, data_dir, cache_dir):
    ds = datasets.load_benchmark(name, data_dir, cache_dir)
    split = splits.load_or_make_split(ds.smiles, "ogb_scaffold", cache_dir, name)
    assert tuple(len(split[k]) for k in ("train", "valid", "test")) == OGB_SIZES[name]
    check_partition(split, len(ds))
    scaffolds = splits.scaffolds_of(ds.smiles)
    # No scaffold is shared between parts (each whole set goes to one part).
    parts = [{scaffolds[i] for i in split[k]} - {None} for k in ("train", "valid", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])


def test_ogb_split_hand_example():
    # Scaffold sets: A = rows {0,3,5,7} (4), B = {1,4} (2), C = {2,8} (2), D = {6} (1), E = {9} (1).
    scaffolds = ["A", "B", "C", "A", "B", "A", "D", "A", "C", "E"]
    split = splits.ogb_scaffold_split(scaffolds, (0.6, 0.2, 0.2))
    # Order: A(4), then B and C tie on size -> larger last index first: C (8) then B (4);
    # then E (last 9) before D (last 6). Train cap 6: A(4) + C(2) = 6; B would make 8 > 6 ->
    # valid (cap 8): B -> 2; E: train 6+1 > 6, 6+2+1 = 9 > 8 -> test; D -> test.
    assert split["train"].tolist() == [0, 2, 3, 5, 7, 8]
    assert split["valid"].tolist() == [1, 4]
    assert split["test"].tolist() == [6, 9]


def test_paper_split_matches_reference_on_toy():
    rng = np.random.default_rng(0)
    scaffolds = [f"s{int(x)}" for x in rng.integers(0, 40, size=300)]
    ours = splits.paper_scaffold_split(scaffolds)
    for part, ref_rows in zip(("train", "valid", "test"), reference_paper_split(scaffolds)):
        assert ours[part].tolist() == ref_rows


def test_unparsable_rows_are_singleton_groups():
    scaffolds = ["a", None, "a", None]
    assert splits.scaffold_groups(scaffolds) == [[0, 2], [1], [3]]


def test_random_split():
    split = splits.random_split(101, (0.8, 0.1, 0.1), seed=5)
    assert tuple(len(split[k]) for k in ("train", "valid", "test")) == (80, 10, 11)
    check_partition(split, 101)
    assert split["train"].tolist() == splits.random_split(101, (0.8, 0.1, 0.1), seed=5)["train"].tolist()
    assert split["train"].tolist() != splits.random_split(101, (0.8, 0.1, 0.1), seed=6)["train"].tolist()


def test_split_saved_and_reloaded(tmp_path, monkeypatch):
    smiles = ["c1ccccc1C", "c1ccccc1CC", "C1CCCCC1", "CCO", "CCN"]
    first = splits.load_or_make_split(smiles, "ogb_scaffold", tmp_path, "toy")
    assert len(list(tmp_path.glob("toy-split-ogb_scaffold-*.json"))) == 1
    monkeypatch.setattr(splits, "make_split", lambda *a, **k: pytest.fail("recomputed a saved split"))
    again = splits.load_or_make_split(smiles, "ogb_scaffold", tmp_path, "toy")
    for k in first:
        assert first[k].tolist() == again[k].tolist()
    with pytest.raises(ValueError, match="unknown split kind"):
        splits.load_or_make_split(smiles, "cluster", tmp_path, "toy")


def test_key_scaffold_groups_join_shared_scaffolds_and_connectivity_keys():
    # 2-hydroxypyridine and 2-pyridone: one connectivity key (InChI's mobile H), different Murcko
    # scaffolds; 4-methylpyridine shares the first one's scaffold; ethanol (acyclic, scaffold '') and
    # benzene stand alone; an unparsable row is a group of its own.
    smiles = ["Oc1ccccn1", "c1ccccc1", "O=c1cccc[nH]1", "CCO", "Cc1ccncc1", "not a smiles"]
    pairs = splits.key_scaffolds_of(smiles, n_workers=1)
    assert pairs[0][1] == pairs[2][1] and pairs[0][0] != pairs[2][0] and pairs[5] is None
    assert splits.key_scaffold_groups(pairs) == [[0, 2, 4], [1], [3], [5]]


def test_whole_group_split_cuts_between_groups_only():
    groups = [[0, 1, 2], [3], [4, 5], [6], [7, 8, 9], [10, 11]]
    split = splits.whole_group_split(groups, 12)
    check_partition(split, 12)
    part_of = {int(r): k for k, rows in split.items() for r in rows}
    assert all(len({part_of[r] for r in g}) == 1 for g in groups)
    # With singleton groups it is the paper protocol exactly (same shuffle, same cuts).
    scaffolds = [f"s{i}" for i in range(37)]
    ours = splits.whole_group_split([[i] for i in range(37)], 37)
    paper = splits.paper_scaffold_split(scaffolds)
    assert all(ours[k].tolist() == paper[k].tolist() for k in paper)


def test_key_scaffold_split_keeps_stereoisomers_out_of_train(data_dir, cache_dir):
    # broad6k: the paper protocol puts stereoisomers (one 14-char InChIKey block) of test molecules
    # in train; the key-grouped split shares neither a key nor a non-isomeric scaffold across parts.
    ds = datasets.load_benchmark("broad6k", data_dir, cache_dir)
    keys_in = lambda split, part: {ds.keys[i] for i in split[part]} - {""}
    paper = splits.load_or_make_split(ds.smiles, "paper_scaffold", cache_dir, "broad6k")
    assert keys_in(paper, "test") & keys_in(paper, "train")
    split = splits.load_or_make_split(ds.smiles, "key_scaffold", cache_dir, "broad6k")
    check_partition(split, len(ds))
    assert abs(len(split["train"]) - int(0.6 * len(ds))) < 0.02 * len(ds)
    assert abs(len(split["test"]) - (len(ds) - int(0.75 * len(ds)))) < 0.02 * len(ds)
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not keys_in(split, a) & keys_in(split, b)
    generic = [splits.scaffold_smiles(s, isomeric=False) for s in ds.smiles]
    scaffolds_in = lambda part: {generic[i] for i in split[part]}
    assert not scaffolds_in("train") & scaffolds_in("test")


def test_saved_splits_and_keys_are_recomputed_for_another_algorithm_version(tmp_path, monkeypatch):
    smiles = ["c1ccccc1C", "c1ccccc1CC", "C1CCCCC1", "CCO", "CCN"]
    splits.load_or_make_split(smiles, "paper_scaffold", tmp_path, "toy")
    datasets.molecule_keys(smiles, tmp_path, "toy")
    # A new version of either algorithm: the saved split and keys are computed again, not reused.
    monkeypatch.setattr(splits, "SPLIT_VERSION", getattr(splits, "SPLIT_VERSION", 0) + 1, raising=False)
    monkeypatch.setattr(datasets, "KEYS_VERSION", getattr(datasets, "KEYS_VERSION", 0) + 1, raising=False)
    made = []
    real_make, real_keys = splits.make_split, splits.featurize.keys_of_smiles
    monkeypatch.setattr(splits, "make_split", lambda *a, **k: made.append("split") or real_make(*a, **k))
    monkeypatch.setattr(datasets.featurize, "keys_of_smiles", lambda *a, **k: made.append("keys") or real_keys(*a, **k))
    splits.load_or_make_split(smiles, "paper_scaffold", tmp_path, "toy")
    datasets.molecule_keys(smiles, tmp_path, "toy")
    assert made == ["split", "keys"]
