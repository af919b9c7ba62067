"""chmr_jax: CHMR molecular representation learning in JAX/Flax.

Modules, one concept each: `paths` (data and cache directories), `registry` (datasets, their
files and public sources), `featurize` (RDKit featurization with a disk cache), `datasets`
(benchmark loaders), `splits` (scaffold and random splits), `graphs` (padded graph batches),
`propagation`, `tree_vq`, `losses`, `model`, `train`, `pretrain`, `finetune`, `export`, `convert`,
`report`. The downstream API:

    apply, params = chmr_jax.load_encoder("runs/a")          # pure, jittable (params, batch) -> outputs
    arrays, manifest = chmr_jax.load_embeddings("runs/emb")  # what `chmr-jax embed` wrote
"""

__version__ = "0.1.0"


def load_encoder(workdir, step: int | None = None):
    """`export.load_encoder`: the encoder of a pretraining (or converted) workdir; see chmr_jax.export."""
    from chmr_jax import export
    return export.load_encoder(workdir, step)


def load_embeddings(out, fmt: str = "npz"):
    """`export.load_embeddings`: (arrays, manifest) from a `chmr-jax embed` output directory."""
    from chmr_jax import export
    return export.load_embeddings(out, fmt)
