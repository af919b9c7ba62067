"""Corpus records (data/records.py): the records read back as the corpus corpus.assemble builds, array for
array; two processes (CPU, gloo) build them in halves, each featurizing only its share, and their records
equal a 1-process build's byte for byte; a cache of the older npz format is still read."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from chmr_jax import config_util
from chmr_jax.data import corpus as C, featurize, prepare, records

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = str(ROOT / "configs" / "test.py")

def _script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("two_process_records", ROOT / "tests" / "two_process_records.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
TOO_BIG = SCRIPT.TOO_BIG   # two molecules the featurizer rejects, at plan rows 0 and 1


def tiny_inputs(cache_dir, with_rejects=True):
    config = config_util.load_config(TEST_CONFIG)
    inputs = prepare.corpus_inputs(config.corpus, featurize.FeaturizerSettings.from_config(config.featurize),
                                   None, cache_dir, 1)
    if with_rejects:
        inputs["structures"] = TOO_BIG + inputs["structures"]
    return inputs


def assert_same_corpus(a: C.Corpus, b: C.Corpus):
    def same(x, y, what):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (what, x.dtype, y.dtype, x.shape, y.shape)
        np.testing.assert_array_equal(x, y, err_msg=what)

    same(a.keys, b.keys, "keys")
    same(a.smiles, b.smiles, "smiles")
    for name in a.features._ARRAYS:
        same(getattr(a.features, name), getattr(b.features, name), f"features.{name}")
    assert (a.features.n_input, a.features.rejects, a.features.settings) == \
        (b.features.n_input, b.features.rejects, b.features.settings)
    assert list(a.modalities) == list(b.modalities)
    for name, m in a.modalities.items():
        same(m.values, b.modalities[name].values, f"{name}.values")
        same(m.available, b.modalities[name].available, f"{name}.available")
        assert (m.feature_names, m.sources) == (b.modalities[name].feature_names, b.modalities[name].sources)
    same(a.gene_edges, b.gene_edges, "gene_edges")
    when = ("created_unix", "seconds")
    assert {k: v for k, v in a.manifest.items() if k not in when} == {k: v for k, v in b.manifest.items() if k not in when}


def test_records_read_back_as_the_assembled_corpus(tmp_path):
    inputs = tiny_inputs(tmp_path / "cache")
    want = C.assemble(**inputs, verbose=False)
    assert len(want.features.rejects) == 2 and want.manifest["counts"]["featurize_rejects"] == 2
    lines = []
    info = records.build(inputs, tmp_path / "rec", records.Share(), "digest", log=lines.append)
    n = len(want.features.rejects) + len(want)
    assert lines[0].startswith(f"corpus: featurized {n} of {n} molecules (process 0 of 1)")
    assert info["records"] == len(want) and sorted(p.name for p in (tmp_path / "rec").iterdir()) == \
        ["gene_edges.npy", "manifest.json", "records-p00000-of-00001.array_record"]
    got = C.Corpus.load(tmp_path / "rec")
    assert_same_corpus(got, want)
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())["records"]
    assert manifest["settings_digest"] == "digest" and manifest["version"] == records.RECORDS_VERSION
    assert [s["records"] for s in manifest["shards"]] == [len(want)]
    # A record holds its molecule's observed profiles only: no row for a missing modality.
    decoded = [records.decode(r) for r in records.read_records(tmp_path / "rec")]
    assert [d["index"] for d in decoded] == list(range(len(want)))
    for i, d in enumerate(decoded):
        assert sorted(d["profiles"]) == sorted(m for m, mod in want.modalities.items() if mod.available[i])
    assert any(not d["profiles"] for d in decoded) and any(len(d["profiles"]) > 1 for d in decoded)
    # A shard that differs from the manifest is refused.
    shard = tmp_path / "rec" / manifest["shards"][0]["name"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(C.CorpusError, match="sha256"):
        C.Corpus.load(tmp_path / "rec")


@dataclasses.dataclass(frozen=True)
class Peer(records.Share):
    """Process 0 of 2, whose process 1 is `answer`: it answers every exchange with answer(obj) (obj: this
    process' part); barriers pass."""
    answer: Callable = lambda obj: obj

    def exchange(self, obj) -> list:
        return [obj, self.answer(obj)]

    def barrier(self, name: str) -> None:
        pass


def test_processes_that_plan_different_molecule_lists_stop_before_featurizing(tmp_path, monkeypatch):
    inputs = tiny_inputs(tmp_path / "cache", with_rejects=False)
    plan = C.plan_molecules(inputs["structures"], inputs["modality_sources"], inputs["join"], inputs["exclude_keys"])
    featurized = []
    real = featurize.featurize_smiles
    monkeypatch.setattr(featurize, "featurize_smiles", lambda *a, **k: featurized.append(1) or real(*a, **k))
    # Process 1 read another exclusion list: one molecule fewer (its list's digest differs too).
    fewer = lambda obj: {**obj, "molecules": obj["molecules"] - 1, "sha256": "0" * 64} \
        if isinstance(obj, dict) and "sha256" in obj and "molecules" in obj else obj
    with pytest.raises(C.CorpusError, match=rf"different molecule lists \(process 0: {len(plan.order)} molecules, "
                                            rf".*process 1: {len(plan.order) - 1} molecules"):
        records.build(inputs, tmp_path / "rec", Peer(0, 2, fewer), log=lambda *a: None)
    assert not featurized and not (tmp_path / "rec" / "manifest.json").exists()


def test_no_manifest_lists_a_shard_that_process_0_cannot_see(tmp_path):
    inputs = tiny_inputs(tmp_path / "cache", with_rejects=False)
    # Process 1 wrote its shard into a folder of the same name on its own host.
    elsewhere = lambda obj: {**obj, "name": records.shard_name(1, 2)} if isinstance(obj, dict) and "sha256" in obj \
        and "name" in obj else obj
    with pytest.raises(C.CorpusError, match=r"process 0 does not see the shards \['records-p00001-of-00002"):
        records.build(inputs, tmp_path / "rec", Peer(0, 2, elsewhere), log=lambda *a: None)
    assert not (tmp_path / "rec" / "manifest.json").exists()


def test_two_processes_with_a_local_cache_each_build_the_whole_corpus_each(tmp_path):
    """A cache folder of each host's own (unshared): found before featurizing, each process builds the whole
    corpus into its own cache (one shard), as before the records."""
    outs, codes = run_two(ROOT / "tests" / "two_process_local_caches.py", str(tmp_path))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in (0, 1)]
    for i, g in enumerate(got):
        assert any("the processes do not share the cache" in line and "each process builds the whole corpus" in line
                   for line in g["log"]), g["log"]
        n = [line for line in g["log"] if line.startswith("corpus: featurized")]
        assert len(n) == 1 and "(process 0 of 1)" in n[0], g["log"]
        manifest = json.loads((Path(g["path"]) / "manifest.json").read_text())["records"]
        assert [s["name"] for s in manifest["shards"]] == [records.shard_name(0, 1)]
    assert got[0]["digest"] == got[1]["digest"]
    assert not list(tmp_path.rglob(records.PROBE))


