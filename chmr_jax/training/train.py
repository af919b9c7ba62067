"""The pretraining step: a pure jitted function of (state, batch, base key, context) over a device mesh.

Parameters (and optimiser state, batch-norm statistics, RNG state) are replicated; every array
of the batch is sharded along its leading axis on the mesh axis 'data' (graph slots for per-graph
arrays, nodes / edges for the padded graph arrays, whose budgets are multiples of the device
count). The context graph's walk-target tables are split by rows over 'data', its indices
replicated (context_on_devices). XLA partitions the computation; the SCA loss can use the ring
implementation (objective.infonce_impl='ring'), the CPR term reads the tables under shard_map
(objective.walk_target_statistics). Non-finite losses or gradients skip the update and are counted.
"""
from __future__ import annotations

from typing import NamedTuple

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from chmr_jax.data import graphs
from chmr_jax.mechanisms import objective as objective_lib


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State
    rest: nnx.State          # batch statistics, RNG state: everything but parameters
    opt_state: optax.OptState
    skipped: jax.Array       # number of updates skipped for non-finite loss / gradients


def lr_schedule(lr: float, total_steps: int, schedule: str = "release_cosine"):
    """step -> learning rate. 'release_cosine' lr * cos(7 pi / 16 * t / T) (the release, no
    warm-up), 'cosine' (optax cosine decay to 0), or 'constant'."""
    total_steps = max(total_steps, 1)
    if schedule == "release_cosine":
        return lambda t: lr * jnp.cos(7 * jnp.pi / 16 * jnp.minimum(t / total_steps, 1.0))
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, total_steps)
    if schedule == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"unknown schedule {schedule!r}; choose release_cosine, cosine or constant")


def make_optimizer(lr: float = 1e-4, weight_decay: float = 1e-8, total_steps: int = 1000,
                   schedule: str = "release_cosine") -> optax.GradientTransformation:
    """Adam with coupled L2 weight decay (added to the gradient, as torch.optim.Adam does) and
    the `lr_schedule`."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                       optax.scale_by_learning_rate(lr_schedule(lr, total_steps, schedule)))


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, TrainState) from a model; the model is put in train mode first."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                                opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))


# One seed, independent PRNG streams. nnx.Rngs(seed) draws fold_in(key(seed), i) as its i-th key (the
# parameters' initialisation, then dropout): step keys fold_in(key(seed), step) from the same root
# would repeat those keys. Each stream folds its own tag into the root first.
INIT_STREAM, STEP_STREAM = 0, 1


def init_rngs(seed: int) -> nnx.Rngs:
    """The model's RNG stream for `seed` (parameter initialisation, then dropout)."""
    return nnx.Rngs(jax.random.fold_in(jax.random.key(seed), INIT_STREAM))


def step_base_key(seed: int) -> jax.Array:
    """The base key the train step folds its step number into (make_train_step) for `seed`."""
    return jax.random.fold_in(jax.random.key(seed), STEP_STREAM)


def data_mesh(devices=None):
    """The 1-D mesh ('data') over `devices` (default jax.devices()) with each process's devices adjacent:
    processes in process_index order, each one's devices in mesh_utils' topology order. local_range
    needs a process's rows of the batch to be contiguous, and jax.devices() does not promise that
    order (e.g. on TPU pods). Every process must bring the same number of devices (assemble_batch)."""
    devices = list(devices if devices is not None else jax.devices())
    per_process = {}
    for d in devices:
        per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
    if len(set(per_process.values())) > 1:
        raise ValueError(f"devices per process differ ({per_process}); a data-parallel mesh needs the same "
                         "number on every process")
    n_proc = len(per_process)
    grid = mesh_utils.create_hybrid_device_mesh((len(devices) // n_proc,), (n_proc,), devices,
                                                process_is_granule=True)
    return jax.sharding.Mesh(grid, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def schedule_count(opt_state) -> jax.Array:
    """The learning-rate schedule's step count in a make_optimizer state. It advances only with applied
    updates, so after a skipped step it trails TrainState.step."""
    is_state = lambda x: isinstance(x, optax.ScaleByScheduleState)
    states = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_state) if is_state(x)]
    if len(states) != 1:
        raise ValueError(f"expected one scale_by_schedule state in the optimiser state, found {len(states)}")
    return states[0].count


