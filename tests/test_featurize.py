"""Featurization against hand-checked molecules and closed forms."""
import csv

import numpy as np
import pytest

from chmr_jax.data import featurize as F

# Columns: atomic_num-1, chirality, total degree, formal charge + 5, total Hs, radicals,
# hybridization (SP=0, SP2=1, SP3=2), aromatic, in ring.
BENZENE_ATOM = [5, 0, 3, 5, 1, 0, 1, 1, 1]        # C, 2 ring neighbours + 1 H, sp2, aromatic
ACETIC_ACID = [
    [5, 0, 4, 5, 3, 0, 2, 0, 0],   # CH3: degree 4 (1 C + 3 H), sp3
    [5, 0, 3, 5, 0, 0, 1, 0, 0],   # carboxyl C: sp2, no H
    [7, 0, 1, 5, 0, 0, 1, 0, 0],   # =O
    [7, 0, 2, 5, 1, 0, 1, 0, 0],   # -OH, conjugated so RDKit calls it sp2
]
TETRAMETHYLAMMONIUM_N = [6, 0, 4, 6, 0, 0, 2, 0, 0]   # N+, charge +1 -> index 6


def graph(smiles):
    return F.mol_to_graph(F.parse_smiles(smiles))


def test_vocab_sizes_match_ogb():
    lists = [F.ATOMIC_NUM, F.CHIRALITY, F.DEGREE, F.FORMAL_CHARGE, F.NUM_HS, F.NUM_RADICAL_E,
             F.HYBRIDIZATION, F.IS_AROMATIC, F.IS_IN_RING]
    assert tuple(len(x) for x in lists) == F.ATOM_VOCAB_SIZES == (119, 5, 12, 12, 10, 6, 6, 2, 2)
    assert tuple(len(x) for x in (F.BOND_TYPE, F.BOND_STEREO, F.IS_CONJUGATED)) == (5, 6, 2)


def test_benzene():
    nodes, edges, bonds = graph("c1ccccc1")
    assert nodes.tolist() == [BENZENE_ATOM] * 6
    assert len(edges) == 12                       # 6 bonds, both directions
    assert bonds.tolist() == [[3, 0, 1]] * 12     # aromatic, no stereo, conjugated
    pairs = {tuple(e) for e in edges.tolist()}
    assert all((j, i) in pairs for i, j in pairs)


def test_acetic_acid():
    nodes, edges, bonds = graph("CC(=O)O")
    assert nodes.tolist() == ACETIC_ACID
    assert edges.tolist() == [[0, 1], [1, 0], [1, 2], [2, 1], [1, 3], [3, 1]]
    # C-C single unconjugated; C=O double conjugated; C-OH single conjugated
    assert bonds.tolist() == [[0, 0, 0]] * 2 + [[1, 0, 1]] * 2 + [[0, 0, 1]] * 2


def test_charged_molecules():
    nodes, _, _ = graph("C[N+](C)(C)C")
    assert nodes[1].tolist() == TETRAMETHYLAMMONIUM_N
    acetate, _, _ = graph("CC(=O)[O-]")
    assert acetate[3].tolist() == [7, 0, 1, 4, 0, 0, 1, 0, 0]   # O-: charge -1 -> index 4


def test_chirality_is_the_only_difference_between_enantiomers():
    l_ala, _, _ = graph("N[C@@H](C)C(=O)O")
    d_ala, _, _ = graph("N[C@H](C)C(=O)O")
    assert l_ala[1, 1] == 1 and d_ala[1, 1] == 2          # CHI_TETRAHEDRAL_CW / _CCW
    diff = np.argwhere(l_ala != d_ala)
    assert diff.tolist() == [[1, 1]]


def test_unknown_values_map_to_misc():
    nodes, _, _ = graph("*C")                              # dummy atom, atomic number 0
    assert nodes[0, 0] == 118


def test_fingerprints_closed_form():
    mol = F.parse_smiles("c1ccccc1")
    # All six atoms are equivalent: one distinct environment per radius 0, 1, 2 -> 3 bits.
    assert F._morgan_bits(mol, 2, 1024).sum() == 3
    assert F._morgan_bits(mol, 2, 1024).shape == (1024,)
    # MACCS keys 162 (aromatic), 163 (6-membered ring), 165 (ring) and nothing else.
    assert F.maccs_bits(mol).nonzero()[0].tolist() == [162, 163, 165]


