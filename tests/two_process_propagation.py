"""Run by tests/test_propagation_sharded.py as each of 2 JAX processes (CPU, gloo, 2 devices each): the
sharded kNN (replicated and ring-sharded database) and propagation over the 4-device mesh of both
processes (train.data_mesh, as pretrain_data.prepare uses); process 0 saves what every process received.

  python tests/two_process_propagation.py PORT PROCESS_ID OUT_DIR"""
import sys
from pathlib import Path


def inputs():
    """The same deterministic inputs on every process (and in the test that checks them)."""
    import numpy as np
    rng = np.random.default_rng(7)
    bits = (rng.random((101, 48)) < 0.25).astype(np.uint8)
    x = rng.normal(size=(101, 9)).astype(np.float32)
    observed = rng.random(101) < 0.3
    return np.packbits(bits, axis=1), x, observed


def main():
    port, process_id, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    import numpy as np

    from chmr_jax.mechanisms import propagation as PR
    from chmr_jax.training import train

    mesh = train.data_mesh()
    packed, x, observed = inputs()
    results = {"devices": np.array([mesh.size, jax.process_count()])}
    for database in ("replicated", "sharded"):
        idx, sim = PR.tanimoto_knn(packed, k=5, n_bits=48, mesh=mesh, database=database, block=8, db_block=8)
        results[f"idx_{database}"], results[f"sim_{database}"] = idx, sim
    graph = PR.shard_graph(PR.build_graph(results["idx_replicated"], results["sim_replicated"]), mesh)
    r = PR.propagate(graph, x, observed, steps=5, width_chunk=4)
    results.update(x=r.x, reached=r.reached, energy=r.energy)
    np.savez(out / f"process_{process_id}.npz", **results)


if __name__ == "__main__":
    main()
