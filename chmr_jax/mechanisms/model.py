"""The CHMR model in Flax NNX (spec §1, 3, 5, 6).

  GNNVirtualNode   GIN with a virtual node on padded graph batches (OGB's GNN_node_Virtualnode:
                   5 layers, width 300, residual, batch norm over real nodes only, dropout 0.5),
                   sum readout over real nodes.
  Projector        LayerNorm -> Linear(d_in, D) -> SiLU, one per modality (spec Eq. 2); the original
                   and augmented view of a cellular modality share it.
  Decoder          LayerNorm -> Linear(D, 4D) -> exact GELU -> Dropout(0.3) -> Linear (spec §6).
  CHMR             holds the above plus the heap-ordered Tree-VQ code table; `encode` returns the
                   per-modality projections and the anchor (sum of molecular projections).
All sizes come from the config and the data (modality dims); nothing is fixed to the paper's six.

Precision (`dtype`, config.model.dtype; None = the parameters' float32): activations and matmuls run
in `dtype` (bfloat16 on TPU / GPU), while parameters, batch-norm statistics (flax reduces them in
float32), sums over a graph's nodes or a node's incoming messages (segment sums of float32 copies;
the backward of the virtual node's broadcast too; the backward of the sender gather, a sum over a
node's few outgoing edges, stays in `dtype`), decoder logits (their matmul accumulates into a float32 output) and every
projection or decoder output the losses see stay float32. `remat=True` recomputes each GIN layer in
the backward pass instead of storing its activations: the layers but the last run as a lax.scan
over their stacked parameters with a jax.checkpoint body; dropout uses the same keys with and
without it. (A per-layer jax.checkpoint in the unrolled loop is undone by XLA's CPU compiler, which
drops the optimisation barriers and CSEs the recomputation away: same footprint, measured; inside
a scan the recomputation cannot be merged with the forward pass.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from chmr_jax.data import featurize, graphs
from chmr_jax.mechanisms import tree_vq


def at_least_f32(x):
    """bfloat16 / float16 -> float32; float32 and float64 (the float64 semantics tests) unchanged."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class CategoricalEncoder(nnx.Module):
    """Sum of one embedding per categorical field (OGB AtomEncoder / BondEncoder).

    With max_norm (the release's option), looked-up rows are rescaled to norm <= max_norm.
    """

    def __init__(self, vocab_sizes, dim: int, *, max_norm: float | None = None, dtype=None,
                 rngs: nnx.Rngs):
        init = nnx.initializers.xavier_uniform()
        self.tables = nnx.List([nnx.Embed(v, dim, embedding_init=init, dtype=dtype, rngs=rngs)
                                for v in vocab_sizes])
        self.max_norm = max_norm

    def __call__(self, x):
        out = 0.0
        for i, table in enumerate(self.tables):
            e = table(x[:, i])
            if self.max_norm:
                norm = jnp.linalg.norm(e, axis=-1, keepdims=True)
                e = e * jnp.minimum(1.0, self.max_norm / jnp.maximum(norm, 1e-7))
            out = out + e
        return out


