"""Run by tests/test_records.py as each of 2 JAX processes (CPU, gloo, one device each): pretraining's first
use of the tiny config's corpus, each process given its own local cache (CACHE_ROOT/host<i>: a folder on each
host's disk, not shared), as on main where each process built its own copy. Writes its log and a digest of the
corpus it read to CACHE_ROOT/process_<i>.json.

  python tests/two_process_local_caches.py PORT PROCESS_ID CACHE_ROOT"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from two_process_records import CONFIG, corpus_digest  # noqa: E402


def main():
    port, process_id, root = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    from chmr_jax import config_util
    from chmr_jax.training import pretrain
    config = config_util.load_config(CONFIG)
    config.cache_dir = str(root / f"host{process_id}")
    lines = []
    corpus = pretrain.load_corpus(config, None, config.cache_dir, 1, log=lines.append)
    (root / f"process_{process_id}.json").write_text(json.dumps(
        {"log": lines, "digest": corpus_digest(corpus), "path": str(pretrain.corpus_cache_path(config, config.cache_dir))}))


if __name__ == "__main__":
    main()
