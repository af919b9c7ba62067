"""Run by tests/test_records.py as each of 2 JAX processes (CPU, gloo, one device each): pretraining's first
use of the tiny config's corpus (pretrain.load_corpus) with an empty cache, so the processes build the records
in shares; each writes its log and a digest of the corpus it then read.

Then both build the same corpus with TOO_BIG's two rejects added into OUT_DIR/with_rejects (records.build), and
compute the 3D geometry of a few of its molecules in shares (records.geometry) into OUT_DIR/geometry_<i>.npz.

  python tests/two_process_records.py PORT PROCESS_ID CACHE_DIR OUT_DIR   (CACHE_DIR: a folder or gs:// URL)"""
import hashlib
import json
import sys
from pathlib import Path

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "test.py")
# Two molecules the featurizer rejects (over configs/test.py's max_atoms=64), put at plan rows 0 and 1: one in
# each process' share, so the processes must agree on the corpus order through their exchange of rejects.
TOO_BIG = [("C" * 70, "big"), ("C" * 71, "big")]
GEOMETRY_MOLECULES = 9


def corpus_digest(corpus) -> str:
    """sha256 over every array of a Corpus (keys, smiles, features, modalities, gene edges)."""
    import numpy as np
    h = hashlib.sha256()
    arrays = [corpus.keys, corpus.smiles] + [getattr(corpus.features, n) for n in corpus.features._ARRAYS]
    for name in sorted(corpus.modalities):
        arrays += [corpus.modalities[name].values, corpus.modalities[name].available]
    if corpus.gene_edges is not None:
        arrays.append(np.asarray(corpus.gene_edges, dtype=str))
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(corpus.features.rejects).encode())
    return h.hexdigest()


def main():
    port, process_id, cache_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)

    from chmr_jax import config_util
    from chmr_jax.data import paths
    from chmr_jax.training import pretrain

    cache_dir = str(paths.resolve_cache_dir(cache_dir))   # (a gs:// cache: this process' local mirror of it)
    config = config_util.load_config(CONFIG)
    config.cache_dir = cache_dir
    lines = []
    corpus = pretrain.load_corpus(config, None, cache_dir, 1, log=lines.append)
    from chmr_jax.data import featurize, prepare, records
    inputs = prepare.corpus_inputs(config.corpus, featurize.FeaturizerSettings.from_config(config.featurize),
                                   None, cache_dir, 1)
    inputs["structures"] = TOO_BIG + inputs["structures"]
    lines_rejects = []
    records.build(inputs, out / "with_rejects", records.Share.of_jax(), log=lines_rejects.append)
    # 3D geometry of the first GEOMETRY_MOLECULES molecules (and an unparsable one), each process its share.
    import numpy as np
    from chmr_jax.data import geometry
    lines_geometry = []
    geo = records.geometry(list(corpus.smiles[:GEOMETRY_MOLECULES]) + ["not a smiles"], geometry.GeometrySettings(),
                           out / f"geometry_cache_{process_id}", "corpus", 1, records.Share.of_jax(),
                           lines_geometry.append)
    np.savez(out / f"geometry_{process_id}.npz", values=geo.values, ok=geo.ok, reasons=np.array(json.dumps(geo.reasons)))
    (out / f"process_{process_id}.json").write_text(json.dumps(
        {"log": lines, "digest": corpus_digest(corpus), "molecules": len(corpus),
         "path": str(pretrain.corpus_cache_path(config, cache_dir)), "log_rejects": lines_rejects,
         "log_geometry": lines_geometry}))


if __name__ == "__main__":
    main()
