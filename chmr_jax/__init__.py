"""chmr_jax: CHMR molecular representation learning in JAX/Flax.

The package follows the pipeline, one subpackage per stage and one module per job:
`data` (paths, registry, featurize, geometry, datasets, splits, corpus, profiles, synthetic, prepare,
graphs) -> `mechanisms` (propagation, context, losses, tree_vq, model, objective, collapse) -> `training`
(pretrain_data, train, checkpoint, pretrain, chores, metric_writers, utilisation) -> `downstream`
(finetune, metrics, stress, planted, export, convert, report); `cli`, `config_util` and
`progress` (used by every stage) sit on top.
The downstream API:

    apply, params = chmr_jax.load_encoder("runs/a")          # pure, jittable (params, batch) -> outputs
    arrays, manifest = chmr_jax.load_embeddings("runs/emb")  # what `chmr-jax embed` wrote
"""

__version__ = "0.1.0"


def load_encoder(workdir, step: int | None = None):
    """`export.load_encoder`: the encoder of a pretraining (or converted) workdir; see chmr_jax.downstream.export."""
    from chmr_jax.downstream import export
    return export.load_encoder(workdir, step)


def load_embeddings(out, fmt: str = "npz"):
    """`export.load_embeddings`: (arrays, manifest) from a `chmr-jax embed` output directory."""
    from chmr_jax.downstream import export
    return export.load_embeddings(out, fmt)