def run_two(script, *args) -> tuple[list[str], list[int]]:
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs, [p.returncode for p in procs]


def test_the_synthetic_layout_is_written_beside_its_folder_then_renamed(tmp_path, monkeypatch):
    from chmr_jax.data import synthetic
    written = []
    real = synthetic.write_synthetic_paper_layout
    monkeypatch.setattr(synthetic, "write_synthetic_paper_layout", lambda root, *a, **k: written.append(Path(root))
                        or real(root, *a, **k))
    tiny_inputs(tmp_path / "cache", with_rejects=False)
    layouts = sorted((tmp_path / "cache").glob("synthetic-layout-*"))
    assert len(written) == 1 and written[0] not in layouts and len(layouts) == 1   # (no temporary folder left)
    assert (layouts[0] / "L1k_idmaps.csv").exists()
    # Another process' complete layout already there when this one's is done: it is kept.
    prepare._write_layout_atomically(layouts[0], lambda where: (where / "L1k_idmaps.csv").write_text("other"))
    assert (layouts[0] / "L1k_idmaps.csv").read_text() != "other"
    assert sorted((tmp_path / "cache").glob("synthetic-layout-*")) == layouts


def test_pretraining_still_reads_a_corpus_cached_in_the_npz_format(tmp_path):
    from chmr_jax.training import pretrain
    config = config_util.load_config(TEST_CONFIG)
    corpus = C.assemble(**tiny_inputs(tmp_path / "cache", with_rejects=False), verbose=False)
    corpus.save(pretrain.corpus_cache_path(config, tmp_path / "cache"))     # as a cache written before the records
    lines = []
    got = pretrain.load_corpus(config, None, tmp_path / "cache", 1, log=lines.append)
    assert not any("building" in line for line in lines) and any("corpus: cached" in line for line in lines)
    assert_same_corpus(got, corpus)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_build_the_records_in_halves(tmp_path):
    from chmr_jax.training import pretrain
    cache = tmp_path / "cache2"   # empty: pretraining's first use builds the corpus
    outs, codes = run_two(ROOT / "tests" / "two_process_records.py", str(cache), str(tmp_path))
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    got = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in (0, 1)]

    # The same corpus built by one process (from the same cache: the generated layout's files, which the
    # manifest names, are there; the feature cache of one process' list is not: it featurizes every molecule).
    config = config_util.load_config(TEST_CONFIG)
    one = tmp_path / "one"
    inputs = prepare.corpus_inputs(config.corpus, featurize.FeaturizerSettings.from_config(config.featurize),
                                   None, cache, 1)
    records.build(inputs, one, records.Share(), log=lambda *a: None)
    want = C.Corpus.load(one)
    n = len(want) + len(want.features.rejects)

    # Each process computed the join keys of its half of the structures and featurized its half of the
    # molecules (rows i % 2 == p), and says so.
    for i, g in enumerate(got):
        assert f"corpus: computed {len(range(i, 96, 2))} of 96 join keys (process {i} of 2)" in g["log"], g["log"]
        found = [line for line in g["log"] if line.startswith("corpus: featurized")]
        assert len(found) == 1 and found[0].startswith(
            f"corpus: featurized {len(range(i, n, 2))} of {n} molecules (process {i} of 2)"), g["log"]
    two = Path(got[0]["path"])
    assert got[1]["path"] == str(two) and two.parent == cache
    manifest = json.loads((two / "manifest.json").read_text())["records"]
    assert [s["name"] for s in manifest["shards"]] == [records.shard_name(i, 2) for i in (0, 1)]
    assert [s["featurized"] for s in manifest["shards"]] == [len(range(i, n, 2)) for i in (0, 1)]
    assert manifest["settings_digest"] == two.name.rsplit("-", 1)[-1] == \
        pretrain.corpus_cache_path(config, cache).name.rsplit("-", 1)[-1]
    # The union of the two processes' records is the 1-process build's, record for record, byte for byte.
    assert records.read_records(two) == records.read_records(one)
    # Both processes then read the 1-process corpus.
    assert got[0]["digest"] == got[1]["digest"] == SCRIPT.corpus_digest(want)
    assert_same_corpus(C.Corpus.load(two), want)

    # With a reject in each share (plan rows 0 and 1): the same corpus order on both processes.
    inputs["structures"] = TOO_BIG + inputs["structures"]
    records.build(inputs, tmp_path / "one_rejects", records.Share(), log=lambda *a: None)
    want = C.Corpus.load(tmp_path / "one_rejects")
    assert [r[:1] for r in want.features.rejects] == [(0,), (1,)]
    for i, g in enumerate(got):
        assert g["log_rejects"][0].startswith(f"corpus: featurized {len(range(i, n + 2, 2))} of {n + 2} molecules "
                                              f"(process {i} of 2)"), g["log_rejects"]
    assert records.read_records(tmp_path / "with_rejects") == records.read_records(tmp_path / "one_rejects")
    assert_same_corpus(C.Corpus.load(tmp_path / "with_rejects"), want)

    # 3D geometry, each process embedding its share: every process holds the 1-process result.
    from chmr_jax.data import geometry
    smiles = list(want.smiles[:SCRIPT.GEOMETRY_MOLECULES]) + ["not a smiles"]
    one_geo = geometry.featurize_geometry(smiles, geometry.GeometrySettings(), None, show_progress=False)
    assert one_geo.ok.sum() == len(smiles) - 1 and [r[0] for r in one_geo.reasons] == [len(smiles) - 1]
    for i, g in enumerate(got):
        assert g["log_geometry"][0].startswith(
            f"geometry: embedded {len(range(i, len(smiles), 2))} of {len(smiles)} molecules (process {i} of 2)")
        with np.load(tmp_path / f"geometry_{i}.npz") as two_geo:
            np.testing.assert_array_equal(two_geo["values"], one_geo.values)
            np.testing.assert_array_equal(two_geo["ok"], one_geo.ok)
            assert [tuple(r) for r in json.loads(str(two_geo["reasons"]))] == one_geo.reasons
    # Process 0 cached the whole under the 1-process name: a 1-process run loads it as its own.
    import dataclasses
    key = featurize.cache_key(smiles, dataclasses.asdict(geometry.GeometrySettings()), "geometry")
    assert (tmp_path / "geometry_cache_0" / f"corpus-geometry-{key}.npz").exists()
    assert not (tmp_path / "geometry_cache_1" / f"corpus-geometry-{key}.npz").exists()
    cached = geometry.featurize_geometry(smiles, geometry.GeometrySettings(), tmp_path / "geometry_cache_0", "corpus")
    np.testing.assert_array_equal(cached.values, one_geo.values)


