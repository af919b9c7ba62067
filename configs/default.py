"""Default chmr_jax configuration. Later stages (pretraining, fine-tuning) extend this file.

Usage: `get_config()` or `get_config('name')` with a named variant:
  default   featurization as in the paper (Morgan r2/1024 + MACCS, r4/1024 target), no 3D
  rdkit3d   also the 3D modality from ETKDG conformers + RDKit 3D descriptors
"""
import ml_collections

VARIANTS = ("default", "rdkit3d")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in VARIANTS:
        raise ValueError(f"unknown config variant {arg!r}; choose from {VARIANTS}")
    config = ml_collections.ConfigDict()
    config.data_dir = ""   # empty: --data_dir flag > $CHMR_DATA_DIR > ~/.cache/chmr_jax
    config.cache_dir = ""  # empty: $CHMR_CACHE_DIR > ~/.cache/chmr_jax/features
    config.workers = 0     # featurization processes; 0 = all cores

    # Featurization (spec §1, §6). One Morgan radius for pretraining and fine-tuning (spec §8).
    config.featurize = ml_collections.ConfigDict(dict(
        morgan_radius=2, morgan_size=1024, target_radius=4, target_size=1024, max_atoms=512))
    # Geometry (3D) modality source: 'none', 'rdkit3d', or a path to a per-molecule matrix
    # (.npz with 'keys' and 'data', or CSV key,values...) such as Uni-Mol embeddings.
    config.geometry = "rdkit3d" if arg == "rdkit3d" else "none"
    config.geometry_seed = 0xF00D

    # Padded graph batches: budgets from dataset statistics, rounded to multiples of pad_multiple.
    config.batch = ml_collections.ConfigDict(dict(batch_size=256, pad_multiple=64, n_sigma=4.0))
    return config