def make_train_step(graphdef, tx, cfg: objective_lib.ObjectiveConfig, ctx: dict, mesh=None, schedule=None,
                    split_tables: bool | None = None):
    """The jitted step(state, batch, base_key, ctx_arrays) -> (state, metrics), state donated.

    The step's randomness is fold_in(base_key, state.step) (base_key: step_base_key(seed)), derived
    inside the step, so a resumed run draws the same keys without the caller tracking steps.
    ctx_arrays: `context_on_devices(ctx, mesh)`, placed once and passed as an argument, not closed
    over: closed-over arrays become constants of the compiled program (the molecule targets alone are
    n x 1024); ctx here supplies only the static node-type index. With a mesh, the state is replicated
    and the batch sharded on 'data' (see the module docstring). schedule: tx's learning-rate schedule
    (make_optimizer); metrics['lr'] is then the rate this step's update used, schedule(the optimiser's
    count), which skipped updates hold back. split_tables: the walk-target tables split by rows over the
    mesh (None: split_context_tables decides from ctx's tables; context_on_devices must place them alike).
    """
    static = {"type_index": ctx["type_index"]}
    split = mesh is not None and split_context_tables(ctx, split_tables)

    def step(state: TrainState, batch: dict, base_key, ctx_arrays: dict):
        ctx_all = {**ctx_arrays, **static}
        key = jax.random.fold_in(base_key, state.step)

        def loss_fn(params, rest):
            model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables under grad (flax#5050)
            loss, metrics = objective_lib.objective(model, batch, ctx_all, key, cfg, mesh, step=state.step,
                                                    split_tables=split)
            return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(step=state.step + 1, params=keep(params, state.params), rest=keep(rest, state.rest),
                               opt_state=keep(opt_state, state.opt_state),
                               skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = {**metrics, "grad_norm": grad_norm, "skipped": new_state.skipped}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(schedule_count(state.opt_state)), jnp.float32)
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    return jax.jit(step, donate_argnums=0, in_shardings=(replicated, sharded, replicated, context_shardings(ctx, mesh, split)),
                   out_shardings=(replicated, replicated))


CONTEXT_TABLES = ("targets", "target_mask")   # per node type [n_t, d_t]: split by rows; the rest is index-sized
# Walk-target tables up to this size (all node types together) stay whole on every chip; larger ones are
# split by rows. The split keeps a chip's share flat in the corpus size (8.5 KB a molecule at the paper's
# coverage: a v5e chip full at ~1.8M molecules if every chip held them whole), but each chip then gathers
# and sums the walks of the whole global batch, not only its own molecules': compiled for v5e-16 at the
# paper's corpus (129,592 molecules, ~1.1 GB of tables) XLA's estimate of the step goes from 9.6 to 14.9 ms
# (benchmarks/RESULTS.md "Inputs at pod scale"). 2 GiB leaves a 16 GB chip most of its memory.
CONTEXT_SPLIT_BYTES = 2 << 30


def split_context_tables(ctx: dict, split: bool | None = None) -> bool:
    """Whether the walk-target tables of `ctx` (host arrays or ShapeDtypeStructs) are split by rows over
    the chips: `split` if given, else whether they pass CONTEXT_SPLIT_BYTES together."""
    if split is not None:
        return bool(split)
    tables = [x for k in CONTEXT_TABLES for x in jax.tree_util.tree_leaves(ctx.get(k, {}))]
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in tables) > CONTEXT_SPLIT_BYTES


def context_shardings(ctx: dict, mesh, split: bool | None = None) -> dict:
    """The shardings of the context arrays (ctx: objective.context_arrays, with or without the static
    type index): the walk-target tables split by rows over 'data' when split_context_tables says so (the
    objective then reads them under shard_map without gathering them: objective.walk_target_statistics),
    else replicated; the graph's indices (index-sized) replicated."""
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tables = rows if split_context_tables(ctx, split) else replicated
    return {k: jax.tree_util.tree_map(lambda _: tables if k in CONTEXT_TABLES else replicated, v)
            for k, v in ctx.items() if k != "type_index"}


