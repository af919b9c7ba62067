"""Pretraining inputs built from a Corpus: propagated views, SCA masks, the context graph, batches.

  prepare(corpus, cfg)   once per run (host, numpy; the kNN and propagations on the devices):
      - the structure kNN graph over the corpus (exact Tanimoto on Morgan bits) and, per cellular
        modality, Eq. 1 propagation -> the propagated copy and `reached`; both run with their rows
        sharded over every device of the pipeline's mesh (train.data_mesh: all devices of all
        processes), the 1-device mesh being the same program (propagation.py)
      - the main input of each cellular modality by `imputation`: 'propagate' (the propagated copy,
        default), 'mean' (observed rows, column mean elsewhere) or 'zero'
      - VICReg's two views of p_c (spec §4: VICReg(p_c, p_c_aug)), which must differ on every row VICReg
        uses, or its invariance term is identically 0 there:
          first view  'mean' (default, the release): measured rows as measured, the column mean elsewhere;
                      'main': the main input (refused with imputation='propagate', where it would be
                      the second view itself on every unmeasured row)
          second view 'held_out' (default): the propagated copy, except on measured rows, whose
                      propagation is clamped to the measurement (= the first view): there it is Eq. 1's
                      estimate of the row from the *other* measured rows, the row's fold of
                      `holdout_folds` held out of the observed set. 'propagated': the propagated copy
                      everywhere (runs before this fix; invariance is 0 on every measured row)
      - SCA row masks: 'observed_or_propagated' (default: rows with a measured or propagated value),
        'observed' (measured rows only) or 'all' (the release: every row, imputed ones act as false
        negatives). VICReg uses the SCA rows that carry information (measured or reached by
        propagation): under 'all', a row never reached has the column mean in both views.
      - the context graph (molecules, one profile node per observed profile, and gene nodes: the
        columns of `gene_modality` (L1000 landmark genes by Entrez id) linked to molecules by the top
        1% of genes by |z| of each observed signature, weight |z| / that signature's largest |z|
        (context.top_genes), and to each other by the corpus' gene-gene edges and/or `gene_network`)
  batches(data, order)   fixed-shape numpy batch dicts in `order` (see objective.py for the layout)
  BatchPlan(data, seed)  global step -> (epoch, molecule group): a fresh permutation per epoch, so a
                         resumed run continues with exactly the batches of the uninterrupted one
  global_batches(...)    the plan's batches as global device arrays, this host's rows only, prefetched
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator

import numpy as np

from chmr_jax.data import graphs, splits
from chmr_jax.mechanisms import context, propagation
from chmr_jax.data.corpus import Corpus

IMPUTATIONS = ("propagate", "mean", "zero")
SCA_MASKS = ("observed_or_propagated", "observed", "all")
VICREG_FIRST_VIEWS = ("mean", "main")
VICREG_SECOND_VIEWS = ("held_out", "propagated")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int = 256
    pad_multiple: int = 64
    n_sigma: float = 4.0
    graph_multiple: int = 1          # the number of devices the batch is sharded over
    device_blocks: bool = True       # with graph_multiple > 1: one block per device (graphs.py)
    knn_k: int = 10
    propagation_steps: int = 5
    imputation: str = "propagate"
    sca_mask: str = "observed_or_propagated"
    vicreg_first_view: str = "mean"
    vicreg_second_view: str = "held_out"
    holdout_folds: int = 5              # measured rows held out of the propagation per fold (second view)
    context_clusters: int = 100
    context_floor: float = 0.8
    context_sparsity: float = 0.995
    gene_modality: str = "expression"   # its columns (Entrez ids) become gene nodes ('' = no gene nodes)
    gene_quantile: float = 0.99         # molecule-gene edges: each signature's top 1% of genes by |z| (spec §6)
    gene_network: str = ""              # optional gene-gene edges (Hetionet sif or source_id,target_id table)
    modalities: str = "all"             # cellular modalities used: 'all', 'none' or a comma list (applied to
                                        # the corpus before `prepare`: Corpus.with_modalities)
    # Layout of the sharded kNN / propagation (results do not depend on them, except knn_approx_recall):
    knn_block: int = 1024               # query rows per tile on each device
    knn_db_block: int = 16384           # database rows per tile: a [knn_block, knn_db_block] float32 tile
    knn_database: str = "auto"          # 'replicated' | 'sharded' (ring over the devices) | 'auto' (sharded
                                        # once the packed bits pass a quarter of a device's memory)
    knn_approx_recall: float = 0.0      # > 0: per-tile top-k by jax.lax.approx_max_k at this recall target
                                        # (approximate on TPU; CPU/GPU lower it exactly); 0: exact
    propagation_chunk: int = 0          # feature columns per propagation call; 0: 2048 on CPU (host memory,
                                        # fastest there), 256 on accelerators ([nnz / devices, chunk] temporaries)


@dataclasses.dataclass
class PretrainData:
    corpus: Corpus
    inputs: dict            # modality -> float32 [n, d]: 'fingerprint' and each cellular main input
    aug: dict               # cellular modality -> float32 [n, d] propagated copy (measured rows as measured)
    view1_fill: dict        # cellular modality -> VICReg's first view: the fill [d] of unobserved rows
                            # (observed rows keep their values), or None for the main input
    held_out: dict          # cellular modality -> float32 [n_measured, d]: VICReg's second view of the
                            # measured rows (in corpus order), or None (second view = `aug` everywhere)
    held_out_row: dict      # cellular modality -> int32 [n]: each corpus row's row of held_out (-1: not measured)
    sca_mask: dict          # cellular modality -> bool [n]
    vicreg_mask: dict       # cellular modality -> bool [n]: SCA rows that VICReg uses (sca_mask & reached)
    reached: dict           # cellular modality -> bool [n] (observed or reached by propagation)
    energy: dict            # cellular modality -> float32 [T + 1] Dirichlet energy per step
    context: context.ContextGraph
    budget: graphs.GraphBudget

    def __len__(self) -> int:
        return len(self.corpus)


def input_mesh():
    """The mesh the inputs are computed on: the training step's (every device of every process)."""
    from chmr_jax.training import train
    return train.data_mesh()


