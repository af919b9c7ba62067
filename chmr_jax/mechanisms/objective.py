"""The CHMR pretraining objective L = L_CPR + lambda1 L_SCA + lambda2 L_TreeVQ (spec §7), as one
function of the model, a padded batch, the context graph and a PRNG key.

Batch (a dict pytree, all leading dims G = graph slots of the padded batch):
  graph      graphs.GraphBatch
  inputs     {modality: [G, d]} molecular inputs (fingerprint, geometry, ...) and the main input of
             each cellular modality (after imputation: propagate | mean | zero)
  view1      {cellular modality: [G, d]} VICReg's first view (default: observed rows, the modality
             mean elsewhere, as the release; see pretrain_data.VICREG_FIRST_VIEWS)
  aug        {cellular modality: [G, d]} VICReg's second view: the propagated copy, and on measured
             rows propagation's estimate with the row held out (pretrain_data.VICREG_SECOND_VIEWS)
  mask       {cellular modality: [G] bool} rows that take part in SCA for that modality
  vicreg_mask {cellular modality: [G] bool} (optional, default `mask`) the SCA rows VICReg uses: those
             whose two views carry information (measured or reached by propagation)
  node       [G] int32 context-graph node of each molecule (its walk start)
Context (context_arrays, host or device arrays): indptr, indices, weights, node_type, node_row, and per
  node type targets [n_t, d_t] / target_mask [n_t, d_t] (see context.ContextGraph). With a mesh the
  target tables are split by rows over 'data' (train.context_on_devices) and read without gathering them
  (walk_target_statistics).
Every term and metric is returned, so the train step can log them.

Padding graph slots (graph_mask False) take part in no term: they are masked out of SCA and
Tree-VQ rows and out of CPR's entries (numerator and count), so the loss of a batch does not depend
on its padding budget, hence not on the device count it is rounded to.
Reconstruction decoders (spec §6): the molecule target is decoded from the anchor; each cellular
node type's target from the batch molecule's projection of that modality (cpr_source='modality', the
release) or from the anchor too (cpr_source='anchor').
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from chmr_jax.mechanisms import collapse, context as context_lib, losses, tree_vq


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    lambda_sca: float = 10.0
    lambda_vq: float = 1.0
    tau: float = 0.2
    symmetric: bool = False
    infonce_impl: str = "chunked"
    infonce_block: int = 1024
    vicreg_weights: tuple = (1.0, 1.0, 1.0)
    vq_eta: float = 1.0
    vq_mu: float = 1.0
    vq_reverse: bool = True
    walk_length: int = 4
    recon_kind: str = "bce"
    lambda_cpr: float = 1.0
    cpr_source: str = "modality"     # 'modality' (release) | 'anchor'
    collapse_stats: bool = True      # effective rank / per-dim std of the molecular projections
    # Compute them on every k-th step only (the logged ones, when train.log_every_steps is a multiple of
    # k; other steps report NaN): on TPU their four eigendecompositions moved 3.5 of a paper step's 14.5 GB.
    collapse_every: int = 1

    def __post_init__(self):
        # config.objective unpacks into this class: its JSON round trip turns the tuple into a list.
        object.__setattr__(self, "vicreg_weights", tuple(self.vicreg_weights))
        if self.cpr_source not in CPR_SOURCES:
            raise ValueError(f"cpr_source must be one of {CPR_SOURCES}, got {self.cpr_source!r}")


CPR_SOURCES = ("modality", "anchor")


def context_arrays(graph: context_lib.ContextGraph) -> dict:
    """The context graph as a dict of host (numpy) arrays for `objective` (targets keyed by type name,
    plus the static type index); train.context_on_devices places them. Host arrays, so that no device
    ever holds a whole table on the way (the tables grow with the corpus; on a mesh each device gets only
    its rows)."""
    def nonempty(x, fill):
        # A node type without nodes still gets one (masked) row, so gathers stay in bounds.
        return x if len(x) else np.full((1,) + x.shape[1:], fill, x.dtype)

    def compact(x):
        # Binary targets (the molecule's Morgan-r4 bits) are stored as uint8: 4x less device memory.
        x = np.asarray(x)
        return x.astype(np.uint8) if x.size and np.isin(x, (0.0, 1.0)).all() else x.astype(np.float32)

    def lanes(x, fill):
        # Columns padded to a multiple of 128 (TPU's lane tile; the objective slices them off after the
        # gather). With 2749 columns TPU's default layout stores the table column-major, to pad less,
        # and the row gather then copied the whole table every step: 0.92 GB of a paper step's 3.4 GB
        # per chip (benchmarks/RESULTS.md "Compiled for TPU").
        pad = -x.shape[1] % 128 if x.ndim == 2 else 0
        return np.pad(x, ((0, 0), (0, pad)), constant_values=fill) if pad else x

    return {
        # (the dtypes jnp.asarray gave them when this returned device arrays)
        "indptr": np.asarray(graph.indptr, np.int32), "indices": np.asarray(graph.indices, np.int32),
        "weights": np.asarray(graph.weights, np.float32), "node_type": np.asarray(graph.node_type, np.int32),
        "node_row": np.asarray(graph.node_row, np.int32),
        "targets": {t: lanes(compact(nonempty(graph.targets[t], 0)), 0) for t in graph.targets},
        "target_mask": {t: lanes(nonempty(np.asarray(graph.target_mask[t], bool), False), False) for t in graph.targets},
        "type_index": {t: i for i, t in enumerate(graph.type_names)},
    }


def pad_rows(x, multiple: int):
    """x with its leading axis padded (zeros / False: rows no walk reaches) to a multiple of `multiple`."""
    pad = -x.shape[0] % multiple
    if not pad:
        return x
    widths = ((0, pad),) + ((0, 0),) * (x.ndim - 1)
    return np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(x, widths)


def walk_target_statistics(table, table_mask, rows, beta, d_t: int, kind: str = "bce", mesh=None,
                           axis_name: str = "data") -> dict:
    """context.walk_statistics of one node type's walk targets: table / table_mask [n_t, >= d_t] (the
    type's targets, columns padded past d_t), rows [G, S] int (the table row of each walk position, -1
    where the position is not a node of this type or the slot is padding), beta [G, S].

    mesh=None: the rows are gathered from the whole table. With a mesh, the table is split by rows over
    `axis_name` (train.context_on_devices places it so; rows are padded to a multiple of the axis size)
    and never gathered whole: under shard_map every device takes the whole batch's walks (all-gathered:
    G x S indices and weights), computes the statistics of the entries whose rows it holds, and a
    reduce-scatter (psum_scatter over the batch axis) sums those partial statistics over the devices and
    hands each device the rows of its own molecules, as the batch is sharded; the count is a psum. The
    logits never move. Nothing here depends on parameters (the targets and the walks are data), so the
    gradient reaches the loss only through loss_from_statistics' logits.
    """
    def local(table, table_mask, rows, beta, first):
        own = (rows >= first) & (rows < first + table.shape[0])
        at = jnp.where(own, rows - first, 0)
        target = table[at][..., :d_t]                                            # [G, S, d_t]
        mask = table_mask[at][..., :d_t] & own[..., None]
        return context_lib.walk_statistics(target, mask, beta, kind)

    if mesh is None:
        return local(jnp.asarray(table), jnp.asarray(table_mask), rows, beta, 0)
    n = mesh.shape[axis_name]
    table, table_mask = pad_rows(table, n), pad_rows(table_mask, n)   # no-op for train.context_on_devices' tables

    def body(table, table_mask, rows, beta):
        gather = lambda x: jax.lax.all_gather(x, axis_name, tiled=True)
        first = jax.lax.axis_index(axis_name) * table.shape[0]
        stats = local(table, table_mask, gather(rows), gather(beta), first)
        scatter = lambda x: jax.lax.psum_scatter(x, axis_name, scatter_dimension=0, tiled=True)
        return {k: jax.lax.psum(x, axis_name) if k == "count" else scatter(x) for k, x in stats.items()}

    spec = P(axis_name)
    out_specs = {"w": spec, "v": spec, "count": P(), **({"q": spec} if kind == "mse" else {})}
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=out_specs)(
        table, table_mask, rows, beta)


def objective(model, batch: dict, ctx: dict, key, cfg: ObjectiveConfig, mesh=None, step=None, split_tables=True):
    """Returns (total loss, metrics dict of scalars / small arrays). step: the train step's counter
    (before this update), for cfg.collapse_every. split_tables: with a mesh, whether the walk-target
    tables are split by rows over it (train.split_context_tables) or whole on every device."""
    gm = batch["graph"].graph_mask
    proj = model.encode(batch["graph"], batch["inputs"])
    anchor = proj["anchor"]
    metrics = {}

    # Semantic consistency alignment (spec §4). Skipped (not computed) when its weight is 0.
    sca = 0.0
    for name in model.cell_names if cfg.lambda_sca else ():
        m = batch["mask"][name] & gm
        nce = losses.infonce(anchor, proj[name], m, cfg.tau, cfg.symmetric, cfg.infonce_impl,
                             cfg.infonce_block, mesh)
        # Two different inputs of the same molecule (view1 = observed-or-mean, aug = propagated, or on a
        # measured row its held-out propagation): propagation is clamped on measured rows, so the
        # propagated copy there *is* the measurement, and reusing it would make the invariance term
        # identically 0 on exactly the rows sca_mask='observed' keeps.
        view1 = model.projectors[name](batch["view1"][name]) if "view1" in batch else proj[name]
        aug = model.projectors[name](batch["aug"][name])
        vm = (batch["vicreg_mask"][name] & gm) if "vicreg_mask" in batch else m
        vic, parts = losses.vicreg(view1, aug, vm, *cfg.vicreg_weights)
        sca = sca + nce + vic
        metrics[f"sca/{name}/infonce"] = nce
        metrics[f"sca/{name}/vicreg"] = vic
        metrics[f"sca/{name}/invariance"] = parts["invariance"]
        metrics[f"sca/{name}/rows"] = jnp.sum(m)

    # Tree-VQ over every modality's projection (spec §5), averaged over modalities.
    vq = 0.0
    if cfg.lambda_vq:
        table = model.codebook[...]
        vq_terms = []
        for name in model.mol_names + model.cell_names:
            m = gm if name in model.mol_names else batch["mask"][name] & gm
            out = tree_vq.tree_vq(table, proj[name], m, cfg.vq_eta, cfg.vq_mu, cfg.vq_reverse)
            vq_terms.append(out.loss)
            metrics[f"vq/{name}/perplexity"] = out.perplexity
            metrics[f"vq/{name}/dead_fraction"] = out.dead_fraction
        vq = sum(vq_terms) / max(len(vq_terms), 1)

    # Context-propagation reconstruction (spec §6): walks from each molecule's node; every node
    # on the walk contributes its target, weighted by the walk's path weight beta.
    cpr = 0.0
    if cfg.lambda_cpr:
        nodes, beta = context_lib.random_walks(jnp.asarray(ctx["indptr"]), jnp.asarray(ctx["indices"]),
                                               jnp.asarray(ctx["weights"]), batch["node"], key, cfg.walk_length)
        beta = beta * gm[:, None]
        node_type, node_row = jnp.asarray(ctx["node_type"])[nodes], jnp.asarray(ctx["node_row"])[nodes]
        for name, decoder in model.decoders.items():
            t = ctx["type_index"][name]
            source = anchor if (name == context_lib.MOLECULE or cfg.cpr_source == "anchor") else proj[name]
            logits = decoder(source)                                             # [G, d_t]
            # Padding slots contribute no entries: neither to the sum nor to the count of the mean.
            rows = jnp.where((node_type == t) & gm[:, None], node_row, -1)       # [G, L+1], -1: not this type
            stats = walk_target_statistics(ctx["targets"][name], ctx["target_mask"][name], rows, beta,
                                           logits.shape[-1], cfg.recon_kind, mesh if split_tables else None)
            term = context_lib.loss_from_statistics(logits, stats, cfg.recon_kind)
            cpr = cpr + term
            metrics[f"cpr/{name}"] = term

    if cfg.collapse_stats:
        def stats():
            out = {}
            for name in model.mol_names + ["anchor"]:
                st = collapse.collapse_stats(jax.lax.stop_gradient(proj[name]), gm)
                out[f"collapse/{name}/effective_rank"] = st["effective_rank"]
                out[f"collapse/{name}/std"] = st["std"]
            return out
        if cfg.collapse_every > 1 and step is not None:
            skipped = lambda: jax.tree_util.tree_map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), jax.eval_shape(stats))
            metrics.update(jax.lax.cond((step + 1) % cfg.collapse_every == 0, stats, skipped))
        else:
            metrics.update(stats())

    total = cfg.lambda_cpr * cpr + cfg.lambda_sca * sca + cfg.lambda_vq * vq
    metrics.update({"loss": total, "loss/cpr": jnp.asarray(cpr, jnp.float32), "loss/sca": jnp.asarray(sca, jnp.float32),
                    "loss/vq": jnp.asarray(vq, jnp.float32)})
    return total, metrics
