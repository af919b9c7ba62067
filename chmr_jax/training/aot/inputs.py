"""The input build's own device programs compiled for a TPU topology without a TPU (`chmr-jax compile
--inputs`): what `pretrain_data.prepare` runs on the devices at N molecules, with the config's settings.

  knn                      propagation.knn_program(mesh, knn_layout(N, k, chips, knn_block, knn_db_block,
                           sharded), approx_recall): one call. The database is 'replicated' / 'sharded'
                           as the config says; 'auto' is decided by the pipeline's own rule
                           (propagation.database_sharded) against the TPU chip's memory (the HBM limit
                           the compiler applies, topology.hbm_limit), not this machine's.
  propagation c=W          propagation.propagation_program(mesh, steps) on a column chunk of width W
                           (config.pretrain_data.propagation_chunk, or default_width_chunk of the TPU
                           mesh: 256): one program per distinct chunk width; calls = the chunks of every
                           cellular modality (their widths from the sample's corpus or config.corpus.dims).
  held_out c=W             held_out_propagation: the same compiled program on other inputs (the fold's
                           observed mask), `holdout_folds` times per chunk; listed with its own calls
                           (absent when vicreg_second_view is not 'held_out').

Inputs are ShapeDtypeStructs on the step's mesh (train.data_mesh of the topology's devices): no data,
no N-sized host array. The propagation graph's shapes cannot be known before the kNN has run; they are
bounded as follows and written in each row ("assumed"): the symmetrised kNN graph has at most 2 k N
entries, so each device's CSR block is E = 2 k R entries for its R = ceil(N / chips) rows (exact for a
balanced graph, an underestimate where hub rows crowd one device), and the ELL layout that shard_graph
also ships to the devices is [N, ell_width] with ell_width = the largest row degree, taken as 2 k
(a hub row of the real graph may be wider: the ELL arguments grow with it).

Each row: per_chip_bytes = the compiler's peak (memory_analysis().peak_memory_in_bytes, as the step's
peak_bytes_per_chip); unread_argument_bytes_per_chip = the arguments jit dropped as unread that stay on
the devices anyway (the graph's ELL and COO layouts under bcsr); fits: their sum against topology.hbm_limit (a program the compiler refuses for HBM is a row
with fits false and the bytes its message names), calls per build, and est_s_per_call = XLA:TPU's
estimated cycles of one call at the chip's clock (cost.program_cost, as the step's step_s_xla;
collectives' ICI time apart). Nothing runs on a TPU.
"""
from __future__ import annotations

import math
import time
from collections import Counter

from chmr_jax.training.aot import cost as cost_lib, hlo
from chmr_jax.training.aot.topology import GiB, CompileError, Topology, hbm_limit, hbm_refusal

INPUT_FIELDS = ("name", "per_chip_bytes", "fits", "calls", "est_s_per_call")


def modality_widths(sample) -> dict:
    """{cellular modality: columns} the build propagates (the sample's corpus: the config's own
    modalities, or the stand-in's at config.corpus.dims)."""
    return {name: int(m.dim) for name, m in sample.data.corpus.modalities.items()}


def chunk_calls(widths: dict, chunk: int) -> Counter:
    """{chunk width: calls} of propagation.propagate over every modality (columns `chunk` at a time)."""
    calls = Counter()
    for d in widths.values():
        c = max(1, min(chunk, d))
        calls[c] += d // c
        if d % c:
            calls[d % c] += 1
    return calls