def prepare(corpus: Corpus, cfg: DataConfig = DataConfig(), mesh=None) -> PretrainData:
    """The pretraining inputs of `corpus` (module docstring); the kNN and propagations run sharded over
    `mesh` (default: input_mesh()). Every process of a multi-process run calls it alike and receives
    the whole result."""
    if cfg.imputation not in IMPUTATIONS:
        raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {cfg.imputation!r}")
    if cfg.sca_mask not in SCA_MASKS:
        raise ValueError(f"sca_mask must be one of {SCA_MASKS}, got {cfg.sca_mask!r}")
    if cfg.vicreg_first_view not in VICREG_FIRST_VIEWS:
        raise ValueError(f"vicreg_first_view must be one of {VICREG_FIRST_VIEWS}, got {cfg.vicreg_first_view!r}")
    if cfg.vicreg_second_view not in VICREG_SECOND_VIEWS:
        raise ValueError(f"vicreg_second_view must be one of {VICREG_SECOND_VIEWS}, got {cfg.vicreg_second_view!r}")
    if cfg.vicreg_first_view == "main" and cfg.imputation == "propagate":
        raise ValueError("vicreg_first_view='main' with imputation='propagate' gives VICReg the same propagated "
                         "copy as both views on every unmeasured row (invariance identically 0 there): use "
                         "vicreg_first_view='mean' or imputation='mean' / 'zero'")
    if cfg.holdout_folds < 2:
        raise ValueError(f"holdout_folds must be >= 2 (each fold of measured rows is held out of one propagation), "
                         f"got {cfg.holdout_folds}")
    feats = corpus.features
    n = len(corpus)
    inputs = {"fingerprint": feats.fingerprints()}
    aug, view1_fill, held_out, sca_mask, vicreg_mask, reached, energy = {}, {}, {}, {}, {}, {}, {}
    if corpus.modalities and n > 1:
        mesh = mesh if mesh is not None else input_mesh()
        knn = propagation.tanimoto_knn(feats.morgan, k=cfg.knn_k, block=cfg.knn_block,
                                       n_bits=feats.settings.morgan_size, mesh=mesh, db_block=cfg.knn_db_block,
                                       database=cfg.knn_database, approx_recall=cfg.knn_approx_recall or None)
        graph = propagation.shard_graph(propagation.build_graph(*knn), mesh)
        chunk = cfg.propagation_chunk or propagation.default_width_chunk(mesh)
    for name, m in corpus.modalities.items():
        if n > 1:
            result = propagation.propagate(graph, m.values, m.available, steps=cfg.propagation_steps, width_chunk=chunk)
            aug[name] = result.x
            reached[name] = result.reached
            energy[name] = result.energy
            held_out[name] = (held_out_propagation(graph, m.values, m.available, cfg.propagation_steps,
                                                   cfg.holdout_folds, width_chunk=chunk)
                              if cfg.vicreg_second_view == "held_out" else None)
        else:
            aug[name], reached[name], energy[name] = m.values.copy(), m.available.copy(), np.zeros(1, np.float32)
            held_out[name] = None
        mean = m.values[m.available].mean(0) if m.available.any() else np.zeros(m.dim, np.float32)
        if cfg.imputation == "propagate":
            inputs[name] = aug[name]
        elif cfg.imputation == "mean":
            inputs[name] = np.where(m.available[:, None], m.values, mean[None, :]).astype(np.float32)
        else:
            inputs[name] = np.where(m.available[:, None], m.values, 0.0).astype(np.float32)
        # Built per batch from the corpus values (a second n x d copy per modality is not kept).
        view1_fill[name] = mean.astype(np.float32) if cfg.vicreg_first_view == "mean" else None
        sca_mask[name] = {"observed_or_propagated": reached[name], "observed": m.available.copy(),
                          "all": np.ones(n, bool)}[cfg.sca_mask]
        vicreg_mask[name] = sca_mask[name] & reached[name]

    blocks = {name: context.ProfileBlock(features=m.values[m.available], molecule=np.nonzero(m.available)[0])
              for name, m in corpus.modalities.items()}
    genes = gene_nodes(corpus, cfg.gene_modality, cfg.gene_network)
    if genes:
        genes["gene_quantile"] = cfg.gene_quantile
    ctx = context.build_context_graph(
        np.unpackbits(feats.morgan, axis=1, count=feats.settings.morgan_size), feats.targets(),
        splits.scaffolds_of(list(corpus.smiles)), blocks, n_clusters=cfg.context_clusters,
        floor=cfg.context_floor, sparsity=cfg.context_sparsity, **genes)
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, cfg.batch_size, cfg.pad_multiple, cfg.n_sigma,
                                    cfg.graph_multiple, blocks=cfg.graph_multiple if cfg.device_blocks else 1)
    held_out_row = {name: np.where(m.available, np.cumsum(m.available) - 1, -1).astype(np.int32)
                    for name, m in corpus.modalities.items()}
    return PretrainData(corpus=corpus, inputs=inputs, aug=aug, view1_fill=view1_fill, held_out=held_out,
                        held_out_row=held_out_row,
                        sca_mask=sca_mask, vicreg_mask=vicreg_mask, reached=reached, energy=energy, context=ctx,
                        budget=budget)