def batch_norm(dim: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm with torch's momentum and the two-pass variance. Flax's default one-pass
    E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std: on an Intel Xeon it made a 3-layer
    GIN's readout differ by 1e-3 (relative) between two paddings of the same batch; two-pass: 6e-7."""
    return nnx.BatchNorm(dim, momentum=0.9, use_fast_variance=False, dtype=dtype, rngs=rngs)


class MLP2(nnx.Module):
    """Linear -> BatchNorm -> ReLU -> Linear [-> BatchNorm -> ReLU]; batch statistics under `mask`."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, final_norm: bool, dtype=None,
                 rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(d_in, d_hidden, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(d_hidden, dtype=dtype, rngs=rngs)
        self.lin2 = nnx.Linear(d_hidden, d_out, dtype=dtype, rngs=rngs)
        self.bn2 = batch_norm(d_out, dtype=dtype, rngs=rngs) if final_norm else None

    def __call__(self, x, mask):
        x = jax.nn.relu(self.bn1(self.lin1(x), mask=mask[:, None]))
        x = self.lin2(x)
        if self.bn2 is not None:
            x = jax.nn.relu(self.bn2(x, mask=mask[:, None]))
        return x


class GINConv(nnx.Module):
    """h_i' = MLP((1 + eps) h_i + sum_{j -> i} relu(h_j + bond(e_ji))) over real edges."""

    def __init__(self, dim: int, *, max_norm=None, dtype=None, rngs: nnx.Rngs):
        self.bond = CategoricalEncoder(featurize.BOND_VOCAB_SIZES, dim, max_norm=max_norm, dtype=dtype, rngs=rngs)
        self.mlp = MLP2(dim, 2 * dim, dim, final_norm=False, dtype=dtype, rngs=rngs)
        self.eps = nnx.Param(jnp.zeros(()))

    def __call__(self, h, batch: graphs.GraphBatch):
        blocks = graphs.n_blocks(batch)     # block-local indices: no device reads another's nodes
        msg = jax.nn.relu(graphs.gather_rows(h, batch.senders, blocks) + self.bond(batch.edges))
        # Summed in float32: a bf16 scatter-add rounds at every message it adds.
        agg = graphs.segment_sum(at_least_f32(msg), batch.receivers, h.shape[0], batch.edge_mask, blocks)
        return self.mlp(((1.0 + self.eps[...]) * h + agg).astype(h.dtype), batch.node_mask)


class GNNVirtualNode(nnx.Module):
    """OGB's GNN_node_Virtualnode (GIN, JK = last) on a padded GraphBatch; returns node states [N, D]."""

    def __init__(self, n_layers: int = 5, dim: int = 300, dropout: float = 0.5, residual: bool = True,
                 max_norm: float | None = None, *, dtype=None, remat: bool = False, rngs: nnx.Rngs):
        self.atom = CategoricalEncoder(featurize.ATOM_VOCAB_SIZES, dim, max_norm=max_norm, dtype=dtype, rngs=rngs)
        self.convs = nnx.List([GINConv(dim, max_norm=max_norm, dtype=dtype, rngs=rngs) for _ in range(n_layers)])
        self.norms = nnx.List([batch_norm(dim, dtype=dtype, rngs=rngs) for _ in range(n_layers)])
        self.vn_mlps = nnx.List([MLP2(dim, 2 * dim, dim, final_norm=True, dtype=dtype, rngs=rngs)
                                 for _ in range(n_layers - 1)])
        self.dtype = dtype
        self.remat = remat
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # OGB's learned initial virtual-node embedding (initialised to zero), so converted release
        # checkpoints keep theirs.
        self.virtual_node = nnx.Param(jnp.zeros((dim,)))
        self.residual = residual
        self.n_layers = n_layers

    def __call__(self, batch: graphs.GraphBatch):
        n_graph = batch.n_node.shape[0]
        node_mask = batch.node_mask
        h = self.atom(batch.nodes)
        vn = jnp.broadcast_to(self.virtual_node[...], (n_graph, h.shape[-1])).astype(h.dtype)
        keys = self._dropout_keys()
        first = 0
        if self.remat and self.n_layers > 1:
            h, vn = self._remat_layers(h, vn, batch, keys)
            first = self.n_layers - 1
        drop = ((lambda x, layer, i: x) if keys is None
                else (lambda x, layer, i: self.dropout(x, rngs=keys[layer, i])))
        for layer in range(first, self.n_layers):
            h_in = add_virtual_node(h, vn, batch.node_graph, graphs.n_blocks(batch))
            out = _conv_norm(self.convs[layer], self.norms[layer], h_in, batch)
            if layer < self.n_layers - 1:
                out = jax.nn.relu(out)
            out = drop(out, layer, 0)
            if self.residual:
                out = out + h_in
            if layer < self.n_layers - 1:
                pooled = (graphs.segment_sum(at_least_f32(h_in), batch.node_graph, n_graph, node_mask,
                                             graphs.n_blocks(batch)).astype(h.dtype) + vn)
                upd = drop(self.vn_mlps[layer](pooled, batch.graph_mask), layer, 1)
                vn = vn + upd if self.residual else upd
            h = out
        return jnp.where(node_mask[:, None], h, 0.0)

    def _dropout_keys(self):
        """Keys [L, 2] of the layers' node and virtual-node dropouts (one draw from the module's stream),
        or None when dropout is off (eval mode or rate 0). The unrolled loop and the remat scan use the
        same keys, so remat does not change which units drop."""
        if self.dropout.deterministic or self.dropout.rate == 0.0:
            return None
        return jax.random.split(self.dropout.rngs(), (self.n_layers, 2))

    def _remat_layers(self, h, vn, batch: graphs.GraphBatch, keys):
        """Layers 0 .. L-2 (each with its virtual-node update) as a lax.scan whose body is checkpointed:
        the backward pass keeps only each layer's input (h, vn) and recomputes the rest. Same
        arithmetic as the unrolled loop; the batch-norm statistics the scan updates are written back
        to the layers' modules; keys: `_dropout_keys()` (None: no dropout)."""
        n = self.n_layers - 1
        split = [nnx.split(m) for m in (*self.convs[:n], *self.norms[:n], *self.vn_mlps)]
        graphdefs = [split[0][0], split[n][0], split[2 * n][0]]
        stack = lambda states: jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        states = [stack([st for _, st in split[i * n:(i + 1) * n]]) for i in range(3)]
        deterministic = keys is None
        keys = jnp.zeros((n, 2)) if deterministic else keys[:n]
        node_mask, graph_mask, residual, dropout = batch.node_mask, batch.graph_mask, self.residual, self.dropout

        @jax.checkpoint
        def body(carry, xs):
            h, vn = carry
            conv, norm, vn_mlp = (nnx.merge(g, st) for g, st in zip(graphdefs, xs[:3]))
            drop = (lambda x, k: x) if deterministic else (lambda x, k: dropout(x, rngs=k))
            h_in = add_virtual_node(h, vn, batch.node_graph, graphs.n_blocks(batch))
            out = drop(jax.nn.relu(_conv_norm(conv, norm, h_in, batch)), xs[3][0])
            if residual:
                out = out + h_in
            pooled = (graphs.segment_sum(at_least_f32(h_in), batch.node_graph, vn.shape[0], node_mask,
                                         graphs.n_blocks(batch)).astype(h.dtype) + vn)
            upd = drop(vn_mlp(pooled, graph_mask), xs[3][1])
            vn = vn + upd if residual else upd
            return (out, vn), tuple(nnx.state(m, nnx.BatchStat) for m in (conv, norm, vn_mlp))

        (h, vn), stats = jax.lax.scan(body, (h, vn), (*states, keys))
        for i in range(n):   # the statistics the train-mode batch norms computed (unchanged in eval mode)
            for module, stat in zip((self.convs[i], self.norms[i], self.vn_mlps[i]), stats):
                nnx.update(module, jax.tree.map(lambda x: x[i], stat))
        return h, vn

    def readout(self, batch: graphs.GraphBatch):
        """Sum of real node states per graph [G, D] float32 (padding graphs are zero)."""
        h = at_least_f32(self(batch))
        return graphs.segment_sum(h, batch.node_graph, batch.n_node.shape[0], batch.node_mask, graphs.n_blocks(batch))


def add_virtual_node(h, vn, node_graph, blocks: int = 1):
    """h [N, D] + vn [G, D] of each node's graph, in h's dtype. The gather reads a float32 copy of vn, so
    its backward pass (a scatter-add of the nodes' cotangents into their graph: a sum over the graph's
    nodes) accumulates in float32, not in bf16."""
    return h + graphs.gather_rows(at_least_f32(vn), node_graph, blocks).astype(h.dtype)


def _conv_norm(conv: GINConv, norm: nnx.BatchNorm, h, batch: graphs.GraphBatch):
    return norm(conv(h, batch), mask=batch.node_mask[:, None])


class Projector(nnx.Module):
    """LayerNorm -> Linear(d_in, D) -> SiLU (spec Eq. 2)."""

    def __init__(self, d_in: int, d_out: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_in, epsilon=1e-5, dtype=dtype, rngs=rngs)   # torch's default, as the release
        self.linear = nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return at_least_f32(jax.nn.silu(self.linear(self.norm(x))))   # the losses see float32 (or f64)


class Decoder(nnx.Module):
    """LayerNorm -> Linear(D, 4D) -> exact GELU -> Dropout -> Linear(4D, d_out) (spec §6)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.3, *, dtype=None, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(d_in, epsilon=1e-5, dtype=dtype, rngs=rngs)   # torch's default, as the release
        self.hidden = nnx.Linear(d_in, 4 * d_in, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # The logits the BCE sees: a low-precision matmul accumulates into a float32 output, not
        # one rounded to bf16.
        low = dtype is not None and jnp.finfo(dtype).bits < 32
        self.out = nnx.Linear(4 * d_in, d_out, dtype=dtype, preferred_element_type=jnp.float32 if low else None,
                              rngs=rngs)

    def __call__(self, x):
        return at_least_f32(self.out(self.dropout(jax.nn.gelu(self.hidden(self.norm(x)), approximate=False))))


class CHMR(nnx.Module):
    """Encoders, projectors, decoders and the Tree-VQ table.

    mol_dims: {molecular modality: input dim}, e.g. {'fingerprint': 1191, 'graph': 300, 'geometry': 923};
    'graph' is the GNN readout (its dim is the GNN width). cell_dims: {cellular modality: dim}.
    target_dims: {context node type: target dim} for the reconstruction decoders.
    """

    def __init__(self, mol_dims: dict, cell_dims: dict, target_dims: dict, *, latent: int = 300,
                 gnn_layers: int = 5, gnn_width: int = 300, gnn_dropout: float = 0.5, residual: bool = True,
                 max_norm: float | None = None, decoder_dropout: float = 0.3, tree_depth: int = 6,
                 dtype=None, remat: bool = False, rngs: nnx.Rngs):
        # config.model unpacks into these arguments: dtype may be a name ('float32' = the parameters'
        # dtype, i.e. None) and max_norm 0 means no max-norm.
        dtype = None if dtype is None or jnp.dtype(dtype) == jnp.float32 else jnp.dtype(dtype)
        max_norm = max_norm or None
        if "graph" in mol_dims and mol_dims["graph"] != gnn_width:
            raise ValueError(f"the graph modality is the GNN readout: its dim must equal gnn_width "
                             f"({gnn_width}), got {mol_dims['graph']}")
        self.mol_names = list(mol_dims)
        self.cell_names = list(cell_dims)
        self.gnn = GNNVirtualNode(gnn_layers, gnn_width, gnn_dropout, residual, max_norm, dtype=dtype, remat=remat,
                                  rngs=rngs) if "graph" in mol_dims else None
        self.projectors = nnx.Dict({name: Projector(d, latent, dtype=dtype, rngs=rngs)
                                    for name, d in {**mol_dims, **cell_dims}.items()})
        self.decoders = nnx.Dict({name: Decoder(latent, d, decoder_dropout, dtype=dtype, rngs=rngs)
                                  for name, d in target_dims.items()})
        self.codebook = nnx.Param(tree_vq.init_table(rngs.params(), tree_depth, latent))

    def encode(self, batch: graphs.GraphBatch, inputs: dict) -> dict:
        """Projections {modality: [G, D]} for every modality with an input, plus 'anchor'.

        inputs: {modality: [G, d]} for the non-graph modalities (cellular ones may be absent).
        """
        out = {}
        for name in self.mol_names:
            x = self.gnn.readout(batch) if name == "graph" else inputs[name]
            out[name] = self.projectors[name](x)
        out["anchor"] = sum(out[name] for name in self.mol_names)
        for name in self.cell_names:
            if name in inputs:
                out[name] = self.projectors[name](inputs[name])
        return out
