"""The device side: fixed padding budgets, a mesh of the local devices (DeviceRunner), embed_molecules in memory.
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chmr_jax.data import featurize, graphs

from chmr_jax.downstream.export.encoder import Encoder, _slot_inputs
from chmr_jax.downstream.export.layout import BUDGET_SAMPLE


def embed_budget(encoder: Encoder, sample: featurize.MoleculeFeatures, batch_size: int,
                 n_devices: int) -> graphs.GraphBudget:
    """The padding budget of `batch_size` molecules (rounded up to the device count) in one graph block
    per device, sized from `sample`'s molecules with the pretraining config's pad_multiple / n_sigma."""
    cfg = encoder.config.get("batch", {})
    if len(sample) == 0:
        raise ValueError("none of the molecules sampled to size the batch budget could be featurized "
                         f"(the first {BUDGET_SAMPLE} rows); check the SMILES column")
    per_block = -(-batch_size // n_devices)
    pad = int(cfg.get("pad_multiple", 64))
    budget = graphs.estimate_budget(sample.n_atoms, sample.n_edges, per_block * n_devices, pad,
                                    float(cfg.get("n_sigma", 4.0)), graph_multiple=n_devices, blocks=n_devices)
    # The sample is the input's first rows only: a block must still hold the largest molecule the featurizer
    # accepts (max_atoms, at a mean degree of 4), so no later molecule is rejected for its size.
    one, largest = budget.block(), encoder.settings.max_atoms
    n_node = max(one.n_node, graphs.round_up(largest + 1, pad))
    n_edge = max(one.n_edge, graphs.round_up(4 * largest, pad))
    return dataclasses.replace(budget, n_node=n_node * budget.blocks, n_edge=n_edge * budget.blocks)


class DeviceRunner:
    """encoder.apply jitted over a 1-D mesh of `devices` (default: this process's local devices): the
    batch's leading axes sharded one graph block per device, the parameters replicated."""

    def __init__(self, encoder: Encoder, budget: graphs.GraphBudget, devices=None):
        devices = list(devices if devices is not None else jax.local_devices())
        if budget.blocks != len(devices):
            raise ValueError(f"budget {budget} has {budget.blocks} blocks for {len(devices)} devices")
        self.mesh = Mesh(np.array(devices), ("data",))
        self.budget = budget
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(encoder.params, NamedSharding(self.mesh, P()))
        self.apply = jax.jit(encoder.apply)
        self.encoder = encoder
        self.model_seconds = 0.0

    def out_spec(self, features) -> dict:
        """{name: jax.ShapeDtypeStruct [G, ...]} of apply's outputs (no computation)."""
        g = graphs.pack(features, np.arange(min(1, len(features))), self.budget)
        batch = {"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}}
        return jax.eval_shape(self.apply, self.params, batch)

    def __call__(self, features: featurize.MoleculeFeatures, spec: dict) -> dict:
        """{name: [len(features), ...]} for every molecule of `features`, in order. One batch is in
        flight while the next is packed (asynchronous dispatch)."""
        out = {k: np.zeros((len(features),) + v.shape[1:], v.dtype) for k, v in spec.items()}
        pending = None

        def collect(item):
            index, res = item
            t0 = time.perf_counter()
            res = jax.device_get(res)
            self.model_seconds += time.perf_counter() - t0
            real = index >= 0
            for k, v in res.items():
                out[k][index[real]] = v[real]

        for group in graphs.partition(features, np.arange(len(features)), self.budget):
            g = graphs.pack(features, group, self.budget)
            batch = jax.device_put({"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}},
                                   self.batch_sharding)
            t0 = time.perf_counter()
            res = self.apply(self.params, batch)
            self.model_seconds += time.perf_counter() - t0
            if pending is not None:
                collect(pending)
            pending = (np.asarray(g.index), res)
        if pending is not None:
            collect(pending)
        return out


def _split_oversized(features, budget: graphs.GraphBudget):
    """(indices that fit one graph block, [(index, reason)] for those that do not)."""
    one = budget.block()
    big = (features.n_atoms > one.n_node - 1) | (features.n_edges > one.n_edge)
    why = (f"larger than one batch block ({one.n_node - 1} atoms / {one.n_edge} edges); raise --batch_size "
           "or lower the featurizer's max_atoms")
    return np.nonzero(~big)[0], [(int(i), why) for i in np.nonzero(big)[0]]


def embed_molecules(encoder: Encoder, smiles: Sequence[str], ids: Sequence[str] | None = None,
                    batch_size: int = 256, cache_dir=None, show_progress: bool = True) -> tuple[dict, list]:
    """(arrays, rejects): arrays has 'id', 'smiles', 'key' and every apply output for the accepted
    molecules in input order; rejects lists {'row', 'id', 'smiles', 'reason'} for the others.
    In memory, with the budget and device layout of `export` (so the same values)."""
    ids = list(ids) if ids is not None else [f"row{i}" for i in range(len(smiles))]
    if len(ids) != len(smiles):
        raise ValueError(f"{len(ids)} ids for {len(smiles)} SMILES")
    features = featurize.featurize_smiles(smiles, encoder.settings, cache_dir, "embed",
                                          show_progress=show_progress, verbose=False)
    if len(features) == 0:
        rejects = [{"row": int(r), "id": ids[r], "smiles": s, "reason": why} for r, s, why in features.rejects]
        raise ValueError(f"none of the {len(smiles)} molecules could be featurized; first rejects: {rejects[:3]}")
    sample = features.subset(np.nonzero(features.rows < BUDGET_SAMPLE)[0])
    runner = DeviceRunner(encoder, embed_budget(encoder, sample, batch_size, len(jax.local_devices())))
    arrays, rejects = _embed_block(runner, runner.out_spec(features), features, ids, 0)
    return arrays, rejects


def _embed_block(runner: DeviceRunner, spec: dict, features, ids: Sequence[str], row0: int):
    """(arrays, rejects) of one featurized block of input rows (rows relative to the block, ids per row,
    row0 the block's first input row)."""
    keep, oversized = _split_oversized(features, runner.budget)
    rejected = [(int(r), s, why) for r, s, why in features.rejects]
    rejected += [(int(features.rows[i]), str(features.smiles[i]), why) for i, why in oversized]
    rejects = [{"row": row0 + r, "id": ids[r], "smiles": s, "reason": why} for r, s, why in sorted(rejected)]
    if len(keep) < len(features):
        features = features.subset(keep)
    outputs = runner(features, spec)
    arrays = {"id": np.array([ids[r] for r in features.rows], dtype=str).reshape(-1),
              "smiles": np.asarray(features.smiles, str).reshape(-1),
              "key": np.asarray(features.keys, str).reshape(-1), **outputs}
    return arrays, rejects