def context_on_devices(ctx: dict, mesh=None, split: bool | None = None) -> dict:
    """The context graph's arrays (objective.context_arrays without the static type index) on the
    devices: on the default device without a mesh; on a mesh, the walk-target tables either replicated or
    (split_context_tables) padded with masked zero rows to a multiple of the device count and split by
    rows, the rest replicated (context_shardings). Each process builds only its own devices' shards, from
    the host copy. `split` must be what the step was made with (make_train_step's split_tables)."""
    arrays = {k: v for k, v in ctx.items() if k != "type_index"}
    if mesh is None:
        return jax.tree_util.tree_map(jnp.asarray, arrays)
    split = split_context_tables(arrays, split)
    if split:
        n = mesh.shape["data"]
        arrays = {k: jax.tree_util.tree_map(lambda x: objective_lib.pad_rows(np.asarray(x), n), v)
                  if k in CONTEXT_TABLES else v for k, v in arrays.items()}
    return jax.tree_util.tree_map(lambda x, s: place(x, s), arrays, context_shardings(arrays, mesh, split))


def place(tree, sharding):
    """Host arrays -> global jax Arrays with `sharding`. Each process materialises only the
    shards of its own devices (jax.make_array_from_callback), so the same code feeds one CPU, one
    GPU or every host of a pod, each host holding the same global value (states, keys)."""
    def from_host(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put(x):
        if isinstance(x, jax.Array):   # already on a device (e.g. a fresh state, PRNG keys)
            if sharding.is_fully_addressable:
                return jax.device_put(x, sharding)
            # Multi-process: device_put cannot target other processes' devices; every process holds
            # the same value, so each builds its own shards of the global array from a host copy.
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(from_host(jax.random.key_data(x)), impl=jax.random.key_impl(x))
            return from_host(x)
        return from_host(x)
    return jax.tree_util.tree_map(put, tree)


def host_array(x) -> np.ndarray:
    """A replicated device array -> numpy on this host. In a multi-process run a replicated global
    array is not fully addressable (jax.device_get refuses it); every process holds a full copy in
    its own shards, so the first local shard is the value."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_shards[0].data)
    return np.asarray(jax.device_get(x))


def host_values(tree):
    """`host_array` over a pytree (e.g. the step's metrics)."""
    return jax.tree_util.tree_map(host_array, tree)


def local_range(sharding, length: int) -> tuple[int, int]:
    """[start, stop) of a leading axis of `length` rows that this process's devices hold under
    `sharding` (rows split over the mesh's 'data' axis). The devices of one process are adjacent in the
    mesh (data_mesh orders them so), so the range is contiguous; anything else is an error rather than
    a silently wrong batch."""
    spans = sorted({(0 if s[0].start is None else s[0].start, length if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((length,)).values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's devices hold the non-contiguous rows {spans} of the batch; build "
                         "the mesh with each process's devices adjacent (train.data_mesh does)")
    return start, stop


def local_rows(budget, mesh) -> graphs.Rows:
    """The node, edge and graph-slot ranges of a batch with `budget` that this process feeds."""
    sharding = NamedSharding(mesh, P("data"))
    return graphs.Rows(local_range(sharding, budget.n_node), local_range(sharding, budget.n_edge),
                       local_range(sharding, budget.n_graph))


def assemble_batch(local_batch: dict, mesh):
    """This process's rows of a batch (built with `local_rows`) -> global jax Arrays split along the
    leading axis over 'data' (jax.make_array_from_process_local_data): no host holds, packs or
    transfers another host's rows. On one process the local rows are the whole batch."""
    sharding = NamedSharding(mesh, P("data"))
    n_local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    scale = mesh.devices.size // n_local

    def make(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * scale,) + x.shape[1:])
    return jax.tree_util.tree_map(make, local_batch)