def test_featurize_smiles_rejects_and_layout(tmp_path):
    smiles = ["CCO", "not a smiles", "", "c1ccccc1", "C" * 70, "CC(=O)O"]
    settings = F.FeaturizerSettings(max_atoms=64)
    feats = F.featurize_smiles(smiles, settings, tmp_path, "toy", n_workers=1, show_progress=False)
    assert feats.rows.tolist() == [0, 3, 5]
    assert [r[0] for r in feats.rejects] == [1, 2, 4]
    reasons = {r[0]: r[2] for r in feats.rejects}
    assert reasons[1] == "unparsable SMILES"
    assert reasons[2] == "empty molecule (no atoms)"
    assert reasons[4].startswith("too many atoms (70 > max_atoms=64)")
    assert feats.n_atoms.tolist() == [3, 6, 4]
    assert feats.n_edges.tolist() == [4, 12, 6]
    nodes, _, _ = feats.graph(2)
    assert nodes.tolist() == ACETIC_ACID
    fp = feats.fingerprints()
    assert fp.shape == (3, 1024 + 167) and fp.dtype == np.float32
    assert fp[1, :1024].sum() == 3 and fp[1, 1024:].nonzero()[0].tolist() == [162, 163, 165]
    assert feats.targets().shape == (3, 1024)
    assert feats.keys.tolist() == ["LFQSCWFLJHTTHZ", "UHOVQNZJYSORNB", "QTBSBXVTEAMEQO"]
    (rejects_file,) = tmp_path.glob("toy-*.rejects.csv")
    with open(rejects_file) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["row", "smiles", "reason"] and [r[0] for r in rows[1:]] == ["1", "2", "4"]


def test_empty_and_blank_cells():
    feats = F.featurize_smiles(["", "C", "   "], F.FeaturizerSettings(), None, n_workers=1,
                               show_progress=False)
    assert feats.rows.tolist() == [1]
    assert feats.rejects == [(0, "", "empty molecule (no atoms)"), (2, "   ", "empty molecule (no atoms)")]


def test_cache_is_used_and_keyed_by_settings(tmp_path, monkeypatch):
    smiles = ["CCO", "CCN", "c1ccncc1"]
    first = F.featurize_smiles(smiles, F.FeaturizerSettings(), tmp_path, "c", n_workers=1, show_progress=False)

    def boom(*a, **k):
        raise AssertionError("featurized again although cached")
    monkeypatch.setattr(F, "featurize_molecule", boom)
    again = F.featurize_smiles(smiles, F.FeaturizerSettings(), tmp_path, "c", n_workers=1, show_progress=False)
    np.testing.assert_array_equal(first.nodes, again.nodes)
    np.testing.assert_array_equal(first.morgan, again.morgan)
    with pytest.raises(AssertionError, match="featurized again"):
        F.featurize_smiles(smiles, F.FeaturizerSettings(morgan_radius=3), tmp_path, "c", n_workers=1,
                           show_progress=False)


def test_parallel_equals_serial():
    smiles = [f"C{'C' * (i % 7)}O" for i in range(600)] + ["bad("] + ["c1ccccc1N"] * 50
    serial = F.featurize_smiles(smiles, F.FeaturizerSettings(), None, n_workers=1, show_progress=False)
    parallel = F.featurize_smiles(smiles, F.FeaturizerSettings(), None, n_workers=2, show_progress=False)
    for name in F.MoleculeFeatures._ARRAYS:
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))
    assert serial.rejects == parallel.rejects == [(600, "bad(", "unparsable SMILES")]


def test_key_fallback_when_no_inchi():
    key = F.molecule_key(F.parse_smiles("*CC"))
    assert len(key) == 14 and key.startswith("SMI")
    assert key == F.molecule_key(F.parse_smiles("CC*"))  # same molecule, same key


def test_join_keys():
    assert F.key_of_smiles("CCO") == "LFQSCWFLJHTTHZ"
    assert F.key_of_smiles("CCO", "inchikey") == "LFQSCWFLJHTTHZ-UHFFFAOYSA-N"
    # Enantiomers share the connectivity block but not the full key.
    l_ala, d_ala = "N[C@@H](C)C(=O)O", "N[C@H](C)C(=O)O"
    assert F.key_of_smiles(l_ala) == F.key_of_smiles(d_ala)
    assert F.key_of_smiles(l_ala, "inchikey") != F.key_of_smiles(d_ala, "inchikey")
    assert F.key_of_smiles("not(") == "" and F.key_of_smiles("") == ""
    assert F.keys_of_smiles(["CCO", "x("], "inchikey", n_workers=1) == ["LFQSCWFLJHTTHZ-UHFFFAOYSA-N", ""]
    with pytest.raises(ValueError, match="join key"):
        F.molecule_key(F.parse_smiles("C"), "smiles")
