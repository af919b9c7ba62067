"""The 3D modality: seeded conformer descriptors, failures flagged, z-scores, external matrices."""
import numpy as np
import pytest

from chmr_jax.data import geometry as G


def test_geometry_descriptors_flag_failures(tmp_path):
    geo = G.featurize_geometry(["CCO", "bad(", "c1ccccc1O"], G.GeometrySettings(), tmp_path, "g",
                               n_workers=1, show_progress=False)
    assert geo.values.shape == (3, G.GEOMETRY_DIM) and len(geo.names) == G.GEOMETRY_DIM
    assert geo.ok.tolist() == [True, False, True]
    assert geo.reasons == [(1, "unparsable SMILES")]
    assert np.isnan(geo.values[1]).all() and np.isfinite(geo.values[0]).all()
    # Seeded ETKDG: recomputing without the cache gives identical descriptors.
    again = G.featurize_geometry(["CCO"], G.GeometrySettings(), None, n_workers=1, show_progress=False)
    np.testing.assert_allclose(again.values[0], geo.values[0], rtol=1e-6)
    z = geo.standardized()
    assert (z[1] == 0).all()
    np.testing.assert_allclose(z[[0, 2]].mean(axis=0), 0, atol=1e-5)


def test_standardize_closed_form():
    values = np.array([[1.0, 5.0], [3.0, np.inf], [np.nan, 7.0], [100.0, 100.0]])
    ok = np.array([True, True, True, False])
    z = G.standardize(values, ok)
    # column 0 fit on {1, 3}: mean 2 std 1; column 1 fit on {5, 7}: mean 6 std 1
    np.testing.assert_allclose(z[:3], [[-1, -1], [1, 0], [0, 1]])
    assert (z[3] == 0).all()


def test_external_matrix_alignment(tmp_path):
    path = tmp_path / "emb.npz"
    np.savez(path, keys=np.array(["AAA", "BBB"]), data=np.array([[1.0, 2.0], [3.0, 4.0]]))
    out, available = G.load_external_matrix(path, ["BBB", "CCC", "AAA"])
    np.testing.assert_array_equal(out, [[3, 4], [0, 0], [1, 2]])
    assert available.tolist() == [True, False, True]
    csv_path = tmp_path / "emb.csv"
    csv_path.write_text("key,a,b\nAAA,1,2\nBBB,3,4\n")
    out_csv, _ = G.load_external_matrix(csv_path, ["BBB", "CCC", "AAA"])
    np.testing.assert_array_equal(out, out_csv)
    csv_path.write_text("key,a,b\nAAA,1,2\nAAA,3,4\n")
    with pytest.raises(ValueError, match="duplicate key 'AAA'"):
        G.load_external_matrix(csv_path, ["AAA"])
    csv_path.write_text("key,a,b\nAAA,1,x\n")
    with pytest.raises(ValueError, match="line 2: non-numeric"):
        G.load_external_matrix(csv_path, ["AAA"])
