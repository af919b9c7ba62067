"""Propagation (Eq. 1) speed: chmr_jax's sparse formats vs scipy.sparse.

For each N: a K-nearest-neighbour graph (random neighbours and similarities; the timing does not
depend on which molecules are neighbours), symmetrised and row-normalised as in chmr_jax, then T
clamped iterations over a feature matrix of width `--width` (6,700 = the paper's cellular dims
summed), processed in column chunks. Throughput counts the minimum traffic of one step (read the
matrix's indices and weights once, read X once, write W X once) and is compared with this
machine's measured copy bandwidth.

The graph is laid out once per N over `--devices` devices (propagation.shard_graph; 1 = the 1-device
mesh the CPU pipeline runs on); on CPU, --devices > 1 asks for that many fake CPU devices.

--knn_sizes: the sharded exact Tanimoto kNN (random fingerprints with Morgan-like 3% density) and the
jax.lax.approx_max_k option at --knn_recall, with the approximate lists' recall against exact (tie-aware:
a returned neighbour counts when it is at least as similar as the exact k-th). approx_max_k is approximate
on TPU only; XLA lowers it to an exact top-k on CPU and GPU, where the recall is 1 by construction.

Usage: python benchmarks/propagation.py [--sizes 10000,50000,129592] [--width 6700] [--steps 5]
       [--devices 1] [--knn_sizes 20000] [--knn_recall 0.95]
Prints a table and writes benchmarks/propagation.json.
"""
import argparse
import gc
import json
import os
import platform
import time

import jax
import numpy as np
import scipy.sparse as sp

from chmr_jax.mechanisms import propagation as PR

# Column chunk per implementation: gather-based formats materialise [nnz, chunk] (or [N, Kmax,
# chunk]) intermediates, so they get narrower chunks to stay within the machine's memory.
CHUNK = {"bcsr": 2048, "bcoo": 512, "segment_sum": 256, "ell": 256, "scipy": 2048}


def copy_bandwidth_gbs(n_bytes=1 << 30, repeats=3) -> float:
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * n_bytes / best / 1e9


def random_knn(n, k, rng):
    idx = rng.integers(0, n - 1, size=(n, k))
    idx = idx + (idx >= np.arange(n)[:, None])   # never self
    return idx, rng.random((n, k)).astype(np.float32)


def run_scipy(w, x, observed, steps, chunk):
    out = np.empty_like(x)
    for s in range(0, x.shape[1], chunk):
        x0 = np.where(observed[:, None], x[:, s:s + chunk], 0.0).astype(np.float32)
        xt = x0
        for _ in range(steps):
            xt = w @ xt
            xt[observed] = x0[observed]
        out[:, s:s + chunk] = xt
    return out