def knn_arguments(layout, n_bytes: int, mesh) -> tuple:
    """ShapeDtypeStructs of knn_program's inputs (propagation.knn_arguments' shapes and placements)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    db = rows if layout.sharded_db else NamedSharding(mesh, P())
    S = jax.ShapeDtypeStruct
    return (S((layout.n_query, n_bytes), jnp.uint8, sharding=rows), S((layout.n_query,), jnp.float32, sharding=rows),
            S((layout.n_query,), jnp.int32, sharding=rows), S((layout.n_db, n_bytes), jnp.uint8, sharding=db),
            S((layout.n_db,), jnp.float32, sharding=db), S((layout.n_db,), jnp.int32, sharding=db),
            S((), jnp.int32, sharding=NamedSharding(mesh, P())))


def graph_shapes(n: int, devices: int, k: int, ell_width: int | None = None) -> dict:
    """The bounded shapes of shard_graph's layout for n molecules on `devices` (module docstring)."""
    r = max(1, -(-n // devices))
    return {"rows_per_device": r, "n_pad": devices * r, "nnz_per_device": max(1, 2 * k * r),
            "ell_width": max(1, ell_width or 2 * k)}


def propagation_arguments(shapes: dict, devices: int, width: int, mesh) -> tuple:
    """ShapeDtypeStructs of propagation_program's (graph, x, observed), rows over the mesh."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from chmr_jax.mechanisms import propagation
    rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
    r, n_pad, e, w = shapes["rows_per_device"], shapes["n_pad"], shapes["nnz_per_device"], shapes["ell_width"]
    graph = propagation.PropagationGraph(
        indptr=S((devices * (r + 1),), jnp.int32), rows=S((devices * e,), jnp.int32),
        cols=S((devices * e,), jnp.int32), weights=S((devices * e,), jnp.float32),
        ell_cols=S((n_pad, w), jnp.int32), ell_weights=S((n_pad, w), jnp.float32),
        degree=S((n_pad,), jnp.float32), energy_diag=S((n_pad,), jnp.float32))
    return graph, S((n_pad, width), jnp.float32), S((n_pad,), jnp.bool_)


def compile_program(name: str, program, args, spec: Topology, devices, limit: int) -> dict:
    """Lowers and compiles `program` for `args`: the row (INPUT_FIELDS but calls, and the memory)."""
    import jax
    n = len(devices)
    t0 = time.perf_counter()
    try:
        compiled = program.lower(*args).compile()
    except Exception as e:
        text = str(e)
        refused = hbm_refusal(text)
        if refused is None:
            first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
            raise CompileError(f"the input program {name} does not compile for {spec.topology_name}: "
                               f"{type(e).__name__}: {first[:300]}") from None
        need, avail, what = refused
        return {"name": name, "per_chip_bytes": need, "per_chip_bytes_is": what, "fits": False,
                "hbm_limit_bytes": avail or limit, "compile_s": round(time.perf_counter() - t0, 1),
                "note": "the TPU compiler refused the program for HBM; per_chip_bytes is what its message names "
                        "(per_chip_bytes_is), at least that much"}
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    # jit drops arguments the program never reads (propagation in bcsr reads neither the ELL layout nor the
    # COO rows), but they stay on the devices all the same (shard_graph puts every layout there).
    given = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(args))
    unread = max(0, int(given - mem.argument_size_in_bytes))
    total = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or total)
    proto = hlo.module_proto(compiled)
    pc = cost_lib.program_cost(proto, n, "max")
    clock = spec.chip.clock_hz
    return {"name": name, "per_chip_bytes": peak, "per_chip_gib": round(peak / GiB, 3),
            "unread_argument_bytes_per_chip": unread, "fits": peak + unread <= limit, "hbm_limit_bytes": limit,
            "memory": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                       "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes),
                       "total": total, "peak": peak},
            "est_s_per_call": pc["cycles"] / clock if pc["cycles"] else None,
            "ici_bytes_per_chip": pc["ici_bytes"], "est_ici_s_per_call": pc["ici_bytes"] / spec.chip.ici_bytes_per_s,
            "unknown_trip_loops": pc["unknown_trip_loops"], "host_calls": cost_lib.host_calls(proto),
            "compile_s": round(seconds, 1)}


def plan(config, sample, mesh, molecules: int, chip_bytes: int, ell_width: int | None = None) -> dict:
    """What the input build runs on the devices of `mesh` at `molecules` molecules (no compile): the kNN
    layout, the chunk widths and their calls, the graph's bounded shapes. chip_bytes: the chip memory
    'auto' is decided against."""
    from chmr_jax.mechanisms import propagation
    from chmr_jax.training import pretrain
    n_chips = mesh.size
    cfg = pretrain.data_config(config, n_chips)
    widths = modality_widths(sample)
    n_bits = int(sample.data.corpus.features.settings.morgan_size)
    n_bytes = -(-n_bits // 8)
    sharded = propagation.database_sharded(cfg.knn_database, molecules, n_bytes, chip_bytes)
    layout = propagation.knn_layout(molecules, cfg.knn_k, n_chips, cfg.knn_block, cfg.knn_db_block, sharded)
    chunk = cfg.propagation_chunk or propagation.default_width_chunk(mesh)   # as prepare picks it
    return {"cfg": cfg, "widths": widths, "n_bytes": n_bytes, "layout": layout, "chunk": chunk,
            "chunks": chunk_calls(widths, chunk), "graph": graph_shapes(molecules, n_chips, cfg.knn_k, ell_width),
            "held_out": cfg.vicreg_second_view == "held_out" and cfg.holdout_folds}


def compile_inputs(config, spec: Topology, sample, devices, molecules: int, ell_width: int | None = None,
                   log=print) -> list[dict]:
    """The input build's device programs at `molecules` molecules compiled for `devices` (module
    docstring): one row each, in the order the build runs them. Empty when the build runs none (no
    cellular modality, or fewer than 2 molecules)."""
    from chmr_jax.mechanisms import propagation
    from chmr_jax.training import train
    n = len(devices)
    mesh = train.data_mesh(devices)        # pretrain_data.input_mesh(): the step's mesh
    limit = hbm_limit(devices)
    if molecules < 2:
        return []
    p = plan(config, sample, mesh, molecules, limit, ell_width)
    if not p["widths"]:
        return []
    cfg, layout = p["cfg"], p["layout"]
    rows = []
    knn = compile_program("knn", propagation.knn_program(mesh, layout, cfg.knn_approx_recall or None),
                          knn_arguments(layout, p["n_bytes"], mesh), spec, devices, limit)
    knn.update(calls=1, database="sharded" if layout.sharded_db else "replicated",
               database_setting=cfg.knn_database, layout=vars(layout).copy(),
               approx_recall=cfg.knn_approx_recall or None)
    rows.append(knn)
    log(f"  knn: {knn['per_chip_bytes'] / GiB:.3f} GiB per chip, database {knn['database']}")
    program = propagation.propagation_program(mesh, cfg.propagation_steps)
    for width, calls in sorted(p["chunks"].items(), reverse=True):
        row = compile_program(f"propagation c={width}", program,
                              propagation_arguments(p["graph"], n, width, mesh), spec, devices, limit)
        row.update(calls=calls, chunk=width, steps=cfg.propagation_steps, format=propagation.DEFAULT_FORMAT,
                   assumed=dict(p["graph"]))
        rows.append(row)
        log(f"  {row['name']}: {row['per_chip_bytes'] / GiB:.3f} GiB per chip, {calls} call(s)")
    if p["held_out"]:
        for row in [r for r in rows if r["name"].startswith("propagation")]:
            rows.append({**row, "name": row["name"].replace("propagation", "held_out"),
                         "calls": row["calls"] * cfg.holdout_folds, "folds": cfg.holdout_folds,
                         "same_program_as": row["name"], "compile_s": 0.0})
    for row in rows:
        row["modality_widths"] = p["widths"]
        row["molecules"] = molecules
    return rows


def text(rows: list[dict], molecules: int) -> str:
    """The input programs' table, one line each."""
    lines = [f"input programs at N = {molecules:,}: program | per-chip GiB | fits | calls | est. s per call (XLA)"]
    for r in rows:
        est = r.get("est_s_per_call")
        lines.append(f"  {r['name']:<20s} | {r['per_chip_bytes'] / GiB:8.3f} | {'yes' if r['fits'] else 'NO':>3s} | "
                     f"{r['calls']:5d} | {'' if est is None else f'{est:.4g}'}")
    return "\n".join(lines)


def all_fit(rows: list[dict]) -> bool:
    return all(r["fits"] for r in rows)


def total_est_s(rows: list[dict]) -> float | None:
    """The build's device seconds (each program's estimate times its calls), None if any is missing."""
    parts = [r.get("est_s_per_call") for r in rows]
    if not rows or any(x is None for x in parts):
        return None
    return float(sum(x * r["calls"] for x, r in zip(parts, rows)))
