"""Tiny configuration for tests and smoke runs: a generated 96-molecule corpus in the paper's
layout with narrow modalities and a small model; pretraining runs in seconds on a laptop CPU."""
import ml_collections

from chmr_jax import config_util


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_util.parse_arg(arg)   # takes no argument: anything given is an error
    config = config_util.load_sibling(__file__, "default.py", "paper")
    config.workers = 1
    config.featurize.morgan_size = 256
    config.featurize.target_size = 256
    config.featurize.max_atoms = 64
    config.corpus.kind = "synthetic"
    config.corpus.synthetic_molecules = 96
    config.corpus.synthetic_dims = ml_collections.ConfigDict(
        {"CP-Bray": 12, "CP-JUMP": 8, "G-CRISPR": 6, "G-ORF": 4, "GE": 10})
    config.corpus.dims = ml_collections.ConfigDict(dict(cell=20, gene=10, expression=10))
    config.batch.batch_size = 16
    config.batch.pad_multiple = 32
    config.pretrain_data.knn_k = 5
    config.pretrain_data.context_clusters = 3
    config.pretrain_data.context_floor = 0.3
    config.model.latent = 16
    config.model.gnn_layers = 2
    config.model.gnn_width = 32
    config.model.tree_depth = 3
    config.objective.infonce_block = 8
    config.train.epochs = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_steps = 4
    config.train.max_skipped = 5
    return config
