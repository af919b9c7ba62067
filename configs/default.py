"""Default chmr_jax configuration. Later stages (pretraining, fine-tuning) extend this file.

Usage: `get_config()` or `get_config('name')` with a named variant:
  default   featurization as in the paper (Morgan r2/1024 + MACCS, r4/1024 target), no 3D
  rdkit3d   also the 3D modality from ETKDG conformers + RDKit 3D descriptors
  paper     the paper's six-modality corpus layout (set corpus.path to pretrain.zip's raw/)
"""
import ml_collections

VARIANTS = ("default", "rdkit3d", "paper")


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

    # Pretraining corpus (issue: corpus). Modalities map a name to sources: ',' concatenates the
    # sources' columns, '+' stacks rows of sources with the same features (aligned by name).
    # kind: 'reachable' (the real files offline: L1000 + Cell Painting, plus the 9 benchmarks'
    # structures), 'paper' (InfoAlign/CHMR raw_data/pretrain/raw at corpus.path), or 'synthetic'
    # (a generated corpus in the paper's layout).
    config.corpus = ml_collections.ConfigDict(dict(
        kind="reachable", path="", join="inchikey14", aggregate="median", max_nan_fraction=0.5,
        dose="all", include_benchmarks=True, exclude_test_of="",
        synthetic_molecules=400, synthetic_seed=0))
    config.corpus.modalities = ml_collections.ConfigDict(dict(
        expression="l1000_consensus+l1000_plate", cell="cellpainting_plate"))
    config.corpus.dims = ml_collections.ConfigDict(dict(expression=978, cell=454))

    if arg == "paper":
        config.corpus.kind = "paper"
        config.corpus.include_benchmarks = False
        config.corpus.modalities = ml_collections.ConfigDict(dict(
            cell="CP-Bray,CP-JUMP", gene="G-CRISPR,G-ORF", expression="GE"))
        config.corpus.dims = ml_collections.ConfigDict(dict(cell=2749, gene=1973, expression=978))

    # Padded graph batches: budgets from dataset statistics, rounded to multiples of pad_multiple.
    config.batch = ml_collections.ConfigDict(dict(batch_size=256, pad_multiple=64, n_sigma=4.0))
    return config
