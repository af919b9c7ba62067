"""The pretraining step compiled for a TPU topology without a TPU, and its row of figures per chip.

The step is `train.make_train_step` over `train.data_mesh` of the topology's devices, as `pretrain.run`
builds it (the config's dtype, remat and InfoNCE implementation, the padding budget for that chip
count), lowered for abstract arguments (shapes and shardings, no values) and compiled by the TPU
compiler. Every time, rate and MFU in the row is an ESTIMATE: nothing runs on a TPU.

The step-time figures, per chip (the headline first):
  step_s_xla                  XLA:TPU's own cost model: the `estimated_cycles` it writes for every
                              fusion, copy and convert, summed once per execution (loops times their
                              trips), at the chip's clock (topology.Chip.clock_hz). It knows which arrays
                              sit in on-chip memory, the tiling and the matrix units' shapes, so it is the
                              headline (`estimated_step_s`). It leaves out chip-to-chip traffic (below) and
                              the few instructions it gives no cycles (`uncosted_executions`).
  step_s_hbm_roofline         max(FLOPs / peak FLOP/s, HBM-only bytes / HBM bandwidth): the low end.
  step_s_all_memory_roofline  the same with all bytes (on-chip memory traffic charged at HBM bandwidth):
                              the pessimistic end.
  step_s_ici                  the bytes each chip sends for its collectives (ici_bytes_per_chip: the
                              gradients' all-reduces, the ring's permutes) over its ICI bandwidth; not
                              added to the others (collectives overlap compute where XLA schedules them so).
FLOPs are utilisation.program_flops of the same step (the project's one counter: every scan trip and
every shard_map device counted) over the chip count; MFU = the model's FLOPs per chip (pretrain.step_flops:
dense InfoNCE, no remat) / (step_s_xla x peak FLOP/s).
Memory: peak_bytes_per_chip is the compiler's own peak (memory_analysis().peak_memory_in_bytes);
`fits` compares it with the HBM the TPU compiler lets a program use (topology.hbm_limit: v5e 15.75 GiB of
its 16 GB); a program it refuses is a row with fits false.
"""
from __future__ import annotations

import dataclasses
import time

from chmr_jax.training.aot import cost as cost_lib, hlo
from chmr_jax.training.aot.sample import Sample, batch_shapes, budget_for, context_shapes, load_sample, abstract
from chmr_jax.training.aot.topology import GiB, CompileError, Topology, hbm_limit, hbm_refusal, tpu_devices

ROW_FIELDS = ("topology", "chips", "device_kind", "global_batch", "per_chip_bytes", "peak_bytes_per_chip",
              "hbm_bytes", "hbm_limit_bytes", "fits", "flops_per_chip", "bytes_accessed_per_chip",
              "hbm_bytes_accessed_per_chip", "ici_bytes_per_chip", "step_s_xla", "step_s_hbm_roofline",
              "step_s_all_memory_roofline", "step_s_ici", "estimated_step_s", "estimate_source",
              "estimated_molecules_per_s", "estimated_mfu")


def _refused_row(spec, devices, batch_size, budget, config, limit, refused, seconds) -> dict:
    need, avail, what = refused
    return {**{f: None for f in ROW_FIELDS}, "topology": spec.topology_name, "name": spec.name,
            "chips": len(devices), "device_kind": devices[0].device_kind, "global_batch": batch_size, "fits": False,
            "per_chip_bytes": need, "per_chip_bytes_is": what, "hbm_bytes": spec.chip.hbm_bytes,
            "hbm_unit": spec.chip.hbm_unit, "hbm_limit_bytes": avail or limit,
            "budget": dataclasses.asdict(budget), "dtype": config.model.dtype, "remat": bool(config.model.remat),
            "compile_s": round(seconds, 1),
            "note": "the TPU compiler refused the program for HBM; per_chip_bytes is what its message names "
                    "(per_chip_bytes_is), at least that much"}


