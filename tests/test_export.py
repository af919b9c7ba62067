"""Export: the three formats round-trip, the encoder is a pure function usable inside user jit code,
molecules never seen in pretraining embed from SMILES alone; the streaming `embed` writes shards in
input order (rejects inside shards), resumes after a kill without rewriting finished shards, refuses a
changed input or encoder, reads gzip CSV / .smi / Parquet, and two processes write what one does."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

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


# shards of 3 rows: [m0 m1 m2] [m3* m4 m5] [m6*] (* rejected): a reject opens one shard, fills another
EMBED_ARGS = ["embed", "--smiles_column", "SMILES", "--id_column", "name", "--batch_size", "2", "--shard_size", "3",
              "--workers", "1", "--no_progress"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("embed")
    src = tmp / "new.csv"
    src.write_text("name,SMILES\n" + "\n".join(f"m{i},{s}" for i, s in enumerate(NEW_MOLECULES)) + "\n")
    out = tmp / "out"
    rc = cli.main(EMBED_ARGS + ["--pretrained", str(tiny_run), "--input", str(src), "--out", str(out)])
    assert rc == 0
    return out


def test_manifest_lists_the_model_the_featurizer_and_the_rejects(exported, tiny_run):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["checkpoint_step"] == 10 and manifest["molecules"] == 5
    assert [(r["row"], r["id"]) for r in manifest["rejects"]] == [(3, "m3"), (6, "m6")]
    assert manifest["model"]["tree_depth"] == 3 and manifest["featurizer"]["morgan_size"] == 256
    assert manifest["arrays"]["tree_vectors"]["shape"] == [3, 16]
    assert set(manifest["formats"]) == {"numpy", "parquet", "tfds"}
    assert [(s["rows"], s["molecules"]) for s in manifest["shards"]] == [([0, 3], 3), ([3, 6], 2), ([6, 7], 0)]
    for s in manifest["shards"]:     # every listed file exists with its digest
        for rel, digest in s["files"].items():
            assert export._sha256(exported / rel) == digest, rel
    assert (exported / "numpy" / "anchor-00001.npy").exists() and not (exported / "embeddings.npz").exists()


@pytest.mark.parametrize("fmt", ["numpy", "parquet", "tfds"])
def test_every_format_round_trips_to_the_same_arrays(exported, fmt):
    reference, _ = chmr_jax.load_embeddings(exported, "npz")    # the old name of "numpy" still works
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


def test_loaded_arrays_are_lazy_views_in_input_order(exported):
    arrays, _ = chmr_jax.load_embeddings(exported)
    anchor = arrays["anchor"]
    assert isinstance(anchor, export.ShardedArray) and anchor.shape == (5, 16) and len(anchor) == 5
    full = np.asarray(anchor)
    for key in (3, -1, slice(1, 4), slice(None, None, -2), [4, 0, 3], np.array([True, False, True, False, True])):
        np.testing.assert_array_equal(anchor[key], full[key], err_msg=str(key))
    np.testing.assert_array_equal(arrays["tree_vectors"][1:4, 2], np.asarray(arrays["tree_vectors"])[1:4, 2])
    assert arrays["id"][3] == "m4"
    # a read loads only the shards it touches, memory-mapped
    loaded, load = [], anchor._load
    anchor._load = lambda s: loaded.append(s) or load(s)
    assert isinstance(load(1), np.memmap)
    np.testing.assert_array_equal(anchor[3:5], full[3:5])    # rows 3, 4: shard 1 (shard 0 holds rows 0-2)
    assert loaded == [1]


def test_tfds_data_source_reads_the_shards_in_input_order(exported):
    import tensorflow_datasets as tfds
    source = tfds.data_source(export.TFDS_NAME, data_dir=exported / "tfds", split="train")
    assert len(source) == 5
    assert [source[i]["id"].decode() for i in range(5)] == ["m0", "m1", "m2", "m4", "m5"]
    shards = sorted(p.name for p in (exported / export.TFDS_DIR).glob("*array_record*"))
    assert shards == [f"chmr_embeddings-train.array_record-0000{i}-of-00003" for i in range(3)]


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


def _write_input(path: Path, rows) -> Path:
    text = "name,SMILES\n" + "".join(f"{i},{s}\n" for i, s in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def _assert_same_arrays(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert a.shape == b.shape, name
        if b.dtype.kind == "U":
            assert a.tolist() == b.tolist(), name
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def _subprocess_env(**extra):
    # the same 8 CPU devices as this test process (conftest), so the same budget and compiled shapes
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **extra}


def test_a_killed_embed_resumes_without_rewriting_finished_shards(exported, tiny_run, tmp_path, capsys):
    src = _write_input(tmp_path / "new.csv", [(f"m{i}", s) for i, s in enumerate(NEW_MOLECULES)])
    out = tmp_path / "out"
    args = EMBED_ARGS + ["--pretrained", str(tiny_run), "--input", str(src), "--out", str(out)]
    # a real crash after the first shard: the process SIGKILLs itself at the shard boundary
    run = subprocess.run([sys.executable, "-m", "chmr_jax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         env=_subprocess_env(CHMR_EMBED_KILL_AFTER_SHARDS="1"), timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert (out / "shards" / "00000.json").exists() and not (out / "shards" / "00001.json").exists()
    assert not (out / "manifest.json").exists()
    first = [out / rel for rel in json.loads((out / "shards" / "00000.json").read_text())["files"]]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first}
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "resuming: 1 of 3 shards of this process already written (digests checked), skipped: [0]" in \
        capsys.readouterr().out
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in first} == stamps    # not rewritten
    for fmt in ("numpy", "parquet", "tfds"):
        _assert_same_arrays(chmr_jax.load_embeddings(out, fmt)[0], chmr_jax.load_embeddings(exported)[0])
    # a damaged shard file fails its digest: that shard (only) is embedded again
    victim = out / "numpy" / "anchor-00001.npy"
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    assert cli.main(args) == 0
    assert "skipped: [0, 2]" in capsys.readouterr().out
    _assert_same_arrays(chmr_jax.load_embeddings(out)[0], chmr_jax.load_embeddings(exported)[0])


def test_a_changed_input_or_encoder_is_refused(exported, tiny_run, tmp_path, capsys):
    src = _write_input(tmp_path / "new.csv", [(f"m{i}", s) for i, s in enumerate(NEW_MOLECULES)])
    out = tmp_path / "out"
    args = EMBED_ARGS + ["--pretrained", str(tiny_run), "--input", str(src), "--out", str(out)]
    assert cli.main(args) == 0
    before = (out / "manifest.json").read_text()
    _write_input(src, [(f"m{i}", s) for i, s in enumerate(NEW_MOLECULES + ["CCC"])])
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "holds an export of a different input (rows: 7 -> 8)" in err and "pass a new --out" in err
    _write_input(src, [(f"m{i}", s) for i, s in enumerate(NEW_MOLECULES)])
    assert cli.main(args + ["--step", "8"]) == 2
    assert "different encoder (checkpoint_step: 10 -> 8)" in capsys.readouterr().err
    assert cli.main(args[:-2] + ["--out", str(out), "--shard_size", "2"]) == 2     # argparse: the last one wins
    assert "made with other flags (--shard_size: 3 -> 2)" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before      # nothing mixed in


@pytest.mark.parametrize("kind", ["csv.gz", "parquet", "smi"])
def test_gzip_csv_parquet_and_smi_inputs(exported, tiny_run, tmp_path, kind):
    rows = [(f"m{i}", s) for i, s in enumerate(NEW_MOLECULES)]
    src = tmp_path / f"new.{kind}"
    if kind == "csv.gz":
        _write_input(src, rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"name": [i for i, _ in rows], "SMILES": [s for _, s in rows]}), src,
                       row_group_size=2)
    else:
        # .smi: 'SMILES id' lines; an empty SMILES cannot be written, so that row is left out
        src.write_text("# new molecules\n" + "".join(f"{s} {i}\n" for i, s in rows if s))
    out = tmp_path / "out"
    assert cli.main(EMBED_ARGS + ["--pretrained", str(tiny_run), "--input", str(src), "--out", str(out),
                                          "--formats", "numpy"]) == 0
    got, manifest = chmr_jax.load_embeddings(out)
    want, _ = chmr_jax.load_embeddings(exported)
    _assert_same_arrays(got, want)     # the same shards of the same molecules: the same batches
    assert [r["row"] for r in manifest["rejects"]] == ([3, 6] if kind != "smi" else [3])


def test_two_processes_write_what_one_process_writes(tiny_run, tmp_path, data_dir):
    import csv
    with open(data_dir / "moleculenet" / "bbbp.csv", newline="") as fh:
        smiles = [r["smiles"] for _, r in zip(range(40), csv.DictReader(fh))]
    smiles[9] = "bad(("                                               # a reject inside a shard
    src = _write_input(tmp_path / "lib.csv", [(f"b{i}", s) for i, s in enumerate(smiles)])
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"out{n}"
        run = subprocess.run(
            ["bash", str(ROOT / "launch" / "two_process.sh"), str(tmp_path / f"logs{n}"), "--pretrained", str(tiny_run),
             "--input", str(src), "--out", str(outs[n]), "--smiles_column", "SMILES", "--id_column", "name",
             "--shard_size", "7", "--batch_size", "8", "--workers", "1", "--no_progress"],
            env={**os.environ, "PYTHON": sys.executable, "CHMR_COMMAND": "embed", "NUM_PROCESSES": str(n)},
            capture_output=True, text=True, timeout=300)
        logs = "".join(p.read_text()[-2000:] for p in sorted((tmp_path / f"logs{n}").glob("*.log")))
        assert run.returncode == 0, run.stderr + logs
    one, m1 = chmr_jax.load_embeddings(outs[1])
    two, m2 = chmr_jax.load_embeddings(outs[2])
    assert m2["processes"] == 2 and len(m2["shards"]) == 6 and [r["row"] for r in m2["rejects"]] == [9]
    assert one["id"].tolist() == [f"b{i}" for i in range(40) if i != 9]
    _assert_same_arrays(two, one)
    for i, mine in ((0, [0, 2, 4]), (1, [1, 3, 5])):     # each process embedded and wrote its own shards
        assert f"process {i} of 2: wrote shards {mine}" in (tmp_path / "logs2" / f"process_{i}.log").read_text()
