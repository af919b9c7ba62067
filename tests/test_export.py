"""Export: the three formats round-trip, the encoder is a pure function usable inside user jit code,
molecules never seen in pretraining embed from SMILES alone."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chmr_jax
from chmr_jax import cli
from chmr_jax.data import featurize
from chmr_jax.downstream import embeddings, export
from chmr_jax.mechanisms import tree_vq
from chmr_jax.training import pretrain

NEW_MOLECULES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "not-a-smiles", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
                 "OC(=O)c1ccccc1OC(C)=O", ""]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("embed")
    src = tmp / "new.csv"
    src.write_text("name,SMILES\n" + "\n".join(f"m{i},{s}" for i, s in enumerate(NEW_MOLECULES)) + "\n")
    out = tmp / "out"
    rc = cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(src), "--out", str(out),
                   "--smiles_column", "SMILES", "--id_column", "name", "--batch_size", "2",
                   "--cache_dir", str(cache_dir)])
    assert rc == 0
    return out


def test_manifest_lists_the_model_the_featurizer_and_the_rejects(exported, tiny_run):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["checkpoint_step"] == 10 and manifest["molecules"] == 5
    assert [(r["row"], r["id"]) for r in manifest["rejects"]] == [(3, "m3"), (6, "m6")]
    assert manifest["model"]["tree_depth"] == 3 and manifest["featurizer"]["morgan_size"] == 256
    assert manifest["arrays"]["tree_vectors"]["shape"] == [3, 16]
    assert set(manifest["formats"]) == {"npz", "parquet", "tfds"}


@pytest.mark.parametrize("fmt", ["npz", "parquet", "tfds"])
def test_every_format_round_trips_to_the_same_arrays(exported, fmt):
    reference, _ = chmr_jax.load_embeddings(exported, "npz")
    arrays, _ = chmr_jax.load_embeddings(exported, fmt)
    assert set(arrays) == set(reference) >= {"id", "smiles", "key", "fingerprint", "graph", "anchor",
                                              "tree_codes", "tree_paths", "tree_vectors"}
    for name, ref in reference.items():
        assert arrays[name].shape == ref.shape, name
        if ref.dtype.kind == "U":
            assert list(arrays[name]) == list(ref), name
        else:
            np.testing.assert_array_equal(arrays[name], ref, err_msg=name)
    assert list(reference["id"]) == ["m0", "m1", "m2", "m4", "m5"]


def test_exported_values_match_the_encoder_and_the_tree(exported, tiny_run):
    arrays, _ = chmr_jax.load_embeddings(exported)
    model, _, _ = pretrain.load_pretrained(tiny_run)
    feats = featurize.featurize_smiles(list(arrays["smiles"]), export.load_encoder(tiny_run).settings, None,
                                       show_progress=False, verbose=False)
    emb = embeddings.embed(model, feats, batch_size=7, show_progress=False)
    for name in ("fingerprint", "graph", "anchor"):
        np.testing.assert_allclose(arrays[name], emb[name], rtol=1e-4, atol=1e-5)
    # Tree path: every level's code is a child of the previous one, in the level's heap range, and is
    # the nearer child by cosine; the straight-through vectors equal the chosen unit codes.
    codes, paths, vectors = arrays["tree_codes"], arrays["tree_paths"], arrays["tree_vectors"]
    table = np.asarray(model.codebook[...])
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    a = arrays["anchor"] / np.linalg.norm(arrays["anchor"], axis=1, keepdims=True)
    parent = np.ones(len(a), int)
    for h in range(1, codes.shape[1] + 1):
        left = 2 * parent
        expect = left + ((a * unit[left + 1]).sum(1) > (a * unit[left]).sum(1))
        np.testing.assert_array_equal(codes[:, h - 1], expect)
        np.testing.assert_array_equal(paths[:, h - 1], expect - 2 ** h)
        np.testing.assert_allclose(vectors[:, h - 1], unit[expect], rtol=1e-4, atol=1e-5)
        parent = expect


def test_load_encoder_is_a_pure_function_inside_user_jit_code(tiny_run):
    apply, params = chmr_jax.load_encoder(tiny_run)
    encoder = chmr_jax.load_encoder(tiny_run)
    feats = featurize.featurize_smiles(["CCO", "CCN", "c1ccccc1"], encoder.settings, None, show_progress=False,
                                       verbose=False)
    (group, batch), = list(encoder.batches(feats, batch_size=4))

    @jax.jit
    def user_pipeline(params, batch, w):
        out = apply(params, batch)
        score = out["anchor"] @ w                       # e.g. a downstream linear probe
        return jnp.where(batch["graph"].graph_mask, score, 0.0), out["tree_codes"]

    w = jnp.ones(16)
    score, codes = user_pipeline(params, batch, w)
    again, _ = user_pipeline(params, batch, w)
    np.testing.assert_array_equal(np.asarray(score), np.asarray(again))
    assert np.asarray(score)[:3].any() and np.all(np.asarray(score)[3:] == 0)
    assert np.all(np.asarray(tree_vq.level_of(codes[:3])) == np.arange(1, 4))
    # Gradients flow through the pure function w.r.t. the parameters (e.g. for probing or tuning).
    grads = jax.grad(lambda p: user_pipeline(p, batch, w)[0].sum())(params)
    assert max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 0


def test_embed_smiles_equals_the_embed_command(exported, tiny_run):
    # the same molecules, ids and batch size as the command (so the same compiled shapes): every array
    # equal, the rejects left out (no padding rows)
    with pytest.warns(UserWarning, match=r"2 of 7 SMILES rejected .*row 3 'not-a-smiles'"):
        got = chmr_jax.embed_smiles(str(tiny_run), NEW_MOLECULES, ids=[f"m{i}" for i in range(len(NEW_MOLECULES))],
                                    batch_size=2)
    want, _ = chmr_jax.load_embeddings(exported)
    assert sorted(got) == sorted(want) and len(got["anchor"]) == 5
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    arrays, rejects = chmr_jax.embed_smiles(chmr_jax.load_encoder(tiny_run), ["CCO", "C1CC"], return_rejects=True)
    assert arrays["id"].tolist() == ["row0"] and arrays["tree_codes"].shape[0] == 1
    assert [(r["row"], r["smiles"]) for r in rejects] == [(1, "C1CC")]


def test_embed_errors_name_the_problem(tiny_run, tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("name,structure\nm0,CCO\n")
    assert cli.main(["embed", "--pretrained", str(tiny_run), "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["embed", "--pretrained", str(tmp_path), "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    smi = tmp_path / "x.smi"
    smi.write_text("# header\nCCO ethanol\nc1ccccc1\n")
    assert export.read_molecules(smi) == (["CCO", "c1ccccc1"], ["ethanol", "line3"])
