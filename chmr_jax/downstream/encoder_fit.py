"""Training the encoder with its head end to end: full fine-tuning of a pretrained encoder, and the
GNN-from-scratch baseline (the same architecture freshly initialised), with `head.fit`'s protocol."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from chmr_jax.data import graphs
from chmr_jax.downstream import embeddings, head as head_lib


class EncoderWithHead(nnx.Module):
    """encoder.encode -> the head's input parts (raw fingerprint passed through) -> Head."""

    def __init__(self, encoder, head: head_lib.Head, parts):
        self.encoder = encoder
        self.head = head
        self.parts = tuple(p for p in parts if p == "fingerprint_raw" or p in encoder.mol_names)

    def __call__(self, graph, inputs, fp_raw):
        emb = dict(self.encoder.encode(graph, inputs), fingerprint_raw=fp_raw)
        return self.head(jnp.concatenate([emb[p] for p in self.parts], axis=1))


def _head_width(encoder, fp_width: int, parts) -> int:
    latent = encoder.codebook.shape[-1]
    return sum(fp_width if p == "fingerprint_raw" else latent for p in parts)


def fit_encoder(encoder, features, y: np.ndarray, split: dict, task_type: str, cfg: head_lib.FitConfig = head_lib.FitConfig(),
                encoder_lr: float = 1e-4, parts=embeddings.DEFAULT_PARTS, extra_inputs: dict | None = None,
                pad_multiple: int = 64, log=None) -> dict:
    """Trains encoder + a new Head end to end (Adam: `encoder_lr` for the encoder, cfg.lr for the head).

    Same protocol as `fit` (masked loss, best validation epoch, patience); the encoder is used in train
    mode for updates (dropout, batch statistics) and eval mode for scoring. With a pretrained encoder this
    is full fine-tuning; with a freshly initialised one it is the GNN-from-scratch baseline.
    Returns {'model': EncoderWithHead at the best epoch (eval mode), 'best_epoch', 'valid', 'test',
    'test_pred', 'history'}.
    """
    y = np.asarray(y, np.float32)
    fp = features.fingerprints()
    inputs_all = {"fingerprint": fp, **(extra_inputs or {})}
    parts = tuple(p for p in parts if p == "fingerprint_raw" or p in encoder.mol_names)
    head = head_lib.Head(_head_width(encoder, fp.shape[1], parts), y.shape[1], cfg.hidden, cfg.norm, cfg.dropout,
                rngs=nnx.Rngs(cfg.seed))
    net = EncoderWithHead(encoder, head, parts)
    is_head = lambda path, _: path[0] == "head"
    graphdef, head_params, enc_params, rest = nnx.split(net, nnx.All(nnx.Param, is_head), nnx.Param, ...)
    tx_enc, tx_head = optax.adam(encoder_lr), optax.adam(cfg.lr)
    opt_state = (tx_enc.init(enc_params), tx_head.init(head_params))
    budget = graphs.estimate_budget(features.n_atoms, features.n_edges, cfg.batch_size, pad_multiple)

    def batch(group):
        pad = lambda a, fill=0.0: np.concatenate(
            [a[group], np.full((budget.n_graph - len(group),) + a.shape[1:], fill, a.dtype)])
        inputs = {n: pad(inputs_all[n]) for n in encoder.mol_names if n != "graph"}
        return graphs.pack(features, group, budget), inputs, pad(fp), pad(y, np.nan)

    @jax.jit
    def train_step(enc_params, head_params, rest, opt_state, graph, inputs, fp_b, yb):
        def loss_fn(enc_params, head_params):
            model = nnx.merge(graphdef, head_params, enc_params, rest, copy=True)
            model.train()
            loss = head_lib.masked_loss(model(graph, inputs, fp_b), yb, task_type)
            return loss, nnx.state(model, nnx.Not(nnx.Param))

        (loss, rest), (g_enc, g_head) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            enc_params, head_params)
        u_enc, s_enc = tx_enc.update(g_enc, opt_state[0], enc_params)
        u_head, s_head = tx_head.update(g_head, opt_state[1], head_params)
        return (optax.apply_updates(enc_params, u_enc), optax.apply_updates(head_params, u_head), rest,
                (s_enc, s_head), loss)

    @jax.jit
    def predict_step(enc_params, head_params, rest, graph, inputs, fp_b):
        model = nnx.merge(graphdef, head_params, enc_params, rest, copy=True)
        model.eval()
        out = model(graph, inputs, fp_b)
        return jax.nn.sigmoid(out) if task_type == "classification" else out

    def predict(state, rows):
        out = np.zeros((len(rows), y.shape[1]), np.float32)
        pos = {r: i for i, r in enumerate(rows)}
        for group in graphs.partition(features, np.asarray(rows), budget):
            g, inputs, fp_b, _ = batch(group)
            res = np.asarray(predict_step(*state, g, inputs, fp_b))
            out[[pos[r] for r in group]] = res[:len(group)]
        return out

    rng = np.random.default_rng(cfg.seed)
    best, best_state, best_epoch, history, waited = None, None, -1, [], 0
    loss = np.nan
    for epoch in range(cfg.epochs):
        for group in graphs.partition(features, rng.permutation(np.asarray(split["train"])), budget):
            g, inputs, fp_b, yb = batch(group)
            enc_params, head_params, rest, opt_state, loss = train_step(
                enc_params, head_params, rest, opt_state, g, inputs, fp_b, yb)
        state = (enc_params, head_params, rest)
        valid = head_lib.score(y[split["valid"]], predict(state, split["valid"]), task_type)
        history.append({"epoch": epoch, "train_loss": float(loss), **{f"valid_{k}": v for k, v in valid.items()}})
        if log:
            log(history[-1])
        if head_lib.better(task_type, valid, best):
            best, best_epoch, waited, best_state = valid, epoch, 0, jax.device_get(state)
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    test_pred = predict(best_state, split["test"])
    enc_params, head_params, rest = best_state
    model = nnx.merge(graphdef, head_params, enc_params, rest)
    model.eval()
    return {"model": model, "best_epoch": best_epoch, "valid": best,
            "test": head_lib.score(y[split["test"]], test_pred, task_type), "test_pred": test_pred, "history": history}
