"""InfoNCE memory and time: dense vs chunked vs ring (value and gradient, symmetric, masked).

Memory is XLA's compiled estimate (`lower(...).compile().memory_analysis()`: arguments + outputs +
temporaries, per device for the ring), so sizes that would not fit can still be measured. Runs
8 fake CPU devices for the ring unless real devices exist. Time is the median of 3 runs after a
warm-up, measured only where the compiled footprint fits `--budget_gib`. The last table gives the
largest N (a multiple of 1,024) whose footprint fits the budget, found by bisection over
compile-only estimates.

Usage: python benchmarks/infonce_memory.py [--sizes 4096,16384,65536] [--dim 300] [--budget_gib 16]
Writes benchmarks/infonce_memory.json.
"""
import argparse
import json
import os
import platform
import time

import jax

# 8 fake CPU devices for the ring when there is no accelerator; must precede JAX's first use.
jax.config.update("jax_num_cpu_devices", 8)

from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from chmr_jax.mechanisms import losses  # noqa: E402

GIB = 1 << 30


def make_fn(impl, mesh, block):
    def loss(a, p, m):
        if impl == "dense":
            return losses.infonce_dense(a, p, m, 0.2, True)
        if impl == "chunked":
            return losses.infonce_chunked(a, p, m, 0.2, True, block)
        return losses.infonce_ring(a, p, m, 0.2, True, mesh=mesh)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def specs(impl, n, dim, mesh):
    sharding = NamedSharding(mesh, P("data")) if impl == "ring" else None
    f32 = jax.numpy.float32
    return (jax.ShapeDtypeStruct((n, dim), f32, sharding=sharding),
            jax.ShapeDtypeStruct((n, dim), f32, sharding=sharding),
            jax.ShapeDtypeStruct((n,), jax.numpy.bool_, sharding=sharding))


def compiled_bytes(impl, n, dim, mesh, block):
    compiled = make_fn(impl, mesh, block).lower(*specs(impl, n, dim, mesh)).compile()
    ma = compiled.memory_analysis()
    return ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes


def time_run(impl, n, dim, mesh, block, repeats=3):
    fn = make_fn(impl, mesh, block)
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, dim))
    p = a + jax.random.normal(jax.random.key(1), (n, dim))
    m = jax.random.uniform(jax.random.key(2), (n,)) > 0.2
    if impl == "ring":
        sh = NamedSharding(mesh, P("data"))
        a, p, m = (jax.device_put(x, sh) for x in (a, p, m))
    jax.block_until_ready(fn(a, p, m))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(a, p, m))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def largest_fitting(impl, dim, mesh, block, budget, step, cap=1 << 24):
    lo, hi = 0, step
    while hi <= cap and compiled_bytes(impl, hi, dim, mesh, block) <= budget:
        lo, hi = hi, hi * 2
    if hi > cap:
        return lo, True
    while hi - lo > step:                       # bisection on multiples of `step`
        mid = (lo + hi) // 2 // step * step
        if compiled_bytes(impl, mid, dim, mesh, block) <= budget:
            lo = mid
        else:
            hi = mid
    return lo, False


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="4096,16384,65536")
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--budget_gib", type=float, default=16.0)
    parser.add_argument("--time_budget_gib", type=float, default=4.0,
                        help="only time configurations whose footprint is below this (host RAM)")
    parser.add_argument("--out", default="benchmarks/infonce_memory.json")
    args = parser.parse_args()

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    device = jax.devices()[0]
    machine = (f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__}, "
               f"{len(jax.devices())} x {device.platform}:{device.device_kind}")
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for impl in ("dense", "chunked", "ring"):
            nbytes = compiled_bytes(impl, n, args.dim, mesh, args.block)
            seconds = None
            if nbytes <= args.time_budget_gib * GIB:
                seconds = round(time_run(impl, n, args.dim, mesh, args.block), 4)
            rows.append({"N": n, "impl": impl, "bytes": int(nbytes), "GiB": round(nbytes / GIB, 3),
                         "seconds": seconds, "fits_budget": nbytes <= args.budget_gib * GIB})
            print(rows[-1], flush=True)

    budget = args.budget_gib * GIB
    step = 1024  # N stays a multiple of the 8 ring shards
    largest = {}
    for impl in ("dense", "chunked", "ring"):
        n_max, capped = largest_fitting(impl, args.dim, mesh, args.block, budget, step)
        largest[impl] = {"N": n_max, "at_search_cap": capped}
        print(impl, largest[impl], flush=True)

    print(f"\nInfoNCE value+grad, symmetric, D={args.dim}, block={args.block} ({machine})")
    print(f"{'N':>7s} {'impl':>8s} {'memory GiB':>11s} {'seconds':>9s}  (ring: per device of 8)")
    for r in rows:
        sec = f"{r['seconds']:9.3f}" if r["seconds"] is not None else f"{'not run':>9s}"
        print(f"{r['N']:7d} {r['impl']:>8s} {r['GiB']:11.3f} {sec}")
    print(f"\nlargest N within {args.budget_gib:g} GiB per device:")
    for impl, v in largest.items():
        print(f"  {impl:8s} {v['N']:>9d}{' (search cap)' if v['at_search_cap'] else ''}")
    with open(args.out, "w") as fh:
        json.dump({"machine": machine, "dim": args.dim, "block": args.block, "budget_gib": args.budget_gib,
                   "results": rows, "largest_n_within_budget": largest}, fh, indent=1)


if __name__ == "__main__":
    main()
