"""Run by tests/test_multiprocess.py as each of 2 JAX processes (CPU, gloo, one device each): builds the
tiny config's first pretraining batches the way `pretrain.run` does (this host's rows only, then one
global array), gathers them and, on process 0, saves them for comparison with the 1-process batch.

  python tests/two_process_batch.py PORT PROCESS_ID CACHE_DIR OUT_DIR"""
import json
import sys
from pathlib import Path

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "test.py")
STEPS = 2


def main():
    port, process_id, cache_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    import numpy as np
    from jax.experimental import multihost_utils

    from chmr_jax import config_util
    from chmr_jax.training import pretrain, pretrain_data, train

    config = config_util.load_config(CONFIG)
    config.cache_dir = cache_dir
    mesh = train.data_mesh(jax.devices())
    _, data = pretrain.build_inputs(config, len(jax.devices()), log=lambda *a: None)
    rows = train.local_rows(data.budget, mesh)
    plan = pretrain_data.BatchPlan(data, config.train.seed)
    gathered = {}
    for step, _, group in plan.iterate(0, STEPS):
        local = pretrain_data.batch_of(data, group, rows)
        batch = train.assemble_batch(local, mesh)
        leaves = jax.tree_util.tree_leaves_with_path(multihost_utils.process_allgather(batch, tiled=True))
        gathered.update({f"{step}{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in leaves})
    (out / f"rows_{process_id}.json").write_text(json.dumps(
        {"node": rows.node, "edge": rows.edge, "graph": rows.graph, "budget": data.budget.__dict__,
         "local_nodes": int(local["graph"].nodes.shape[0])}))
    if process_id == 0:
        np.savez(out / "batches.npz", **gathered)


if __name__ == "__main__":
    main()
