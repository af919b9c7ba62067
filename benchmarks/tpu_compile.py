"""The paper's configuration compiled for real TPU pod sizes on this CPU machine (issue 22 §3): per-chip
memory, the largest global batch that fits, ESTIMATED step time, molecules/s and MFU (nothing runs on a
TPU; see chmr_jax/training/aot/compile.py for how each figure is derived), and the corpus-side kernels (the
kNN's block product, one propagation step) sharded over the same chips.

  python benchmarks/tpu_compile.py                                  # the RESULTS.md table (about an hour on 2 cores)
  python benchmarks/tpu_compile.py --topologies v5e-8 --variants bf16_remat --no_fit   # one row, minutes
  python benchmarks/tpu_compile.py --kernels_only                    # kNN / propagation rows only
  python benchmarks/tpu_compile.py --table_only                     # reprint from the JSON
  python benchmarks/tpu_compile.py --analyse a.hlo.pb,b.hlo.pb --molecules 384   # `chmr-jax compile --hlo_dump a.hlo`

Step rows: `chmr-jax compile --config configs/paper.py:tpu_pod` (ring InfoNCE, bf16) with remat
(variant bf16_remat) and as float32 without remat (f32), each at the paper's global batch 3072 and,
for --fit_variants (default bf16_remat), the largest batch that fits HBM (`chmr-jax compile --fit`:
--max_probes compiles after the config's batch, each in a memory-capped subprocess; "largest" is a
bracket, closed only where the compiler refused a batch), one subprocess per topology and variant.
Step times: XLA:TPU's own estimate (the headline), the HBM-only and all-memory rooflines, ICI.

Kernel rows, per topology and corpus size N (129,592 = the paper's corpus, 1,000,000):
  knn          tanimoto_knn's block product (propagation._knn_block: a [block, 2048] x [2048, N] Tanimoto
               and its top-k) with the query block split over the chips and the N fingerprints
               replicated; the whole kNN is ceil(N / (block x chips)) such steps.
  propagation  one step of Eq. 1 (W @ X, W the symmetrised kNN graph in the ELL layout, 2K = 20
               neighbours per row, rows sharded over the chips, X a 256-column chunk replicated and
               re-replicated after the step); T = 5 steps over the three modalities' 5700 columns.
Prints the tables and writes benchmarks/tpu_compile.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOPOLOGIES = ("v5e-8", "v5e-16", "v5e-64", "v4-32", "v5p-128")
VARIANTS = {"bf16_remat": ["--config.model.dtype=bfloat16", "--config.model.remat=True"],
            "f32": ["--config.model.dtype=float32", "--config.model.remat=False"]}
KNN_BLOCK = 1024
PROP_CHUNK = 256


def step_row(topology: str, variant: str, fit: bool, batch: int, max_probes: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "chmr_jax.cli", "compile", "--config", str(ROOT / "configs/paper.py") + ":tpu_pod",
               "--topology", topology, "--out", str(out), f"--config.batch.batch_size={batch}",
               *VARIANTS[variant]] + (["--fit", f"--max_probes={max_probes}"] if fit else [])
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            tail = [ln for ln in p.stderr.splitlines() if ln.startswith("chmr-jax")] or p.stderr.splitlines()[-3:]
            return {"name": topology, "variant": variant, "error": " ".join(tail)[-600:], "wall_s": wall}
        row = json.loads(out.read_text())
    row["variant"], row["wall_s"] = variant, round(wall, 1)
    return row


def kernel_worker(topology: str, kernel: str, n: int) -> dict:
    """Compiles one kernel for the topology (in this process: the caller runs it as a subprocess)."""
    from chmr_jax.training import aot
    aot.quiet_libtpu(aot.parse_topology(topology))
    import jax
    jax.config.update("jax_platforms", "cpu")
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from chmr_jax.mechanisms import propagation
    from chmr_jax.training import train, utilisation
    from chmr_jax.training.aot import cost as cost_lib, hlo

    spec = aot.parse_topology(topology)
    devices = aot.tpu_devices(spec)
    molecules = n
    mesh = train.data_mesh(devices)
    chips = len(devices)
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    if kernel == "knn":
        n_pad = -(-n // KNN_BLOCK) * KNN_BLOCK
        rows = KNN_BLOCK * chips                     # query rows per step, split over the chips
        block = lambda bb, ids, allb, counts, n_real: propagation._knn_block.__wrapped__(bb, ids, allb, counts, n_real, 10)
        f = jax.jit(block, in_shardings=(shard, shard, rep, rep, rep), out_shardings=shard)
        args = (sds((rows, 2048), jnp.float32, shard), sds((rows,), jnp.int32, shard),
                sds((n_pad, 2048), jnp.float32, rep), sds((n_pad,), jnp.float32, rep), sds((), jnp.int32, rep))
        calls = math.ceil(n_pad / rows)
    else:
        # ELL layout (K' = 2K padded neighbours per row), rows sharded over the chips, the feature chunk
        # replicated (each row's neighbours can be anywhere) and re-replicated after the step (the
        # all-gather is part of the program). Columns in chunks of PROP_CHUNK: the three modalities'
        # 2749 + 1973 + 978 columns are ceil(5700 / PROP_CHUNK) chunks, T = 5 steps each.
        kk = 2 * 10
        n = -(-n // chips) * chips                    # rows padded to a multiple of the chips (sharded evenly)
        graph = propagation.PropagationGraph(
            indptr=sds((n + 1,), jnp.int32, rep), rows=sds((1,), jnp.int32, rep), cols=sds((1,), jnp.int32, rep),
            weights=sds((1,), jnp.float32, rep), ell_cols=sds((n, kk), jnp.int32, shard),
            ell_weights=sds((n, kk), jnp.float32, shard), degree=sds((n,), jnp.float32, shard),
            energy_diag=sds((n,), jnp.float32, shard))
        x = sds((n, PROP_CHUNK), jnp.float32, rep)
        f = jax.jit(lambda g, x: propagation.spmm(g, x, "ell"), out_shardings=rep)
        args = (graph, x)
        calls = 5 * math.ceil((2749 + 1973 + 978) / PROP_CHUNK)
    t0 = time.perf_counter()
    compiled = f.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = cost_lib.program_cost(hlo.module_proto(compiled), chips)
    flops = (utilisation.program_flops(f, *args) or 0) / chips
    peak = int(mem.peak_memory_in_bytes)
    chip = spec.chip
    step_s = cost["cycles"] / chip.clock_hz
    roof = max(flops / chip.peak_flops, cost["hbm_bytes"] / chip.hbm_bytes_per_s)
    return {"kernel": kernel, "topology": spec.topology_name, "name": topology, "chips": chips, "molecules": molecules,
            "peak_bytes_per_chip": peak, "hbm_limit_bytes": aot.hbm_limit(devices),
            "fits": peak <= aot.hbm_limit(devices), "flops_per_chip": flops,
            "bytes_accessed_per_chip": cost["bytes"], "hbm_bytes_accessed_per_chip": cost["hbm_bytes"],
            "ici_bytes_per_chip": cost["ici_bytes"], "estimated_call_s": step_s, "hbm_roofline_call_s": roof,
            "calls": calls, "estimated_total_s": step_s * calls, "compile_s": round(seconds, 1),
            "unknown_trip_loops": len(cost["unknown_trip_loops"]),
            "note": "estimate from a deviceless compile (XLA:TPU's estimated cycles; the HBM roofline beside it); "
                    "knn: all query blocks; propagation: 5 steps x ceil(5700 / 256) column chunks"}


def kernel_row(topology: str, kernel: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", kernel, "--topologies", topology, "--molecules", str(n)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"kernel": kernel, "name": topology, "molecules": n, "error": p.stderr.strip().splitlines()[-1][-500:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def step_table(rows: list[dict]) -> str:
    cols = ["topology", "variant", "chips", "batch", "peak GiB/chip", "fits", "est. step ms (XLA)",
            "HBM..all-memory roofline ms", "ICI MB/chip (ms)", "est. molecules/s", "est. MFU", "largest batch that fits",
            "compile s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    ms = lambda x: f"{x * 1e3:.2f}" if x is not None else "-"
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']} | {r['variant']} | error: {r['error'][:150]}" + " |" * (len(cols) - 3))
            continue
        fit = r.get("fit") or {}
        lo, hi = fit.get("largest_fitting_batch"), fit.get("smallest_refused_batch")
        largest = ("-" if not fit else f"{lo:,} (refused {hi:,})" if fit.get("bracket_closed") else
                   f">= {lo:,}" + (f" (refused {hi:,})" if hi else "") if lo else "none")
        peak = r.get("peak_bytes_per_chip") or r.get("per_chip_bytes")
        lines.append(" | ".join(str(v) for v in [
            f"{r['name']} ({r['topology']})", r["variant"], r["chips"], f"{r['global_batch']:,}",
            (f"{peak / 2**30:.2f}" if r["fits"] else f">= {peak / 2**30:.2f}") if peak else "-",
            "yes" if r["fits"] else "NO", ms(r.get("step_s_xla")),
            f"{ms(r.get('step_s_hbm_roofline'))}..{ms(r.get('step_s_all_memory_roofline'))}",
            f"{r['ici_bytes_per_chip'] / 1e6:.1f} ({ms(r.get('step_s_ici'))})" if r.get("ici_bytes_per_chip") is not None else "-",
            f"{r['estimated_molecules_per_s']:,.0f}" if r.get("estimated_molecules_per_s") else "-",
            f"{r['estimated_mfu']:.1%}" if r.get("estimated_mfu") is not None else "-", largest, r["compile_s"]]))
    return "\n".join(lines)


def kernel_table(rows: list[dict]) -> str:
    cols = ["kernel", "topology", "molecules", "peak GiB/chip", "fits", "est. s per call (XLA)", "HBM roofline s",
            "calls", "est. total s", "compile s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']} | {r['name']} | {r['molecules']:,} | error: {r['error'][:150]}" + " |" * 6)
            continue
        lines.append(" | ".join(str(v) for v in [
            r["kernel"], f"{r['name']} ({r['topology']})", f"{r['molecules']:,}",
            f"{(r.get('peak_bytes_per_chip') or r.get('per_chip_bytes')) / 2**30:.2f}",
            "yes" if r["fits"] else "NO", f"{r['estimated_call_s']:.4f}",
            f"{r['hbm_roofline_call_s']:.4f}" if r.get("hbm_roofline_call_s") is not None else "-", r["calls"],
            f"{r['estimated_total_s']:.1f}", r["compile_s"]]))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=3072)
    parser.add_argument("--no_fit", action="store_true", help="skip the largest-batch search")
    parser.add_argument("--fit_variants", default="bf16_remat", help="variants whose largest batch is searched")
    parser.add_argument("--max_probes", type=int, default=4, help="compiles of the search after the config's batch")
    parser.add_argument("--kernel_topologies", default="v5e-8,v5p-128")
    parser.add_argument("--molecules", default="129592,1000000")
    parser.add_argument("--kernels_only", action="store_true")
    parser.add_argument("--no_kernels", action="store_true")
    parser.add_argument("--out", default=str(HERE / "tpu_compile.json"))
    parser.add_argument("--table_only", action="store_true")
    parser.add_argument("--merge", default="", help="comma list of JSON files (of runs split over processes) "
                        "whose rows are merged into --out")
    parser.add_argument("--analyse", default="", help="comma list of compiled-HLO protos (chmr-jax compile "
                        "--hlo_dump X writes X.pb beside the text): bytes, HBM bytes, ICI bytes and XLA's cycle "
                        "estimate per chip with this checkout's cost walk, the largest byte movers by source line; "
                        "--molecules: molecules per chip, --chips: the program's chip count")
    parser.add_argument("--chips", default="8", help="--analyse: chips the dumped program ran on")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.analyse:
        from chmr_jax.training import aot
        per_chip = int(args.molecules.split(",")[0])
        chip = aot.CHIPS["v5e"]
        for path in args.analyse.split(","):
            c = aot.program_cost(Path(path).read_bytes(), int(args.chips))
            print(f"{path}: {c['bytes'] / 1e9:.2f} GB moved per chip ({c['bytes'] / per_chip / 1e6:.1f} MB per "
                  f"molecule), HBM only {c['hbm_bytes'] / 1e9:.2f} GB ({c['hbm_bytes'] / per_chip / 1e6:.1f} MB), "
                  f"ICI {c['ici_bytes'] / 1e6:.1f} MB; v5e: XLA's estimate {c['cycles'] / chip.clock_hz * 1e3:.2f} ms, "
                  f"{len(c['unknown_trip_loops'])} loop(s) of unknown trip count")
            for where, b in sorted(c["by_source"].items(), key=lambda kv: -kv[1])[:8]:
                print(f"    {b / 1e9:7.3f} GB HBM  {where}")
        return 0
    if args.worker:
        print(json.dumps(kernel_worker(args.topologies, args.worker, int(args.molecules))))
        return 0
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {"steps": [], "kernels": []}
    for part in filter(None, args.merge.split(",")):
        more = json.loads(Path(part).read_text())
        for section, key in (("steps", ("name", "variant")), ("kernels", ("kernel", "name", "molecules"))):
            new_keys = {tuple(r.get(k) for k in key) for r in more[section]}
            old[section] = [r for r in old[section] if tuple(r.get(k) for k in key) not in new_keys] + more[section]
    if args.merge:
        out.write_text(json.dumps(old, indent=1, default=str))
        args.table_only = True
    if not args.table_only:
        if not args.kernels_only:
            for t in args.topologies.split(","):
                for v in args.variants.split(","):
                    fit = not args.no_fit and v in args.fit_variants.split(",")
                    row = step_row(t, v, fit, args.batch, args.max_probes)
                    old["steps"] = [r for r in old["steps"] if (r.get("name"), r.get("variant")) != (t, v)] + [row]
                    print(step_table([row]).splitlines()[-1], flush=True)
                    out.write_text(json.dumps(old, indent=1, default=str))
        if not args.no_kernels:
            for t in args.kernel_topologies.split(","):
                for n in (int(x) for x in args.molecules.split(",")):
                    for kernel in ("knn", "propagation"):
                        row = kernel_row(t, kernel, n)
                        old["kernels"] = [r for r in old["kernels"]
                                          if (r.get("kernel"), r.get("name"), r.get("molecules")) != (kernel, t, n)] + [row]
                        print(kernel_table([row]).splitlines()[-1], flush=True)
                        out.write_text(json.dumps(old, indent=1, default=str))
    print(step_table(old["steps"]))
    print()
    print(kernel_table(old["kernels"]))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
