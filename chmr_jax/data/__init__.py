"""Stage 1, data: where files live, the benchmark and corpus loaders, RDKit features, splits, profile
importers and fixed-budget graph batches (paths, registry, featurize, datasets, splits, corpus,
profiles, prepare, graphs)."""
