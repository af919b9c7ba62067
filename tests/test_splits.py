"""Splits: exact sizes of the paper protocol, OGB sizes, and agreement with reference code."""
import numpy as np
import pytest

from chmr_jax.data import datasets, splits

PAPER_SIZES = {"chembl2k": (1413, 353, 589), "broad6k": (3940, 985, 1642),
               "biogenadme": (2112, 528, 881), "moltoxcast": (5145, 1286, 2145)}
# Sizes of OGB's published scaffold splits of the same MoleculeNet sets (ogbg-mol*).
OGB_SIZES = {"bbbp": (1631, 204, 204), "bace": (1210, 151, 152), "sider": (1141, 143, 143),
             "hiv": (32901, 4113, 4113), "clintox": (1182, 148, 148)}


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
    ref = reference_paper_split(splits.scaffolds_of(ds.smiles))
    for part, ref_rows in zip(("train", "valid", "test"), ref):
        assert split[part].tolist() == ref_rows


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
