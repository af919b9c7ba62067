"""Run by tests/test_multiprocess.py as each of 2 JAX processes (CPU, gloo, one device each): both save
checkpoints 1 and 2 of a small state into one directory, then process 1 alone reads step 2 as corrupt
(its digest check fails there, as a bad disk or cache on one host would) and both restore the newest
good step. Each writes the step it restored to OUT_DIR/restored_<process>.json.

  python tests/two_process_checkpoint.py PORT PROCESS_ID CKPT_DIR OUT_DIR"""
import json
import sys
from pathlib import Path


def main():
    port, process_id, directory, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from chmr_jax.training import checkpoint, train
    replicated = NamedSharding(train.data_mesh(jax.devices()), PartitionSpec())

    def global_array(a):     # replicated over both processes' devices, as the train state is
        return jax.make_array_from_callback(a.shape, replicated, lambda index: a[index])

    def state(scale):
        return {"params": {"w": global_array(np.full((4, 3), scale, np.float32))},
                "rest": {"mean": global_array(np.ones(3, np.float32))}}

    ckpt = checkpoint.Checkpointer(directory, async_save=False)
    for step in (1, 2):
        ckpt.save(step, state(float(step)), {"step": step})
    ckpt.wait()
    if process_id == 1:
        real = checkpoint._digest
        checkpoint._digest = lambda x: "0" * 32 if float(train.host_array(x).ravel()[0]) == 2.0 else real(x)
    warnings = []
    restored, meta = ckpt.restore_newest_good(state(0.0), warnings.append)
    ckpt.close()
    (out / f"restored_{process_id}.json").write_text(json.dumps(
        {"step": meta["step"], "w": float(train.host_array(restored["params"]["w"])[0, 0]), "warnings": warnings}))


if __name__ == "__main__":
    main()