def compile_step(config, spec: Topology, batch_size: int | None = None, sample: Sample | None = None,
                 devices=None, hlo_dump: str | None = None, log=print) -> dict:
    """Compiles config's pretraining step for `spec` at global `batch_size` (default config's) and
    returns the row (ROW_FIELDS, plus compile seconds, the budget, XLA's own figures, host calls,
    donation, loops, the shapes' provenance, the biggest HBM movers by source line)."""
    import jax
    from flax import nnx

    from chmr_jax.mechanisms import objective as objective_lib
    from chmr_jax.training import pretrain, train, utilisation

    devices = devices or tpu_devices(spec)
    n = len(devices)
    batch_size = int(batch_size or config.batch.batch_size)
    sample = sample or load_sample(config, n, log=log)
    data = sample.data
    budget = budget_for(data, config, batch_size, n)
    names = pretrain.molecular_names(config)
    dims = pretrain.model_dims(config, data, names)
    mesh = train.data_mesh(devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tx = train.make_optimizer(**config.optim, total_steps=1000)
    model = nnx.eval_shape(lambda: pretrain.build_model(config, dims))
    model.train()
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    state_shapes = jax.eval_shape(lambda: train.init_state(pretrain.build_model(config, dims), tx)[1])
    a_state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                     state_shapes)
    a_batch = abstract(batch_shapes(data, budget), sharded)
    ctx = objective_lib.context_arrays(data.context)
    # The context arrays at the corpus size, placed as pretrain.run places them: the walk-target tables
    # split by rows over the chips once they pass train.CONTEXT_SPLIT_BYTES, else whole on every chip.
    scale = sample.molecules / len(data)
    split = train.split_context_tables(abstract(context_shapes(ctx, scale), replicated))
    a_ctx = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                   abstract(context_shapes(ctx, scale, n if split else 1), replicated),
                                   train.context_shardings(ctx, mesh, split))
    key = jax.eval_shape(lambda: train.step_base_key(0))
    a_key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    schedule = train.lr_schedule(config.optim.lr, 1000, config.optim.schedule)
    step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx, mesh, schedule=schedule,
                                 split_tables=split)
    limit = hbm_limit(devices)
    t0 = time.perf_counter()
    try:
        compiled = step.lower(a_state, a_batch, a_key, a_ctx).compile()
    except Exception as e:   # XLA's compile errors (an op TPU cannot run, out of memory at compile time)
        text = str(e)
        refused = hbm_refusal(text)
        if refused is not None:   # the TPU compiler refuses a program larger than its HBM: that is the answer
            return _refused_row(spec, devices, batch_size, budget, config, limit, refused, time.perf_counter() - t0)
        first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
        raise CompileError(f"the step does not compile for {spec.topology_name} at global batch {batch_size}: "
                           f"{type(e).__name__}: {first[:300]}") from None
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_chip = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or per_chip)
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) and xla else xla) or {}
    proto = hlo.module_proto(compiled)
    if hlo_dump:   # the text for people, the proto (HLO_DUMP.pb) for benchmarks/tpu_compile.py --analyse
        with open(hlo_dump, "w") as fh:
            fh.write(compiled.as_text())
        with open(f"{hlo_dump}.pb", "wb") as fh:
            fh.write(proto)
    heavy = cost_lib.program_cost(proto, n, "max")
    light = cost_lib.program_cost(proto, n, "min")
    # The step's conditional is the collapse diagnostics (objective.collapse_every = k): the heavy branch
    # runs on one step in k. Amortised over k steps:
    k = pretrain.collapse_every(config) if config.objective.get("collapse_stats", True) else 1
    cost = {f: light[f] + (heavy[f] - light[f]) / max(k, 1) for f in ("bytes", "hbm_bytes", "cycles", "ici_bytes")}
    hosts = cost_lib.host_calls(proto)
    total_flops = utilisation.program_flops(step, a_state, a_batch, a_key, a_ctx)
    flops = total_flops / n if total_flops else 0.0
    model_flops = pretrain.step_flops(config, dims, tx, ctx, mesh, step, a_state, a_batch, a_key, a_ctx)
    chip = spec.chip
    compute_s = flops / chip.peak_flops
    step_xla = cost["cycles"] / chip.clock_hz
    hbm_roof = max(compute_s, cost["hbm_bytes"] / chip.hbm_bytes_per_s)
    all_roof = max(compute_s, cost["bytes"] / chip.hbm_bytes_per_s)
    est, source = (step_xla, "xla_estimated_cycles") if step_xla > 0 else (hbm_roof, "hbm_roofline")
    molecules = budget.batch_size
    top = sorted(heavy["by_source"].items(), key=lambda kv: -kv[1])[:12]
    kinds = sorted(heavy["by_kind"].items(), key=lambda kv: -kv[1])[:12]
    return {
        "topology": spec.topology_name, "name": spec.name, "chips": n, "hosts": spec.hosts,
        "device_kind": devices[0].device_kind, "global_batch": batch_size, "per_chip_batch": batch_size / n,
        "dtype": config.model.dtype, "remat": bool(config.model.remat), "infonce_impl": config.objective.infonce_impl,
        "budget": dataclasses.asdict(budget), "per_chip_bytes": per_chip, "peak_bytes_per_chip": peak,
        "per_chip_gib": round(peak / GiB, 3),
        "memory": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                   "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
                   "peak": peak},
        "hbm_bytes": chip.hbm_bytes, "hbm_unit": chip.hbm_unit, "hbm_limit_bytes": limit, "fits": peak <= limit,
        "flops_per_chip": flops, "model_flops_per_chip": model_flops,
        "bytes_accessed_per_chip": cost["bytes"], "hbm_bytes_accessed_per_chip": cost["hbm_bytes"],
        "bytes_per_molecule": cost["bytes"] * n / molecules, "hbm_bytes_per_molecule": cost["hbm_bytes"] * n / molecules,
        "bytes_accessed_per_chip_every_branch_heavy": heavy["bytes"], "conditional_amortised_over_steps": k,
        "ici_bytes_per_chip": cost["ici_bytes"], "estimated_cycles": cost["cycles"], "clock_hz": chip.clock_hz,
        "step_s_xla": step_xla, "step_s_hbm_roofline": hbm_roof, "step_s_all_memory_roofline": all_roof,
        "step_s_ici": cost["ici_bytes"] / chip.ici_bytes_per_s, "compute_s": compute_s,
        "estimated_step_s": est, "estimate_source": source,
        "estimated_molecules_per_s": molecules / est if est > 0 else None,
        "estimated_mfu": (model_flops / (est * chip.peak_flops)) if model_flops and est > 0 else None,
        "uncosted_executions": heavy["uncosted_executions"],
        "loops": len(heavy["loops"]), "unknown_trip_loops": heavy["unknown_trip_loops"],
        "xla_cost_analysis": {"flops": xla.get("flops"), "bytes_accessed": xla.get("bytes accessed"),
                              "optimal_seconds": xla.get("optimal_seconds"), "note": "XLA's count: each loop body once"},
        "chip": dataclasses.asdict(chip),
        "compile_s": round(seconds, 1), "host_calls": hosts, "donated": mem.alias_size_in_bytes > 0,
        "shapes_from": sample.shapes_from, "context_molecules": sample.molecules, "sample_molecules": len(data),
        "top_hbm_bytes_by_source": [{"where": w, "bytes": v} for w, v in top],
        "top_hbm_bytes_by_kind": [{"kind": w, "bytes": v} for w, v in kinds],
        "note": "estimates from a deviceless compile: nothing ran on a TPU",
    }
