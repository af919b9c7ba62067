"""The pretrained encoder as a pure function plus its state (load_encoder, encoder_of), and in-memory embedding of features.
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chmr_jax.data import featurize, graphs
from chmr_jax.mechanisms import tree_vq
from chmr_jax import progress as progress_lib


@dataclasses.dataclass
class Encoder:
    """A pretrained encoder as a pure function plus its state.

    apply(params, batch) -> {modality: [G, D], 'anchor': [G, D], 'tree_codes': [G, H] int32,
    'tree_paths': [G, H] int32, 'tree_vectors': [G, H, D]}; rows whose batch['graph'].graph_mask
    is False are padding. params holds the parameters (nnx.Param state); the batch-norm running
    statistics are baked into apply. `apply, params = load_encoder(DIR)` unpacks the two.
    """
    apply: Callable
    params: nnx.State
    settings: featurize.FeaturizerSettings
    mol_names: list
    config: dict
    step: int
    workdir: str

    def __iter__(self):
        return iter((self.apply, self.params))

    def batches(self, features: featurize.MoleculeFeatures, batch_size: int = 256,
                pad_multiple: int = 64) -> Iterator[tuple[np.ndarray, dict]]:
        """(molecule indices, batch) over `features` in order, every batch with the same shapes
        (one compilation of a jitted apply)."""
        budget = graphs.estimate_budget(features.n_atoms, features.n_edges, batch_size, pad_multiple)
        for group in graphs.partition(features, np.arange(len(features)), budget):
            g = graphs.pack(features, group, budget)
            yield group, {"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}}

    def params_digest(self) -> str:
        """sha256 of every parameter (tree order, bytes): what identifies the weights of an export."""
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return h.hexdigest()


def _slot_inputs(features, g: graphs.GraphBatch) -> np.ndarray:
    """float32 [G, F] fingerprint input per graph slot (zeros for padding slots), via the batch's index."""
    idx = np.asarray(g.index)
    real = idx >= 0
    fp = features.fingerprints(idx[real])
    x = np.zeros((len(idx), fp.shape[1]), np.float32)
    x[real] = fp
    return x


def load_encoder(workdir, step: int | None = None) -> Encoder:
    """The encoder of a `chmr-jax pretrain` (or `chmr-jax convert`) workdir, in eval mode."""
    from chmr_jax.training import pretrain

    return encoder_of(*pretrain.load_pretrained(workdir, step), workdir)


def encoder_of(model, config, meta, workdir) -> Encoder:
    """The Encoder of an already restored model (eval mode), e.g. from `pretrain.load_pretrained`."""
    if "geometry" in model.mol_names:
        raise ValueError(f"{workdir}: this encoder takes the geometry modality as input; embed needs SMILES-only "
                         "encoders: `chmr-jax convert --drop_geometry` (a converted release) or pretrain with "
                         "--config.model.molecular=fingerprint,graph")
    # params: the trainable parameters only (so jax.grad over them just works); the batch-norm
    # running statistics (eval mode) are constants of `apply`.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, batch):
        m = nnx.merge(graphdef, params, rest)
        out = m.encode(batch["graph"], batch["inputs"])
        vq = tree_vq.tree_vq(m.codebook[...], out["anchor"], batch["graph"].graph_mask)
        return {**{n: out[n] for n in m.mol_names}, "anchor": out["anchor"], "tree_codes": vq.codes,
                "tree_paths": tree_vq.paths(vq.codes).astype(jnp.int32), "tree_vectors": vq.quantized}

    return Encoder(apply=apply, params=params, settings=featurize.FeaturizerSettings.from_config(config.featurize),
                   mol_names=list(model.mol_names), config=config.to_dict(), step=int(meta["step"]),
                   workdir=str(workdir))


def embed_features(encoder: Encoder, features: featurize.MoleculeFeatures, batch_size: int = 256,
                   show_progress: bool = True) -> dict:
    """Every output of `encoder.apply` for each molecule of `features` (numpy, in order), on one device
    with a budget from all of `features` (the simple in-memory path; `export` streams)."""
    apply = jax.jit(encoder.apply)
    out: dict = {}
    with progress_lib.Progress(len(features), "embed", unit="mol", enabled=show_progress) as bar:
        for group, batch in encoder.batches(features, batch_size):
            res = jax.device_get(apply(encoder.params, batch))
            for name, value in res.items():
                if name not in out:
                    out[name] = np.zeros((len(features),) + value.shape[1:], value.dtype)
                out[name][group] = value[:len(group)]
            bar.update(len(group))
    return out