def test_the_benchmarks_keys_come_from_their_datasets_not_computed_again(tmp_path, monkeypatch):
    """include_benchmarks: each benchmark's join keys (inchikey14) are its dataset's, computed and cached when
    it loads; plan_molecules (whose keys_of shares the work between processes) computes none of them again."""
    import types
    from chmr_jax.data import datasets
    smiles = ["CCO", "c1ccccc1", "not a smiles"]
    keys = featurize.keys_of_smiles(smiles, "inchikey14", 1)
    monkeypatch.setattr(datasets, "load_benchmark", lambda name, *a, **k: types.SimpleNamespace(
        smiles=np.array(smiles), keys=np.array(keys, dtype="<U14")))
    config = config_util.load_config(TEST_CONFIG)
    config.corpus.include_benchmarks = True
    computed = []
    keys_of = lambda s, join, workers: computed.extend(s) or featurize.keys_of_smiles(s, join, workers)
    inputs = prepare.corpus_inputs(config.corpus, featurize.FeaturizerSettings.from_config(config.featurize),
                                   None, tmp_path / "cache", 1, keys_of)
    assert inputs["structures"][-3:] == [(s, datasets.ALL_BENCHMARKS[-1], k) for s, k in zip(smiles, keys)]
    computed.clear()
    plan = C.plan_molecules(inputs["structures"], inputs["modality_sources"], inputs["join"], inputs["exclude_keys"],
                            1, keys_of)
    assert computed == [] and plan.counts["structures_unparsable"] == len(datasets.ALL_BENCHMARKS)