def held_out_propagation(graph: propagation.PropagationGraph | propagation.ShardedGraph, values: np.ndarray,
                         available: np.ndarray, steps: int, folds: int, seed: int = 0,
                         width_chunk: int | None = 2048) -> np.ndarray:
    """float32 [n_measured, d]: Eq. 1's estimate of each measured row from the other measured rows.

    The measured rows are dealt into `folds` folds (a fixed permutation: the same corpus gives the same
    folds); for each fold, propagation runs with that fold's rows treated as unmeasured, and their
    propagated values are kept. A measured row that no other measured row reaches in `steps` steps
    gets propagation's fallback (the mean of the measured rows left in). With folds = the number of
    measured rows this is exact leave-one-out. Each fold is one propagation on the graph's mesh
    (a ShardedGraph: rows over its devices; a PropagationGraph: one device)."""
    obs = np.nonzero(available)[0]
    out = np.zeros((len(obs), values.shape[1]), np.float32)
    fold = np.random.default_rng(seed).permutation(len(obs)) % max(min(folds, len(obs)), 1)
    for f in np.unique(fold):
        held = obs[fold == f]
        keep = available.copy()
        keep[held] = False
        x = propagation.propagate(graph, values, keep, steps=steps, width_chunk=width_chunk).x
        out[fold == f] = x[held]
    return out


