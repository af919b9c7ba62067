"""How much of the machine the step uses: the step's model FLOPs per device against the dense matmul
rate of a device this process owns, measured in the same process (issue 14 §2, issue 21 §2).

The fraction is `step FLOPs per device / step seconds / matmul FLOP/s`: 100% would be a step that runs
at the speed of one large, well-shaped matrix product on every device. Two traps of XLA's count
(`Lowered.cost_analysis()`) are avoided: it counts the whole unpartitioned program (the global batch,
not one device's share), and it counts the body of a loop once, not once per trip. `program_flops`
therefore adds each scanned body's count times its trip count, and the pretraining step is counted
in a form that does not depend on how it is chunked or sharded (pretrain.step_flops: dense InfoNCE,
no remat, as in the usual MFU convention where recomputation is not useful work), then divided by
the number of devices.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from jax.extend import core   # jaxpr_as_fun, jaxprs_in_params: walking a traced program


def lowered_flops(lowered) -> float | None:
    """FLOPs of one call of a lowered (not yet compiled: no compilation cost) jitted function, from
    XLA's HLO cost analysis; per device for an SPMD program. A program lowered for a backend that gives
    no count before compiling (TPU, through its plugin: `chmr-jax compile`) is counted by the CPU's HLO
    cost analysis of the same unoptimised module (FLOPs depend on the program, not the chip). None where
    no count can be had."""
    cost = None
    try:
        cost = lowered.cost_analysis()
    except Exception:   # some backends / versions raise instead of returning nothing
        cost = None
    if not cost:
        try:
            from jax._src import xla_bridge
            from jax._src.lib import _jax
            module = lowered.compiler_ir("hlo").as_hlo_module()
            cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
        except Exception:
            cost = None
    if isinstance(cost, (list, tuple)):   # older jax: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def _xla_flops(closed, mesh=None) -> float:
    """XLA's count for a ClosedJaxpr lowered on its own (each loop body once). Inside a shard_map
    (`mesh` given) the jaxpr is one device's program and may name the mesh's axes (collectives): it is
    lowered as a shard_map over that mesh of replicated arguments, which runs it once per device and
    is counted once."""
    fn = core.jaxpr_as_fun(closed)
    if mesh is not None:
        from jax.sharding import PartitionSpec
        body = fn
        # Replicated arguments made varying over the axes the body's own arguments vary over; each output
        # given a leading axis of 1 that the mesh's axes split (any varying output is then a valid result).
        vary = [_varying(a) for a in closed.in_avals]
        axes = tuple(mesh.axis_names)
        fn = lambda *xs: [y[None] for y in body(*(jax.lax.pcast(x, v, to="varying") if v else x
                                                  for x, v in zip(xs, vary)))]
        fn = jax.shard_map(fn, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec(axes))
    # Shapes and dtypes only: a shard_map body's avals carry its manual axes, which a jit argument must not.
    lowered = jax.jit(fn).lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals))
    return lowered_flops(lowered) or 0.0


def _varying(aval) -> tuple:
    """The manual mesh axes an abstract value inside a shard_map varies over."""
    kind = getattr(aval, "manual_axis_type", None)
    return tuple(sorted(getattr(kind, "varying", None) or getattr(aval, "vma", None) or ()))


def _closed(jaxpr):
    return jaxpr if hasattr(jaxpr, "consts") else core.ClosedJaxpr(jaxpr, [])


def _shard_map_devices(params) -> int:
    """Devices a shard_map's body runs on: the product of its manual axes' sizes (all the mesh's axes
    where the parameters do not say)."""
    mesh = params["mesh"]
    axes = params.get("newly_manual_axes") or params.get("manual_axes") or tuple(mesh.axis_names)
    shape = dict(mesh.shape)
    return int(math.prod(shape[a] for a in axes if a in shape)) or int(mesh.size)


def _uncounted_trips(jaxpr, mesh=None) -> float:
    """FLOPs XLA's once-per-loop count misses in `jaxpr`: for each lax.scan (also inside jit, remat,
    custom-derivative and shard_map sub-jaxprs) trips - 1 more copies of its body, whose own inner scans
    count in full; for each shard_map, whose body the count holds once (one device's program), the other
    devices' copies."""
    extra = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            body, trips = eqn.params["jaxpr"], eqn.params["length"]
            extra += (trips - 1) * _xla_flops(body, mesh) + trips * _uncounted_trips(body.jaxpr, mesh)
        elif name == "shard_map":
            body = _closed(eqn.params["jaxpr"])
            inner_mesh = eqn.params["mesh"]
            devices = _shard_map_devices(eqn.params)
            extra += (devices - 1) * _xla_flops(body, inner_mesh) \
                + devices * _uncounted_trips(body.jaxpr, inner_mesh)
        else:
            for sub in core.jaxprs_in_params(eqn.params):
                extra += _uncounted_trips(sub, mesh)
    return extra


def program_flops(fn, *args) -> int | None:
    """FLOPs of one call fn(*args) of the whole (unpartitioned) program, with every scanned body counted
    once per trip and every shard_map body once per device: XLA's count of the lowered program plus what
    it misses (tracing and lowering only, nothing compiled). Divide by the device count for one device's
    share. `fn` may be jitted; args may be arrays or ShapeDtypeStructs (with shardings for a mesh of TPU
    devices described without a TPU: `chmr-jax compile`). Loops of unknown trip count (while) still count
    once. The one FLOP counter of the project: utilisation here, `chmr-jax compile` per chip. None where
    the backend gives no count."""
    traced = (fn if hasattr(fn, "trace") else jax.jit(fn)).trace(*args)
    base = lowered_flops(traced.lower())
    if base is None:
        return None
    return int(round(base + _uncounted_trips(traced.jaxpr.jaxpr)))


def own_device(devices=None):
    """The first of `devices` (default: all) that this process owns: the device whose matmul rate is
    this process's reference (another host's device cannot be timed from here)."""
    devices = jax.devices() if devices is None else devices
    mine = [d for d in devices if d.process_index == jax.process_index()]
    if not mine:
        raise ValueError(f"none of the {len(devices)} devices belongs to process {jax.process_index()}")
    return mine[0]


def matmul_rate(dtype="float32", n: int | None = None, repeats: int = 5, device=None) -> float:
    """FLOP/s of a jitted n x n @ n x n product in `dtype` on `device` (default: this process's first
    device; it must be one this process owns): the best of `repeats` timed calls after one warm-up
    call. n defaults to 2048 on CPU (~0.1 s here) and 8192 on accelerators (large enough to reach their
    matrix units' rate)."""
    device = device or jax.local_devices()[0]
    if device.process_index != jax.process_index():
        raise ValueError(f"matmul_rate: {device} belongs to process {device.process_index}, not this process "
                         f"({jax.process_index()}); time one of jax.local_devices()")
    n = n or (2048 if device.platform == "cpu" else 8192)
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(k1, (n, n), dtype), device)
    b = jax.device_put(jax.random.normal(k2, (n, n), dtype), device)
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def report(step_flops: float | None, steps: int, seconds: float, rate: float | None) -> dict:
    """The utilisation fields of summary.json / the benchmark rows from `step_flops` (one device's share
    of the step's FLOPs): those FLOPs unrounded (an int) and in GFLOP, the achieved GFLOP/s per device
    over `steps` steps in `seconds`, the device's matmul GFLOP/s and their ratio (None where unknown)."""
    achieved = step_flops * steps / seconds if step_flops and steps and seconds > 0 else None
    gflop = lambda x: float(f"{x / 1e9:.4g}") if x else None   # 4 significant digits: a tiny model's share is < 0.01
    return {"step_flops_per_device": int(round(step_flops)) if step_flops else None,
            "step_gflop": gflop(step_flops), "achieved_gflop_per_s": gflop(achieved), "matmul_gflop_per_s": gflop(rate),
            "utilisation": round(achieved / rate, 3) if achieved and rate else None}
