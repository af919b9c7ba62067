"""Stage 1, data: where files live, the benchmark and corpus loaders, RDKit 2D and 3D features,
splits, profile importers, a synthetic corpus and fixed-budget graph batches (paths, registry,
featurize, geometry, datasets, splits, corpus, profiles, synthetic, prepare, graphs)."""