def gene_nodes(corpus: Corpus, modality: str = "expression", network: str = "") -> dict:
    """The gene part of the context graph as build_context_graph's keyword arguments.

    Gene nodes are the columns of `modality` (named by gene id by the importers: Entrez ids for the
    L1000 consensus / plate readers and the paper layout's L1k_idmaps.csv) plus every gene of the
    gene-gene edges (the corpus' G-G.csv.gz and the `network` file). Empty dict: no gene nodes
    (no such modality, or it has no observed profile).
    """
    if not modality or modality not in corpus.modalities or not corpus.modalities[modality].available.any():
        return {}
    from chmr_jax.data import profiles
    columns = [str(g) for g in corpus.modalities[modality].feature_names]
    pairs = [np.asarray(corpus.gene_edges, str).reshape(-1, 2)] if corpus.gene_edges is not None else []
    if network:
        pairs.append(profiles.read_gene_network(network))
    pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), str)
    ids = list(dict.fromkeys(columns + [str(g) for g in pairs.ravel()]))
    index = {g: i for i, g in enumerate(ids)}
    edges = np.array([(index[a], index[b]) for a, b in pairs if a != b], np.int64).reshape(-1, 2)
    return {"n_genes": len(ids), "gene_edges": edges, "expression": modality,
            "expression_genes": np.array([index[g] for g in columns], np.int64)}


def _view1(data: PretrainData, name: str, idx) -> np.ndarray:
    """[n, d] VICReg first view of corpus rows: observed rows as measured, the fill elsewhere."""
    m = data.corpus.modalities[name]
    rows = np.asarray(idx)
    return np.where(m.available[rows, None], m.values[rows], data.view1_fill[name][None, :]).astype(np.float32)


def _view2(data: PretrainData, name: str, idx) -> np.ndarray:
    """[n, d] VICReg second view of corpus rows: the held-out estimate on measured rows, the propagated
    copy elsewhere (built per batch: beside `aug`, only the measured rows' estimates are kept)."""
    rows = np.asarray(idx, np.int64)
    x = data.aug[name][rows]
    if data.held_out[name] is not None:
        position = data.held_out_row[name][rows]          # -1: not measured
        measured = position >= 0
        x = x.copy()
        x[measured] = data.held_out[name][position[measured]]
    return x


