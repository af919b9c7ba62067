"""chmr_jax: CHMR molecular representation learning in JAX/Flax.

Modules, one concept each: `paths` (data and cache directories), `registry` (datasets, their
files and public sources), `featurize` (RDKit featurization with a disk cache), `datasets`
(benchmark loaders), `splits` (scaffold and random splits), `graphs` (padded graph batches).
"""

__version__ = "0.1.0"
