"""Throughput (molecules/s) and peak memory of the pretraining step.

  python benchmarks/pretrain_step.py                        # batch 256/1024/3072 x 1 and 8 devices
  python benchmarks/pretrain_step.py --devices 1 --batch_sizes 3072 --torch /path/to/python-with-torch
  python benchmarks/pretrain_step.py --synthetic --devices 1 --batch_sizes 256,1024   # without the shared data
  python benchmarks/pretrain_step.py --devices 1 --batch_sizes 3072 --compile_only --dtype bfloat16 --remat
  python benchmarks/pretrain_step.py --devices 1,8 --batch_sizes 1024,3072 --fit_gib 16 [--remat ...]  # largest batch
  python benchmarks/pretrain_step.py --devices 1 --batch_sizes 256 --steps 3 --profile runs/trace   # time per XLA op

Every timed row also reports one device's share of the step's model FLOPs (step_flops_per_device and
step_gflop: pretrain.step_flops, the same whether InfoNCE is dense, chunked or a ring and however many
devices share the batch), the achieved GFLOP/s per device and its fraction of the dense matmul rate of a
device this process owns, measured in the same process (chmr_jax.training.utilisation).

Setting: the paper's model (GIN 5 x 300 with virtual node, D = 300, depth-6 tree, decoders) and the
paper's three cellular modalities at their widths (cell 2749, gene 1973, expression 978, observed for
35% / 6% / 8% of molecules, values random: throughput does not depend on them), on real molecules:
2 x batch molecules drawn from the reachable corpus (built once by `chmr-jax pretrain` or
`chmr-jax prepare --corpus reachable`; needs CHMR_DATA_DIR). Each (devices, batch) runs in its own
process (the device count is fixed at start-up, and the peak memory is per process): `warmup`
steps (compilation) then `steps` timed steps. On CPU, n devices are n fake host devices sharing the
same cores, so 8 devices measure the sharded program's overhead, not a speed-up.

--torch PYTHON also runs benchmarks/torch_release_step.py (a PyTorch step with the release's
structure) on the same batch with that interpreter, for the speed-up column.
Prints a table and writes JSON (default benchmarks/pretrain_step.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAPER_CELLULAR = {"cell": (2749, 0.35), "gene": (1973, 0.06), "expression": (978, 0.08)}


# Step variants (--dtype, --remat, --infonce_impl, --compile_only, --synthetic) as one dict.
DEFAULT_OPTS = {"synthetic": False, "dtype": "float32", "remat": False, "infonce_impl": "", "compile_only": False}


def worker(batch_size: int, n_devices: int, steps: int, warmup: int, dump: str | None, opts: dict) -> dict:
    import jax
    import numpy as np

    from chmr_jax import config_util
    from chmr_jax.data import corpus as corpus_lib, paths
    from chmr_jax.mechanisms import objective
    from chmr_jax.training import pretrain, pretrain_data, pretrain_loop, train, utilisation

    synthetic, dtype, remat, compile_only = opts["synthetic"], opts["dtype"], opts["remat"], opts["compile_only"]
    config = config_util.load_config(str(config_util.CONFIG_DIR / "pretrain.py") + (":paper" if synthetic else ""))
    config.batch.batch_size = batch_size
    config.model.dtype = dtype
    config.model.remat = remat
    config.objective.infonce_impl = opts["infonce_impl"] or config.objective.infonce_impl
    if synthetic:   # no shared data (e.g. a lent accelerator): enumerated molecules in the paper's layout,
        config.corpus.kind = "synthetic"        # narrow stand-in profiles (replaced below anyway)
        config.corpus.synthetic_molecules = 2 * batch_size
        config.corpus.synthetic_dims = {"CP-Bray": 8, "CP-JUMP": 8, "G-CRISPR": 4, "G-ORF": 4, "GE": 8}
        config.corpus.dims = {"cell": 16, "gene": 8, "expression": 8}
    cache_dir = paths.resolve_cache_dir(None)
    full = pretrain.load_corpus(config, paths.resolve_data_dir(None), cache_dir, log=lambda *a: None)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(full), size=min(2 * batch_size, len(full)), replace=False)
    sub = full.subset(idx)
    n = len(sub)
    sub.modalities = {}
    for name, (dim, frac) in PAPER_CELLULAR.items():
        avail = rng.random(n) < frac
        values = np.where(avail[:, None], rng.normal(size=(n, dim)), 0).astype(np.float32)
        sub.modalities[name] = corpus_lib.Modality(values=values, available=avail, feature_names=[""] * dim,
                                                   sources=["random"])
    devices = jax.devices()[:n_devices]
    mesh = train.data_mesh(devices)
    data = pretrain_data.prepare(sub, pretrain.data_config(config, n_devices))
    dims = pretrain.model_dims(config, data, pretrain.molecular_names(config))
    model = pretrain.build_model(config, dims)
    tx = train.make_optimizer(total_steps=1000)
    graphdef, state = train.init_state(model, tx)
    state = train.place(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    ctx = objective.context_arrays(data.context)
    step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx, mesh)
    ctx_device = train.context_on_devices(ctx, mesh)
    groups = pretrain_data.graphs.partition(data.corpus.features, np.arange(n), data.budget)
    host = [pretrain_data.batch_of(data, g) for g in groups[:2]]
    batches = [train.assemble_batch(b, mesh) for b in host]
    mols = [int(b["graph"].graph_mask.sum()) for b in host]
    if dump:
        np.savez(dump, **_flat(host[0]), **{f"ctx/{k}": v for k, v in _ctx_numpy(data).items()})
    key = jax.random.key(0)
    if opts.get("profile"):
        return profile_ops(step, state, batches, key, ctx_device, opts["profile"], steps)
    lowered = step.lower(state, batches[0], key, ctx_device)
    # One device's share of the step's model FLOPs (independent of chunking, ring and sharding).
    flops = pretrain.step_flops(config, dims, tx, ctx, mesh, step, state, batches[0], key, ctx_device)
    compiled = lowered.compile().memory_analysis()
    xla_bytes = None if compiled is None else int(compiled.temp_size_in_bytes + compiled.argument_size_in_bytes
                                                  + compiled.output_size_in_bytes - compiled.alias_size_in_bytes)
    common = {"framework": "chmr_jax", "platform": devices[0].platform, "device_kind": devices[0].device_kind,
              "devices": n_devices, "batch_size": batch_size, "dtype": dtype, "remat": remat,
              "infonce_impl": config.objective.infonce_impl,
              "budget": data.budget.__dict__, "xla_step_bytes": xla_bytes}
    if compile_only:
        return {**common, "compile_only": True, "step_flops_per_device": int(round(flops)) if flops else None,
                "step_gflop": round(flops / 1e9, 2) if flops else None}
    for i in range(warmup):
        state, metrics = step(state, batches[i % 2], key, ctx_device)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % 2], key, ctx_device)
    jax.block_until_ready(metrics["loss"])
    seconds = time.perf_counter() - t0
    mem = pretrain_loop.peak_memory()
    # This device's dense matmul rate in the step's dtype, measured now (after the steps, so it does not
    # change their peak memory); on fake CPU devices sharing the cores the fraction means little.
    rate = utilisation.matmul_rate(dtype, device=utilisation.own_device(devices))
    return {**common, "molecules_per_step": float(np.mean([mols[i % 2] for i in range(steps)])),
            "step_s": seconds / steps, "molecules_per_s": sum(mols[i % 2] for i in range(steps)) / seconds,
            "loss": float(metrics["loss"]), **utilisation.report(flops, steps, seconds, rate), **mem}


def profile_ops(step, state, batches, key, ctx, trace_dir: str, steps: int) -> dict:
    """Time per XLA operation kind over `steps` steps after a warm-up, from a jax.profiler trace
    (read back with jax.profiler.ProfileData): where the step's time goes."""
    import re
    from collections import defaultdict

    import jax

    for i in range(2):
        state, metrics = step(state, batches[i % 2], key, ctx)
    jax.block_until_ready(metrics["loss"])
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batches[i % 2], key, ctx)
        jax.block_until_ready(metrics["loss"])
        wall = time.perf_counter() - t0
    path = next(Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(path))
    # The XLA operations are the leaf events of the runtime's threads (on CPU: the Eigen pool and the
    # client threads); '::' events are the executor's own bookkeeping around them, '$' ones Python.
    by_kind, by_op, threads = defaultdict(float), defaultdict(float), set()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if "::" in ev.name or ev.name.startswith(("$", "end:")) or line.name == "python":
                    continue
                threads.add(line.name)
                by_op[ev.name] += ev.duration_ns / 1e9
                by_kind[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns / 1e9
    total = sum(by_kind.values())
    top = lambda d, k: [{"name": n, "s_per_step": round(v / steps, 4), "share": round(v / total, 3)}
                        for n, v in sorted(d.items(), key=lambda x: -x[1])[:k]] if total else []
    # Which operation of our program: each compiled instruction's source line where XLA's metadata has one,
    # else its JAX primitive (the op_name's last part; on XLA CPU here the metadata carries no source files).
    where = source_of_instructions(step.lower(state, batches[0], key, ctx).compile().as_text())
    by_source = defaultdict(float)
    for name, secs in by_op.items():
        by_source[where.get(name, "(no source)")] += secs
    cores = os.cpu_count() or 1
    return {"profile": str(path), "wall_s_per_step": wall / steps, "op_thread_s_per_step": total / steps,
            # thread-seconds in XLA ops over the wall time the cores offered: the rest is waiting
            "busy_fraction_of_cores": total / (wall * cores), "cores": cores, "threads": sorted(threads),
            "by_kind": top(by_kind, 25), "by_source": top(by_source, 30), "top_ops": top(by_op, 25)}


def source_of_instructions(hlo_text: str) -> dict:
    """{instruction name: 'file.py:line', or the JAX primitive where the metadata has no source} from a
    compiled module's text."""
    import re
    out = {}
    pattern = re.compile(r'^\s*%?([\w.\-]+) = .*?metadata=\{([^}]*)\}', re.M)
    for name, meta in pattern.findall(hlo_text):
        file = re.search(r'source_file="([^"]+)"', meta)
        func = re.search(r'op_name="([^"]+)"', meta)
        line = re.search(r'source_line=(\d+)', meta)
        if file:
            out[name] = f"{Path(file.group(1)).name}:{line.group(1) if line else '?'}"
        elif func:
            out[name] = func.group(1).split("/")[-1]
    return out


def _flat(batch: dict) -> dict:
    out = {}
    for key, value in batch.items():
        if key == "graph":
            for field in value._fields:
                out[f"graph/{field}"] = getattr(value, field)
        elif isinstance(value, dict):
            for name, x in value.items():
                out[f"{key}/{name}"] = x
        else:
            out[key] = value
    return out


def _ctx_numpy(data) -> dict:
    c = data.context
    out = {"indptr": c.indptr, "indices": c.indices, "weights": c.weights, "node_type": c.node_type,
           "node_row": c.node_row}
    for i, t in enumerate(c.type_names):
        if t not in c.targets:     # a node type without reconstruction targets (gene nodes)
            continue
        out[f"targets/{i}/{t}"] = c.targets[t]
        out[f"target_mask/{i}/{t}"] = c.target_mask[t]
    return out


def run_worker_process(batch_size, n_devices, steps, warmup, dump=None, opts=None) -> dict:
    opts = {**DEFAULT_OPTS, **(opts or {})}
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if n_devices > 1 and "cuda" not in env.get("JAX_PLATFORMS", ""):
        # Fake devices share 2 cores: a device can wait minutes for the others at a collective,
        # past XLA CPU's default 40 s rendezvous limit.
        env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={n_devices} "
                            "--xla_cpu_collective_call_terminate_timeout_seconds=1200").strip()
    cmd = [sys.executable, __file__, "--worker", "--batch_sizes", str(batch_size), "--devices", str(n_devices),
           "--steps", str(steps), "--warmup", str(warmup)] + (["--dump", dump] if dump else []) \
        + ["--dtype", opts["dtype"], "--infonce_impl", opts["infonce_impl"]] \
        + [f"--{k}" for k in ("synthetic", "remat", "compile_only") if opts[k]]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {"framework": "chmr_jax", "devices": n_devices, "batch_size": batch_size, **opts,
                "error": (out.stderr or out.stdout)[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(n_dev: int, gib: float, per_device: list[int], opts: dict) -> dict:
    """The largest global batch (a multiple of 64 x devices) whose compiled step footprint per device is
    at most `gib`: XLA's footprint is close to linear in the batch, so a line through two compile-only
    probes (per_device x n_dev) predicts it; the prediction is compiled and stepped down by 5% until it fits."""
    limit = gib * 2**30
    probes = []

    def probe(b):
        row = run_worker_process(b, n_dev, 0, 0, None, opts)
        probes.append({"batch_size": b, "xla_step_bytes": row.get("xla_step_bytes"), "error": row.get("error", "")[-300:]})
        print(f"  devices {n_dev} batch {b}: {row.get('xla_step_bytes', 0) / 2**30:.2f} GiB", flush=True)
        return row.get("xla_step_bytes")

    (b1, b2) = (p * n_dev for p in per_device)
    m1, m2 = probe(b1), probe(b2)
    if not (m1 and m2):
        return {"devices": n_dev, "error": "a probe failed", "probes": probes}
    slope = (m2 - m1) / (b2 - b1)
    unit = 64 * n_dev
    b = int((b1 + (limit - m1) / slope) // unit * unit)
    while b >= unit:
        m = probe(b)
        if m is not None and m <= limit:
            return {"devices": n_dev, "largest_batch": b, "xla_step_bytes": m, "bytes_per_molecule": slope,
                    "fixed_bytes": m1 - slope * b1, "probes": probes}
        b = int(b * 0.95 // unit * unit)
    return {"devices": n_dev, "largest_batch": 0, "probes": probes}


def format_table(rows: list[dict]) -> str:
    cols = ["framework", "platform", "devices", "batch_size", "dtype", "remat", "molecules_per_step", "step_s",
            "molecules_per_s", "peak_GiB", "step_GiB", "step_gflop", "achieved_gflop_per_s", "utilisation", "speedup"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        peak = r.get("device_peak_bytes", r.get("host_peak_rss_bytes"))
        xla = r.get("xla_step_bytes")
        vals = {**r, "peak_GiB": f"{peak / 2**30:.2f}" if peak else "-",
                "step_GiB": f"{xla / 2**30:.2f}" if xla else "-",
                "step_s": f"{r['step_s']:.3f}" if "step_s" in r else ("-" if r.get("compile_only") else "error"),
                "utilisation": f"{r['utilisation']:.0%}" if r.get("utilisation") else "-",
                "molecules_per_s": f"{r['molecules_per_s']:,.0f}" if "molecules_per_s" in r else "-",
                "molecules_per_step": f"{r.get('molecules_per_step', 0):.0f}",
                "speedup": f"{r['speedup']:.2f}x" if "speedup" in r else ""}
        lines.append(" | ".join(str(vals.get(c, "")) for c in cols))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_sizes", default="256,1024,3072")
    parser.add_argument("--devices", default="1,8", help="device counts (fake host devices on CPU)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch", help="a python with torch: also time the PyTorch release-structured step")
    parser.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--out", default=str(HERE / "pretrain_step.json"))
    parser.add_argument("--synthetic", action="store_true",
                        help="enumerated molecules instead of the reachable corpus (no CHMR_DATA_DIR needed)")
    parser.add_argument("--dtype", default="float32", help="config.model.dtype (float32 | bfloat16)")
    parser.add_argument("--remat", action="store_true", help="config.model.remat: recompute GIN layers in the backward pass")
    parser.add_argument("--compile_only", action="store_true",
                        help="XLA's compiled footprint and FLOPs only (no steps run, no torch)")
    parser.add_argument("--infonce_impl", default="", help="config.objective.infonce_impl (default: the config's)")
    parser.add_argument("--profile", default="", help="a trace directory: profile --steps steps of the first "
                        "--devices x --batch_sizes with jax.profiler and report the time per XLA op kind")
    parser.add_argument("--fit_gib", type=float, default=0.0,
                        help="instead of timing: the largest global batch whose compiled step fits this many GiB "
                             "per device, for each --devices (compile-only; a line fitted through --batch_sizes' "
                             "first two sizes x devices, then checked and stepped down)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    device_counts = [int(d) for d in args.devices.split(",")]
    opts = {"synthetic": args.synthetic, "dtype": args.dtype, "remat": args.remat, "infonce_impl": args.infonce_impl,
            "compile_only": args.compile_only or bool(args.fit_gib), "profile": args.profile}
    if args.worker or args.profile:
        print(json.dumps(worker(sizes[0], device_counts[0], args.steps, args.warmup, args.dump, opts)))
        return 0
    if args.fit_gib:
        rows = [largest_batch(n_dev, args.fit_gib, sizes[:2], opts) for n_dev in device_counts]
        Path(args.out).write_text(json.dumps({"fit_gib": args.fit_gib, "opts": opts, "rows": rows}, indent=1))
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "probes"}))
        print(f"written to {args.out}")
        return 0

    rows = []
    for n_dev in device_counts:
        for b in sizes:
            with tempfile.TemporaryDirectory() as tmp:
                dump = str(Path(tmp) / "batch.npz") if args.torch and n_dev == 1 and not args.compile_only else None
                row = run_worker_process(b, n_dev, args.steps, args.warmup, dump, opts)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
                if dump and "error" not in row:
                    cmd = [args.torch, str(HERE / "torch_release_step.py"), dump, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--threads", str(args.torch_threads)]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode == 0:
                        t = json.loads(out.stdout.strip().splitlines()[-1])
                        t["batch_size"] = b
                        row["speedup"] = row["molecules_per_s"] / t["molecules_per_s"]
                    else:
                        t = {"framework": "torch_release", "batch_size": b, "error": out.stderr[-2000:]}
                    rows.append(t)
                    print(format_table([t]).splitlines()[-1], flush=True)
    # (Device facts come from the workers' rows: initialising JAX here would hold the accelerator's memory.)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(),
               "devices": sorted({r.get("device_kind", "") for r in rows if r.get("framework") == "chmr_jax"} - {""})}
    Path(args.out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print("\n" + format_table(rows))
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