def batch_of(data: PretrainData, group, rows: graphs.Rows | None = None) -> dict:
    """The fixed-shape batch dict of the molecules `group` (see objective.py for the layout).
    Padding graph slots carry zeros and False masks; `node` is the molecule's context node (= its
    corpus index).

    With `rows` (graphs.Rows), only those rows of the batch are built: the graph's node / edge ranges
    and, for every per-molecule array, the graph-slot range; only the corpus rows of the molecules in
    them are read. A multi-process run's hosts each build their devices' rows this way
    (train.local_rows), and the pieces concatenate to the whole batch."""
    budget = data.budget
    rows = rows or graphs.Rows.full(budget)
    graph = graphs.pack(data.corpus.features, group, budget, rows)
    g_lo, g_hi = rows.graph
    # The molecule of each of this host's slots (graph.index: -1 on padding slots, which may sit between
    # real ones when the batch is split into blocks).
    real = graph.index >= 0
    idx = graph.index[real].astype(np.int64)

    def padded(x):    # [len(idx), ...] -> [g_hi - g_lo, ...] with zero padding slots
        out = np.zeros((g_hi - g_lo,) + x.shape[1:], x.dtype)
        out[real] = x
        return out

    def take(x):
        return padded(x[idx])

    return {"graph": graph,
            "inputs": {name: take(x) for name, x in data.inputs.items()},
            "aug": {name: padded(_view2(data, name, idx)) for name in data.aug},
            "view1": {name: padded(_view1(data, name, idx)) if data.view1_fill[name] is not None
                      else take(data.inputs[name]) for name in data.aug},
            "mask": {name: take(x) for name, x in data.sca_mask.items()},
            "vicreg_mask": {name: take(x) for name, x in data.vicreg_mask.items()},
            "node": padded(idx.astype(np.int32))}


def batches(data: PretrainData, order) -> Iterator[dict]:
    """Fixed-shape batch dicts over molecules in `order` (greedy groups, see graphs.partition)."""
    for group in graphs.partition(data.corpus.features, order, data.budget):
        yield batch_of(data, group)


class BatchPlan:
    """Maps a global step to its molecule group: epochs in sequence, each a fresh permutation."""

    def __init__(self, data: PretrainData, seed: int):
        self.data, self.seed = data, seed
        self._epoch: tuple[int, list[np.ndarray]] | None = None   # the last epoch's groups
        self._lengths: dict[int, int] = {}

    def epoch(self, e: int) -> list[np.ndarray]:
        if self._epoch is None or self._epoch[0] != e:
            order = np.random.default_rng([self.seed, e]).permutation(len(self.data))
            self._epoch = (e, graphs.partition(self.data.corpus.features, order, self.data.budget))
            self._lengths[e] = len(self._epoch[1])
        return self._epoch[1]

    def steps_per_epoch(self, e: int = 0) -> int:
        if e not in self._lengths:
            self.epoch(e)
        return self._lengths[e]

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_per_epoch(e) for e in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, position) of the batch used by optimiser step `step` (0-based)."""
        e = 0
        while step >= self.steps_per_epoch(e):
            step -= self.steps_per_epoch(e)
            e += 1
        return e, step

    def iterate(self, start: int, stop: int):
        """Yields (step, epoch, molecule group) for steps start..stop-1."""
        e, k = self.locate(start)
        step = start
        while step < stop:
            groups = self.epoch(e)
            while k < len(groups) and step < stop:
                yield step, e, groups[k]
                step, k = step + 1, k + 1
            e, k = e + 1, 0


def prefetch(iterator, size: int = 2):
    """Runs `iterator` in a background thread (host batch packing overlaps device compute)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:   # surfaced in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# ---- the job -------------------------------------------------------------------------------------


def global_batches(data: PretrainData, plan: BatchPlan, start: int, stop: int, mesh):
    """Yields (step, epoch, molecules, global batch) for steps start..stop-1, packed in a background
    thread. Per-host input: each process packs only the rows of the global batch its own devices
    hold (train.local_rows) and the global arrays are assembled from every process's part."""
    from chmr_jax.training import train
    rows = train.local_rows(data.budget, mesh)

    def host_batches():
        for step, epoch, group in plan.iterate(start, stop):
            yield step, epoch, len(group), train.assemble_batch(batch_of(data, group, rows), mesh)
    return prefetch(host_batches())