def knn_rows(n, k, recall_target, mesh, rng):
    """Exact and approx_max_k kNN over random fingerprints (2048 bits, 3% set): seconds after a warm-up
    and the approximate lists' tie-aware recall against exact."""
    packed = np.packbits(rng.random((n, 2048)) < 0.03, axis=1)
    out = []
    exact = None
    for impl, recall in (("knn_exact", None), ("knn_approx", recall_target)):
        PR.tanimoto_knn(packed, k, mesh=mesh, approx_recall=recall)          # warm-up: compiles
        t = time.perf_counter()
        idx, sim = PR.tanimoto_knn(packed, k, mesh=mesh, approx_recall=recall)
        seconds = time.perf_counter() - t
        exact = sim if exact is None else exact
        row = {"N": n, "impl": impl, "k": k, "recall_target": recall, "seconds": round(seconds, 3),
               "recall": float(np.mean(sim >= exact[:, -1:]))}
        out.append(row)
        print(row, flush=True)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,50000,129592")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--width", type=int, default=6700)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--formats", default="bcsr,segment_sum,bcoo,ell,scipy")
    parser.add_argument("--max_seconds", type=float, default=240.0,
                        help="skip an implementation at larger N once one run took longer than this")
    parser.add_argument("--devices", type=int, default=1, help="shard rows over this many devices")
    parser.add_argument("--knn_sizes", default="", help="also time the kNN at these N (comma list)")
    parser.add_argument("--knn_recall", type=float, default=0.95, help="approx_max_k's recall target")
    parser.add_argument("--out", default="benchmarks/propagation.json")
    args = parser.parse_args()
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)   # before the backend starts; CPU only
    mesh = (PR.local_mesh() if args.devices == 1 else
            jax.sharding.Mesh(np.array(jax.devices()[:args.devices]), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,)))

    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth_gbs()
    device = jax.devices()[0]
    machine = (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on "
               f"{args.devices} x {device.platform}:{device.device_kind}; copy bandwidth {bandwidth:.1f} GB/s")
    print(machine, flush=True)
    rows, too_slow = [], set()
    for n in [int(s) for s in args.sizes.split(",")]:
        graph = PR.build_graph(*random_knn(n, args.k, rng), symmetrize=True)
        nnz = int(graph.indptr[-1])
        w = sp.csr_matrix((np.asarray(graph.weights), np.asarray(graph.cols), np.asarray(graph.indptr)),
                          shape=(n, n))
        graph = PR.shard_graph(graph, mesh)      # once per N, as the pipeline does
        x = rng.standard_normal((n, args.width), dtype=np.float32)
        observed = rng.random(n) < 0.1
        step_bytes = nnz * 8 + 2 * n * args.width * 4
        reference = None
        for fmt in args.formats.split(","):
            if fmt in too_slow:
                rows.append({"N": n, "impl": fmt, "nnz": nnz, "seconds": None, "note": "skipped (too slow)"})
                continue
            chunk = CHUNK[fmt]
            if fmt == "scipy":
                def run(w=w, x=x, chunk=chunk):
                    return run_scipy(w, x, observed, args.steps, chunk)
            else:
                def run(graph=graph, x=x, fmt=fmt, chunk=chunk):
                    return PR.propagate(graph, x, observed, args.steps, fmt=fmt, width_chunk=chunk).x
            out = run()                                   # warm-up: compiles every chunk shape
            t = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t
            if reference is None:   # agreement is checked on the first 256 columns (memory)
                reference = out[:, :256].copy()
                err = 0.0
            else:
                err = float(np.max(np.abs(out[:, :256] - reference)))
            del out
            gc.collect()
            gbs = step_bytes * args.steps / seconds / 1e9
            row = {"N": n, "impl": fmt, "nnz": nnz, "width": args.width, "steps": args.steps,
                   "seconds": round(seconds, 3), "GB_per_s": round(gbs, 2),
                   "fraction_of_copy_bw": round(gbs / bandwidth, 3), "max_abs_diff": err}
            rows.append(row)
            print(row, flush=True)
            if seconds > args.max_seconds:
                too_slow.add(fmt)
        del x, w, graph, reference
        gc.collect()

    for n in [int(s) for s in args.knn_sizes.split(",") if s]:
        rows += knn_rows(n, args.k, args.knn_recall, mesh, rng)
    print(f"\npropagation, K={args.k}, T={args.steps}, width={args.width} ({machine})")
    print(f"{'N':>8s} {'impl':>12s} {'nnz':>9s} {'seconds':>9s} {'GB/s':>7s} {'of copy bw':>10s}")
    for r in rows:
        if r["impl"].startswith("knn"):
            print(f"{r['N']:8d} {r['impl']:>12s} {'':9s} {r['seconds']:9.2f}   recall {r['recall']:.4f}")
        elif r["seconds"] is None:
            print(f"{r['N']:8d} {r['impl']:>12s} {r['nnz']:9d} {'skipped':>9s}")
        else:
            print(f"{r['N']:8d} {r['impl']:>12s} {r['nnz']:9d} {r['seconds']:9.2f} {r['GB_per_s']:7.2f} "
                  f"{r['fraction_of_copy_bw']:10.1%}")
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "copy_bandwidth_GBs": bandwidth, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
