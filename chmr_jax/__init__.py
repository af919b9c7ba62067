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
    arrays = chmr_jax.embed_smiles("runs/a", ["CCO", "c1ccccc1O"])  # SMILES -> arrays, no padding rows
"""

__version__ = "0.1.0"


def load_encoder(workdir, step: int | None = None):
    """`export.load_encoder`: the encoder of a pretraining (or converted) workdir; see chmr_jax.downstream.export."""
    from chmr_jax.downstream import export
    return export.load_encoder(workdir, step)


def load_embeddings(out, fmt: str | None = None):
    """`export.load_embeddings`: (arrays, manifest) from a `chmr-jax embed` output directory; arrays are
    lazy (`export.ShardedArray`: memory-mapped shards, np.asarray reads one whole)."""
    from chmr_jax.downstream import export
    return export.load_embeddings(out, fmt)


def embed_smiles(encoder_or_workdir, smiles, ids=None, batch_size: int = 256, step: int | None = None,
                 return_rejects: bool = False):
    """Embeds `smiles` [n] in one call with an encoder (`load_encoder`'s) or a workdir's newest (or `step`)
    checkpoint. Returns a dict of numpy arrays over the m accepted molecules, in input order and without
    padding rows: 'id' [m] (`ids`, default 'row<i>' with i the index in `smiles`), 'smiles', 'key'
    (14-char InChIKey block), the encoder outputs 'fingerprint', 'graph', 'anchor' [m, D], 'tree_codes',
    'tree_paths' [m, H], 'tree_vectors' [m, H, D]: the arrays `chmr-jax embed` writes.

    Rejected SMILES (unparsable, too many atoms) are reported in one warning, or returned with
    return_rejects=True as (arrays, rejects), rejects = [{'row', 'id', 'smiles', 'reason'}]."""
    import warnings

    from chmr_jax.downstream import export
    encoder = encoder_or_workdir if isinstance(encoder_or_workdir, export.Encoder) else \
        export.load_encoder(encoder_or_workdir, step)
    smiles = [smiles] if isinstance(smiles, str) else list(smiles)
    arrays, rejects = export.embed_molecules(encoder, smiles, ids, batch_size, show_progress=False)
    if return_rejects:
        return arrays, rejects
    if rejects:
        shown = "; ".join(f"row {r['row']} {r['smiles']!r}: {r['reason']}" for r in rejects[:5])
        warnings.warn(f"embed_smiles: {len(rejects)} of {len(smiles)} SMILES rejected (left out of the arrays): "
                      f"{shown}{' ...' if len(rejects) > 5 else ''}", stacklevel=2)
    return arrays