def test_a_rebuild_into_the_same_folder_drops_the_earlier_manifest_and_gene_edges_first(tmp_path, monkeypatch):
    inputs = tiny_inputs(tmp_path / "cache", with_rejects=False)
    assert inputs["gene_edges"] is not None
    records.build(inputs, tmp_path / "rec", records.Share(), log=lambda *a: None)
    assert (tmp_path / "rec" / "gene_edges.npy").exists()
    # A rebuild that stops while featurizing leaves no manifest (of the earlier corpus, listing its shards)
    # and none of the earlier corpus' files that the new one may not have.
    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(featurize, "featurize_smiles", stop)
    with pytest.raises(KeyboardInterrupt):
        records.build(inputs, tmp_path / "rec", records.Share(), log=lambda *a: None)
    assert not (tmp_path / "rec" / "manifest.json").exists() and not (tmp_path / "rec" / "gene_edges.npy").exists()
    monkeypatch.undo()
    # A corpus without gene edges built where one with them was: it has none.
    records.build(inputs, tmp_path / "rec", records.Share(), log=lambda *a: None)
    records.build({**inputs, "gene_edges": None}, tmp_path / "rec", records.Share(), log=lambda *a: None)
    assert C.Corpus.load(tmp_path / "rec").gene_edges is None
    assert C.assemble(**{**inputs, "gene_edges": None}, verbose=False).gene_edges is None


def test_a_missing_shard_or_a_truncated_manifest_is_named_with_what_to_do(tmp_path):
    import shutil
    inputs = tiny_inputs(tmp_path / "cache", with_rejects=False)
    records.build(inputs, tmp_path / "rec", records.Share(), log=lambda *a: None)
    manifest = json.loads((tmp_path / "rec" / "manifest.json").read_text())
    # An older chmr_jax (which reads format_version, then corpus.npz) stops at the format, not at a missing file.
    assert manifest["format_version"] == records.FORMAT_VERSION != C.FORMAT_VERSION
    assert C.Corpus.load(tmp_path / "rec").manifest["format_version"] == C.FORMAT_VERSION   # (as assemble's)
    shutil.copytree(tmp_path / "rec", tmp_path / "lacking")
    (tmp_path / "lacking" / records.shard_name(0, 1)).unlink()
    with pytest.raises(C.CorpusError, match=rf"lacking: the shard {records.shard_name(0, 1)} that its manifest lists "
                                            r"is missing; .*delete the folder .*build it again") as e:
        C.Corpus.load(tmp_path / "lacking")
    assert "\n" not in str(e.value)
    shutil.copytree(tmp_path / "rec", tmp_path / "truncated")
    (tmp_path / "truncated" / "manifest.json").write_text((tmp_path / "rec" / "manifest.json").read_text()[:100])
    for read in (C.Corpus.load, records.missing):
        with pytest.raises(C.CorpusError, match=r"truncated/manifest.json: not a JSON manifest"):
            read(tmp_path / "truncated")
