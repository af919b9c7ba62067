"""The pretraining step: a pure jitted function of (state, batch, key) over a device mesh.

Parameters (and optimiser state, batch-norm statistics, RNG state) are replicated; every array
of the batch is sharded along its leading axis on the mesh axis 'data' (graph slots for per-graph
arrays, nodes / edges for the padded graph arrays, whose budgets are multiples of the device
count). XLA partitions the computation; the SCA loss can use the ring implementation
(objective.infonce_impl='ring'). Non-finite losses or gradients skip the update and are counted.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from chmr_jax import objective as objective_lib


class TrainState(NamedTuple):
    step: jax.Array
    params: nnx.State
    rest: nnx.State          # batch statistics, RNG state: everything but parameters
    opt_state: optax.OptState
    skipped: jax.Array       # number of updates skipped for non-finite loss / gradients


def make_optimizer(lr: float = 1e-4, weight_decay: float = 1e-8, total_steps: int = 1000,
                   schedule: str = "release_cosine") -> optax.GradientTransformation:
    """Adam with coupled L2 weight decay (added to the gradient, as torch.optim.Adam does).

    schedule: 'release_cosine' lr * cos(7 pi / 16 * t / T) (the release, no warm-up), 'cosine'
    (optax cosine decay to 0), or 'constant'.
    """
    if schedule == "release_cosine":
        sched = lambda t: lr * jnp.cos(7 * jnp.pi / 16 * jnp.minimum(t / max(total_steps, 1), 1.0))
    elif schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
    elif schedule == "constant":
        sched = lr
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose release_cosine, cosine or constant")
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.scale_by_adam(),
                       optax.scale_by_learning_rate(sched))


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    """(graphdef, TrainState) from a model; the model is put in train mode first."""
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                                opt_state=tx.init(params), skipped=jnp.zeros((), jnp.int32))


def data_mesh(devices=None):
    devices = devices if devices is not None else jax.devices()
    return jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(graphdef, tx, cfg: objective_lib.ObjectiveConfig, ctx: dict, mesh=None):
    """Returns step(state, batch, key) -> (state, metrics), jitted with the state donated.

    With a mesh, the state is replicated and the batch sharded on 'data' (see module docstring).
    """
    def step(state: TrainState, batch: dict, key):
        def loss_fn(params, rest):
            model = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables under grad (flax#5050)
            loss, metrics = objective_lib.objective(model, batch, ctx, key, cfg, mesh)
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
        return new_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    sharded = NamedSharding(mesh, P("data"))
    return jax.jit(step, donate_argnums=0, in_shardings=(replicated, sharded, replicated),
                   out_shardings=(replicated, replicated))


def shard_batch(batch: dict, mesh):
    """Places every batch array on the mesh, split along its leading axis over 'data'."""
    sharding = NamedSharding(mesh, P("data"))
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)
