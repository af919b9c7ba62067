"""The frozen encoder's features for a prediction head (spec §8).

  embed(model, features)          the frozen encoder's outputs per molecule, in batches (eval mode:
                                  no dropout, batch norm from running statistics), so the head trains
                                  on fixed arrays: exactly the frozen-encoder computation, at the cost
                                  of one encoder pass per molecule instead of one per epoch
  tree_onehot(model, anchor)      the anchor's Tree-VQ path as one-hot codes per level
  cellular_projections(...)       the pretraining corpus' cellular projections of a dataset's molecules
  head_parts(parts, ...)          the asked parts this encoder supplies (an unknown name is an error)
  head_inputs(emb, parts)         [raw fingerprint, p_fingerprint, p_graph, (p_geometry)] concatenated
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chmr_jax.data import graphs
from chmr_jax import progress as progress_lib


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x):
    """A module (split into graphdef, state) applied to x; one compilation per module structure and
    input shape, never a new trace for each call."""
    return nnx.merge(graphdef, state)(x)


def embed(model, features, extra_inputs: dict | None = None, batch_size: int = 256,
          pad_multiple: int = 64, show_progress: bool = True) -> dict:
    """{'fingerprint_raw': [n, d_fp], each molecular projection [n, D], 'anchor': [n, D]} (float32).

    extra_inputs: {molecular modality: [n, d]} for inputs other than the fingerprint (e.g. geometry).
    """
    model.eval()
    n = len(features)
    budget = graphs.estimate_budget(features.n_atoms, features.n_edges, batch_size, pad_multiple)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, graph, inputs):
        return nnx.merge(graphdef, state).encode(graph, inputs)

    fp = features.fingerprints()
    inputs_all = {"fingerprint": fp, **(extra_inputs or {})}
    out: dict = {"fingerprint_raw": fp}
    with progress_lib.Progress(n, "embed", unit="mol", enabled=show_progress) as bar:
        for group in graphs.partition(features, np.arange(n), budget):
            graph = graphs.pack(features, group, budget)
            inputs = {}
            for name in model.mol_names:
                if name == "graph":
                    continue
                x = np.zeros((budget.n_graph, inputs_all[name].shape[1]), np.float32)
                x[:len(group)] = inputs_all[name][group]
                inputs[name] = x
            res = jax.device_get(encode(state, graph, inputs))
            for key in list(model.mol_names) + ["anchor"]:
                if key not in out:
                    out[key] = np.zeros((n, res[key].shape[1]), np.float32)
                out[key][group] = res[key][:len(group)]
            bar.update(len(group))
    return out


DEFAULT_PARTS = ("fingerprint_raw", "fingerprint", "graph", "geometry")


def tree_onehot(model, anchor: np.ndarray) -> np.ndarray:
    """The anchor's Tree-VQ path as one-hot codes per level, concatenated: [n, 2 + 4 + ... + 2^H]."""
    from chmr_jax.mechanisms import tree_vq
    codes = np.asarray(jax.jit(tree_vq.tree_vq)(model.codebook[...], jnp.asarray(anchor)).codes)
    return np.concatenate([np.eye(2 ** h, dtype=np.float32)[codes[:, h - 1] - 2 ** h]
                           for h in range(1, codes.shape[1] + 1)], axis=1)


def cellular_projections(model, pre_config, features, names, data_dir, config, log=print) -> dict:
    """{cellular modality: [n, D]} projections of the pretraining corpus' main input (observed, else
    propagated/imputed as in pretraining) for molecules found in the corpus by 14-char InChIKey block;
    zeros for molecules outside it (counted in the log)."""
    from chmr_jax.data import paths
    from chmr_jax.training import pretrain, pretrain_data
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or pre_config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or pre_config.cache_dir or None)
    corpus = pretrain.load_corpus(pre_config, data_dir, cache_dir, pre_config.workers or None, log=lambda *a: None)
    data = pretrain_data.prepare(corpus, pretrain.data_config(pre_config, 1))
    index = {str(k)[:14]: i for i, k in enumerate(corpus.keys)}
    rows = np.array([index.get(str(k)[:14], -1) for k in features.keys])
    found = rows >= 0
    out = {}
    for name in names:
        proj = np.zeros((len(rows), model.codebook.shape[-1]), np.float32)
        if found.any():
            graphdef, state = nnx.split(model.projectors[name])
            proj[found] = np.asarray(_apply(graphdef, state, data.inputs[name][rows[found]]))
        out[name] = proj
        log(f"  head input {name}: {int(found.sum())} of {len(rows)} molecules in the pretraining corpus "
            f"({int(data.reached[name][rows[found]].sum())} observed or propagated), zeros for the rest")
    return out


def head_parts(parts, mol_names, cell_names) -> tuple[str, ...]:
    """The head input parts an encoder with these modalities supplies, in the order asked.

    Known parts: the spec's DEFAULT_PARTS, 'tree' and the encoder's modalities by name. A spec part
    the encoder lacks (e.g. 'geometry' without a 3D modality) is left out, as the spec's default
    input says; any other name is a ValueError (a typo must not shrink the head input unnoticed).
    """
    known = ("fingerprint_raw", "tree", *mol_names, *cell_names)
    unknown = [p for p in parts if p not in known and p not in DEFAULT_PARTS]
    if unknown:
        raise ValueError(f"config.head.parts: unknown part(s) {unknown}; this encoder has "
                         f"{list(dict.fromkeys(known))} (comma separated)")
    return tuple(p for p in parts if p in known)


def head_inputs(emb: dict, parts=None) -> np.ndarray:
    """The head input [n, sum of widths]: `parts` of `emb` concatenated in order (a part missing from
    `emb` is a KeyError, never skipped); parts=None: the spec's DEFAULT_PARTS that `emb` holds."""
    if parts is None:
        parts = [p for p in DEFAULT_PARTS if p in emb]
    missing = [p for p in parts if p not in emb]
    if missing:
        raise KeyError(f"head input parts {missing} not among the embeddings {sorted(emb)}")
    return np.concatenate([emb[p] for p in parts], axis=1).astype(np.float32)
