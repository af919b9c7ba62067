"""Padded graph batches with fixed budgets, so a jitted step compiles once.

A `GraphBatch` holds up to `budget.n_graph - 1` real molecules plus one padding graph (the last
graph slot) that owns every padding node; padding edges are self-loops on the last padding node.
Budgets are rounded up to multiples of 64 (`pad_multiple`) and chosen from dataset statistics by
`estimate_budget`. `batches()` packs molecules greedily in the given order and starts a new batch
whenever the next molecule would overflow the budget, so every batch has identical shapes.

Blocks (budget.blocks = B > 1, one per device of a data-parallel mesh): the batch is B independent
sub-batches of n_node / B nodes, n_edge / B edges and n_graph / B graph slots, each with its own padding
graph (its last slot) and padding node (its last node); every index (senders, receivers, node_graph)
stays inside its block. Sharded one block per device, message passing and pooling never need another
device's nodes: `gather_rows` / `segment_sum` with `blocks` run per block (a vmap over the blocks), and
XLA partitions them without communication. With one global layout instead, a 8-chip TPU step
all-gathered every GIN layer's node states (27 MB of HBM traffic per molecule against 9 MB on one chip,
benchmarks/RESULTS.md "Compiled for TPU").

Segment helpers reduce node values per graph with explicit masks (padding contributes nothing).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, NamedTuple, Sequence

import numpy as np


class GraphBatch(NamedTuple):
    """A padded batch (a pytree of arrays; numpy on the host, jax arrays on device).

    nodes      int32 [N, 9]   OGB atom features (padding rows are 0)
    edges      int32 [E, 3]   OGB bond features
    senders    int32 [E]      global node index of each edge's source
    receivers  int32 [E]      global node index of each edge's target
    node_graph int32 [N]      graph slot of each node (padding nodes -> G - 1)
    n_node     int32 [G]      nodes per graph slot
    node_mask  bool  [N]      real node
    edge_mask  bool  [E]      real edge
    graph_mask bool  [G]      real molecule
    index      int32 [G]      row of the molecule in its MoleculeFeatures (-1 for padding)
    blocks     int32 [S, B]   per device shard (S rows) the block ids 0 .. B-1: the batch is B blocks
                              (module docstring); pack() always sets it, None reads as one block
    """
    nodes: np.ndarray
    edges: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    node_graph: np.ndarray
    n_node: np.ndarray
    node_mask: np.ndarray
    edge_mask: np.ndarray
    graph_mask: np.ndarray
    index: np.ndarray
    blocks: np.ndarray = None   # int32 [S, B]: one row per device shard; B (its width) is the block count


def n_blocks(batch: GraphBatch) -> int:
    """The number of blocks of a batch: a static shape, the width of `blocks` (1 without the field)."""
    return 1 if batch.blocks is None else int(batch.blocks.shape[1])


def _block_leaf(budget: "GraphBudget", graph_rows: tuple[int, int]) -> np.ndarray:
    """The `blocks` rows of the device shards whose first graph slot lies in `graph_rows` ([S_local, B]):
    sharded like the other arrays (one row per device), so every host contributes its devices' rows and
    the global leaf is [S, B] whatever the layout; only its width B is read."""
    per = budget.n_graph // budget.shards
    lo, hi = graph_rows
    count = sum(1 for s in range(budget.shards) if lo <= s * per < hi)
    return np.tile(np.arange(budget.blocks, dtype=np.int32), (count, 1))


@dataclasses.dataclass(frozen=True)
class GraphBudget:
    """Padded sizes: n_node / n_edge include room for padding; n_graph includes the padding graph."""
    n_node: int
    n_edge: int
    n_graph: int
    batch_size: int | None = None   # molecules per batch at most (n_graph may be rounded up past it)
    blocks: int = 1                 # independent sub-batches (module docstring); n_node, n_edge, n_graph divide
    shards: int = 1                 # devices the batch is split over (n_graph divides; rows of `blocks`)

    @property
    def max_molecules(self) -> int:
        cap = self.n_graph - self.blocks      # one padding slot per block
        return cap if self.batch_size is None else min(cap, self.batch_size)

    def block(self) -> "GraphBudget":
        """The budget of one block."""
        return GraphBudget(self.n_node // self.blocks, self.n_edge // self.blocks, self.n_graph // self.blocks)


def round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def estimate_budget(n_atoms: Sequence[int], n_edges: Sequence[int], batch_size: int,
                    pad_multiple: int = 64, n_sigma: float = 4.0, graph_multiple: int = 1,
                    blocks: int = 1) -> GraphBudget:
    """Budget for batches of `batch_size` molecules drawn from a dataset with these sizes.

    Nodes (edges) get mean * B + n_sigma * std * sqrt(B), the upper tail of a sum of B draws, at
    least the largest single molecule, plus one padding node; everything rounded up to
    `pad_multiple`. The graph slots (batch_size + the padding graph) are rounded up to
    `graph_multiple` (the device count, so every leading axis shards evenly). A rare batch that would overflow is cut short by `batches()` (fewer molecules,
    same shapes), so the budget trades padding waste against a few short batches.
    """
    n_atoms = np.asarray(n_atoms, dtype=np.float64)
    n_edges = np.asarray(n_edges, dtype=np.float64)
    if n_atoms.size == 0:
        raise ValueError("cannot estimate a graph budget from an empty dataset")
    if blocks > 1:
        # Each block is its own sum of ~B / blocks molecules, with its own upper tail and padding.
        one = estimate_budget(n_atoms, n_edges, -(-batch_size // blocks), pad_multiple, n_sigma, 1)
        return GraphBudget(n_node=one.n_node * blocks, n_edge=one.n_edge * blocks,
                           n_graph=one.n_graph * blocks, batch_size=batch_size, blocks=blocks,
                           shards=max(graph_multiple, 1))
    b = min(batch_size, n_atoms.size)

    def tail(x):
        return max(x.mean() * b + n_sigma * x.std() * math.sqrt(b), x.max())

    return GraphBudget(
        n_node=round_up(int(math.ceil(tail(n_atoms))) + 1, pad_multiple),
        n_edge=round_up(max(int(math.ceil(tail(n_edges))), 1), pad_multiple),
        n_graph=round_up(batch_size + 1, graph_multiple), batch_size=batch_size, shards=max(graph_multiple, 1))


@dataclasses.dataclass(frozen=True)
class Rows:
    """Leading-axis ranges [start, stop) of a GraphBatch's node arrays, edge arrays and graph-slot arrays.

    A host of a multi-process run packs only the rows its own devices hold (`pack(..., rows=)`); the
    ranges come from the batch sharding (train.local_rows). `Rows.full(budget)` is the whole batch."""
    node: tuple[int, int]
    edge: tuple[int, int]
    graph: tuple[int, int]

    @classmethod
    def full(cls, budget: GraphBudget) -> "Rows":
        return cls((0, budget.n_node), (0, budget.n_edge), (0, budget.n_graph))


def _overlap(a: int, b: int, lo: int, hi: int) -> tuple[int, int]:
    return max(a, lo), min(b, hi)


def pack(features, indices: Sequence[int], budget: GraphBudget, rows: Rows | None = None) -> GraphBatch:
    """Packs molecules `indices` of a featurize.MoleculeFeatures into one padded GraphBatch.

    With `rows`, only those rows of each array are built (the layout, i.e. where each molecule's
    nodes and edges sit, is the whole batch's, so the pieces of several hosts concatenate to exactly
    `pack(features, indices, budget)`); only the molecules overlapping the ranges are read."""
    indices = np.asarray(indices, dtype=np.int64)
    if budget.blocks > 1:
        return _pack_blocks(features, indices, budget, rows)
    n_mol = len(indices)
    atoms = features.n_atoms[indices]
    bonds = features.n_edges[indices]
    if n_mol > budget.max_molecules:
        raise ValueError(f"{n_mol} molecules exceed the graph budget of {budget.max_molecules}")
    if atoms.sum() > budget.n_node - 1 or bonds.sum() > budget.n_edge:
        raise ValueError(f"molecules need {atoms.sum()} nodes / {bonds.sum()} edges; the budget "
                         f"holds {budget.n_node - 1} / {budget.n_edge}")
    N, E, G = budget.n_node, budget.n_edge, budget.n_graph
    rows = rows or Rows.full(budget)
    (n_lo, n_hi), (e_lo, e_hi), (g_lo, g_hi) = rows.node, rows.edge, rows.graph
    nodes = np.zeros((n_hi - n_lo, features.nodes.shape[1]), np.int32)
    edges = np.zeros((e_hi - e_lo, features.edge_feats.shape[1]), np.int32)
    senders = np.full(e_hi - e_lo, N - 1, np.int32)
    receivers = np.full(e_hi - e_lo, N - 1, np.int32)
    node_graph = np.full(n_hi - n_lo, G - 1, np.int32)

    node_start = np.concatenate([[0], np.cumsum(atoms)]).astype(np.int64)
    edge_start = np.concatenate([[0], np.cumsum(bonds)]).astype(np.int64)
    # The slots whose nodes or edges reach into the requested ranges (starts are sorted).
    first = min(np.searchsorted(node_start, n_lo, "right"), np.searchsorted(edge_start, e_lo, "right")) - 1
    for slot in range(max(first, 0), n_mol):
        a, b = node_start[slot], node_start[slot + 1]
        c, d = edge_start[slot], edge_start[slot + 1]
        if a >= n_hi and c >= e_hi:
            break
        i = indices[slot]
        lo, hi = _overlap(a, b, n_lo, n_hi)
        if lo < hi:
            n0 = features.node_offsets[i]
            nodes[lo - n_lo:hi - n_lo] = features.nodes[n0 + lo - a:n0 + hi - a]
            node_graph[lo - n_lo:hi - n_lo] = slot
        lo, hi = _overlap(c, d, e_lo, e_hi)
        if lo < hi:
            e0 = features.edge_offsets[i]
            edges[lo - e_lo:hi - e_lo] = features.edge_feats[e0 + lo - c:e0 + hi - c]
            senders[lo - e_lo:hi - e_lo] = features.edge_index[e0 + lo - c:e0 + hi - c, 0] + a
            receivers[lo - e_lo:hi - e_lo] = features.edge_index[e0 + lo - c:e0 + hi - c, 1] + a
    n_real_nodes, n_real_edges = int(node_start[-1]), int(edge_start[-1])
    n_node = np.zeros(G, np.int32)
    n_node[:n_mol] = atoms
    n_node[G - 1] = N - n_real_nodes
    index = np.full(G, -1, np.int32)
    index[:n_mol] = indices
    slots = slice(g_lo, g_hi)
    return GraphBatch(
        nodes=nodes, edges=edges, senders=senders, receivers=receivers, node_graph=node_graph,
        n_node=n_node[slots], node_mask=np.arange(n_lo, n_hi) < n_real_nodes,
        edge_mask=np.arange(e_lo, e_hi) < n_real_edges, graph_mask=(np.arange(G) < n_mol)[slots],
        index=index[slots], blocks=_block_leaf(budget, rows.graph))


def _block_split(features, indices, budget: GraphBudget) -> list[np.ndarray]:
    """The molecules of a blocked batch per block: greedily in order, a block closes when the next
    molecule would overflow it (partition builds groups the same way, so this recovers its split)."""
    one = budget.block()
    out = partition(features, indices, one)     # the single-batch greedy rule on one block's budget
    if len(out) > budget.blocks:
        raise ValueError(f"{len(indices)} molecules need {len(out)} blocks of {one}; the budget has {budget.blocks}")
    return out + [np.zeros(0, np.int64)] * (budget.blocks - len(out))


def _pack_blocks(features, indices, budget: GraphBudget, rows: Rows | None) -> GraphBatch:
    """pack() of a blocked budget: each block packed on its own (its indices offset to its place in
    the batch); with `rows`, only the blocks (and rows of them) inside the requested ranges."""
    one = budget.block()
    if one.n_graph * budget.blocks != budget.n_graph or budget.n_graph % budget.shards:
        raise ValueError(f"{budget}: graph slots must split evenly into blocks and device shards")
    rows = rows or Rows.full(budget)
    pieces = []
    for d, group in enumerate(_block_split(features, indices, budget)):
        starts = (d * one.n_node, d * one.n_edge, d * one.n_graph)
        sizes = (one.n_node, one.n_edge, one.n_graph)
        local = [(max(lo - s0, 0), min(hi - s0, n)) for (lo, hi), s0, n in zip((rows.node, rows.edge, rows.graph),
                                                                            starts, sizes)]
        if all(lo >= hi for lo, hi in local):
            continue
        local = [(lo, max(lo, hi)) for lo, hi in local]
        g = pack(features, group, one, Rows(*local))
        pieces.append(g._replace(senders=g.senders + starts[0], receivers=g.receivers + starts[0],
                                 node_graph=g.node_graph + starts[2]))
    if not pieces:
        raise ValueError(f"rows {rows} hold no block of {budget}")
    fields = {f: np.concatenate([getattr(p, f) for p in pieces]) for f in GraphBatch._fields if f != "blocks"}
    return GraphBatch(**fields, blocks=_block_leaf(budget, rows.graph))


def partition(features, order: Sequence[int], budget: GraphBudget) -> list[np.ndarray]:
    """Greedy split of `order` into the molecule groups of fixed-shape batches.

    A group closes when it holds budget.max_molecules molecules or the next molecule would overflow
    the node/edge budget; a molecule that cannot fit even alone is an error naming it. Cheap (no
    packing), so a training loop can map a step number to its batch without building the others.
    """
    atoms, bonds = features.n_atoms, features.n_edges
    if budget.blocks > 1:
        return _partition_blocks(features, order, budget)
    groups: list[np.ndarray] = []
    current: list[int] = []
    used_nodes = used_edges = 0
    for i in order:
        a, b = int(atoms[i]), int(bonds[i])
        if a > budget.n_node - 1 or b > budget.n_edge:
            raise ValueError(f"molecule {i} ({features.smiles[i]}) has {a} atoms / {b} edges, more "
                             f"than the whole budget ({budget.n_node - 1} / {budget.n_edge}); raise "
                             "the budget or lower max_atoms")
        if current and (len(current) == budget.max_molecules or used_nodes + a > budget.n_node - 1
                        or used_edges + b > budget.n_edge):
            groups.append(np.asarray(current, np.int64))
            current, used_nodes, used_edges = [], 0, 0
        current.append(int(i))
        used_nodes += a
        used_edges += b
    if current:
        groups.append(np.asarray(current, np.int64))
    return groups


def _partition_blocks(features, order, budget: GraphBudget) -> list[np.ndarray]:
    """partition() for a blocked budget: molecules fill the blocks one after another (a block closes
    when the next molecule would overflow it); a group closes when its last block does or it holds
    budget.max_molecules molecules."""
    one = budget.block()
    atoms, bonds = features.n_atoms, features.n_edges
    groups, current = [], []
    block, nodes, edges, slots = 0, 0, 0, 0
    for i in order:
        a, b = int(atoms[i]), int(bonds[i])
        if a > one.n_node - 1 or b > one.n_edge:
            raise ValueError(f"molecule {i} ({features.smiles[i]}) has {a} atoms / {b} edges, more than one "
                             f"block of the budget holds ({one.n_node - 1} / {one.n_edge}, {budget.blocks} blocks); "
                             "raise the budget (batch size) or lower max_atoms")
        if slots and (slots == one.n_graph - 1 or nodes + a > one.n_node - 1 or edges + b > one.n_edge):
            block, nodes, edges, slots = block + 1, 0, 0, 0
        if current and (block == budget.blocks or len(current) == budget.max_molecules):
            groups.append(np.asarray(current, np.int64))
            current, block, nodes, edges, slots = [], 0, 0, 0, 0
        current.append(int(i))
        nodes, edges, slots = nodes + a, edges + b, slots + 1
    if current:
        groups.append(np.asarray(current, np.int64))
    return groups


def batches(features, order: Sequence[int], budget: GraphBudget) -> Iterator[GraphBatch]:
    """Greedy fixed-shape batches over molecules in `order` (groups from `partition`)."""
    for group in partition(features, order, budget):
        yield pack(features, group, budget)


# ---- segment helpers (jax) ---------------------------------------------------------------------

def gather_rows(x, idx, blocks: int = 1):
    """x[idx] for x [N, ...] and idx [M]; with `blocks`, block b of idx indexes block b of x only (a vmap
    over the blocks: no device reads another block's rows)."""
    import jax
    import jax.numpy as jnp
    if blocks == 1:
        return x[idx]
    n, m = x.shape[0] // blocks, idx.shape[0] // blocks
    xb = x.reshape((blocks, n) + x.shape[1:])
    ib = idx.reshape(blocks, m) - (jnp.arange(blocks, dtype=idx.dtype) * n)[:, None]
    return jax.vmap(lambda a, i: a[i])(xb, ib).reshape((blocks * m,) + x.shape[1:])


def segment_sum(data, segment_ids, num_segments: int, mask=None, blocks: int = 1):
    """Sum of `data` rows per segment; rows with mask False contribute nothing. With `blocks`, block b
    of the rows sums into block b of the segments only (module docstring)."""
    import jax
    import jax.numpy as jnp
    if mask is not None:
        data = jnp.where(mask.reshape(mask.shape + (1,) * (data.ndim - 1)), data, 0)
    if blocks == 1:
        return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)
    e, s = data.shape[0] // blocks, num_segments // blocks
    db = data.reshape((blocks, e) + data.shape[1:])
    ib = segment_ids.reshape(blocks, e) - (jnp.arange(blocks, dtype=segment_ids.dtype) * s)[:, None]
    out = jax.vmap(lambda d, i: jax.ops.segment_sum(d, i, num_segments=s))(db, ib)
    return out.reshape((num_segments,) + data.shape[1:])


def segment_mean(data, segment_ids, num_segments: int, mask=None):
    """Mean per segment over unmasked rows; empty segments give 0 (never NaN)."""
    import jax.numpy as jnp
    ones = jnp.ones(data.shape[:1], data.dtype)
    total = segment_sum(data, segment_ids, num_segments, mask)
    count = segment_sum(ones, segment_ids, num_segments, mask)
    return total / jnp.maximum(count, 1).reshape((-1,) + (1,) * (data.ndim - 1))


def segment_max(data, segment_ids, num_segments: int, mask=None):
    """Max per segment over unmasked rows; empty segments give 0 (not -inf)."""
    import jax
    import jax.numpy as jnp
    if mask is not None:
        data = jnp.where(mask.reshape(mask.shape + (1,) * (data.ndim - 1)), data, -jnp.inf)
    out = jax.ops.segment_max(data, segment_ids, num_segments=num_segments)
    return jnp.where(jnp.isfinite(out), out, 0)
