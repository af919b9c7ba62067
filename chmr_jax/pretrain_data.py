"""Pretraining inputs built from a Corpus: propagated views, SCA masks, the context graph, batches.

  prepare(corpus, cfg)   once per run (host, numpy):
      - the structure kNN graph over the corpus (exact Tanimoto on Morgan bits) and, per cellular
        modality, Eq. 1 propagation -> the propagated copy (VICReg's second view) and `reached`
      - the main input of each cellular modality by `imputation`: 'propagate' (the propagated copy,
        default), 'mean' (observed rows, column mean elsewhere) or 'zero'
      - SCA row masks: 'observed_or_propagated' (default: rows with a measured or propagated value)
        or 'all' (the release: every row, imputed ones act as false negatives)
      - the context graph (molecules, one profile node per observed profile, optional genes)
  batches(data, order)   fixed-shape numpy batch dicts in `order` (see objective.py for the layout)
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from chmr_jax import context, graphs, propagation, splits
from chmr_jax.corpus import Corpus

IMPUTATIONS = ("propagate", "mean", "zero")
SCA_MASKS = ("observed_or_propagated", "all")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    batch_size: int = 256
    pad_multiple: int = 64
    n_sigma: float = 4.0
    graph_multiple: int = 1          # the number of devices the batch is sharded over
    knn_k: int = 10
    propagation_steps: int = 5
    imputation: str = "propagate"
    sca_mask: str = "observed_or_propagated"
    context_clusters: int = 100
    context_floor: float = 0.8
    context_sparsity: float = 0.995


@dataclasses.dataclass
class PretrainData:
    corpus: Corpus
    inputs: dict            # modality -> float32 [n, d]: 'fingerprint' and each cellular main input
    aug: dict               # cellular modality -> float32 [n, d] propagated copy
    sca_mask: dict          # cellular modality -> bool [n]
    reached: dict           # cellular modality -> bool [n] (observed or reached by propagation)
    energy: dict            # cellular modality -> float32 [T + 1] Dirichlet energy per step
    context: context.ContextGraph
    budget: graphs.GraphBudget

    def __len__(self) -> int:
        return len(self.corpus)


def prepare(corpus: Corpus, cfg: DataConfig = DataConfig()) -> PretrainData:
    if cfg.imputation not in IMPUTATIONS:
        raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {cfg.imputation!r}")
    if cfg.sca_mask not in SCA_MASKS:
        raise ValueError(f"sca_mask must be one of {SCA_MASKS}, got {cfg.sca_mask!r}")
    feats = corpus.features
    n = len(corpus)
    inputs = {"fingerprint": feats.fingerprints()}
    aug, sca_mask, reached, energy = {}, {}, {}, {}
    if corpus.modalities and n > 1:
        knn = propagation.tanimoto_knn(feats.morgan, k=cfg.knn_k, n_bits=feats.settings.morgan_size)
        graph = propagation.build_graph(*knn)
    for name, m in corpus.modalities.items():
        if n > 1:
            result = propagation.propagate(graph, m.values, m.available, steps=cfg.propagation_steps)
            aug[name] = np.asarray(result.x, np.float32)
            reached[name] = np.asarray(result.reached)
            energy[name] = np.asarray(result.energy, np.float32)
        else:
            aug[name], reached[name], energy[name] = m.values.copy(), m.available.copy(), np.zeros(1, np.float32)
        if cfg.imputation == "propagate":
            inputs[name] = aug[name]
        elif cfg.imputation == "mean":
            mean = m.values[m.available].mean(0) if m.available.any() else np.zeros(m.dim, np.float32)
            inputs[name] = np.where(m.available[:, None], m.values, mean[None, :]).astype(np.float32)
        else:
            inputs[name] = np.where(m.available[:, None], m.values, 0.0).astype(np.float32)
        sca_mask[name] = reached[name] if cfg.sca_mask == "observed_or_propagated" else np.ones(n, bool)

    blocks = {name: context.ProfileBlock(features=m.values[m.available], molecule=np.nonzero(m.available)[0])
              for name, m in corpus.modalities.items()}
    ctx = context.build_context_graph(
        np.unpackbits(feats.morgan, axis=1, count=feats.settings.morgan_size), feats.targets(),
        splits.scaffolds_of(list(corpus.smiles)), blocks, n_clusters=cfg.context_clusters,
        floor=cfg.context_floor, sparsity=cfg.context_sparsity)
    budget = graphs.estimate_budget(feats.n_atoms, feats.n_edges, cfg.batch_size, cfg.pad_multiple, cfg.n_sigma,
                                    cfg.graph_multiple)
    return PretrainData(corpus=corpus, inputs=inputs, aug=aug, sca_mask=sca_mask, reached=reached,
                        energy=energy, context=ctx, budget=budget)


def batch_of(data: PretrainData, group) -> dict:
    """The fixed-shape batch dict of the molecules `group` (see objective.py for the layout).
    Padding graph slots carry zeros and False masks; `node` is the molecule's context node (= its
    corpus index)."""
    g = data.budget.n_graph
    graph = graphs.pack(data.corpus.features, group, data.budget)
    idx = np.asarray(group, np.int64)

    def rows(x):
        out = np.zeros((g,) + x.shape[1:], x.dtype)
        out[:len(idx)] = x[idx]
        return out

    return {"graph": graph,
            "inputs": {name: rows(x) for name, x in data.inputs.items()},
            "aug": {name: rows(x) for name, x in data.aug.items()},
            "mask": {name: rows(x) for name, x in data.sca_mask.items()},
            "node": rows(np.arange(len(data), dtype=np.int32))}


def batches(data: PretrainData, order) -> Iterator[dict]:
    """Fixed-shape batch dicts over molecules in `order` (greedy groups, see graphs.partition)."""
    for group in graphs.partition(data.corpus.features, order, data.budget):
        yield batch_of(data, group)
