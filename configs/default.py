"""Default chmr_jax configuration: every section the commands read, with the reachable real corpus.

Usage: `get_config()` or `get_config('name')` with a named variant (config_flags: `configs/default.py:name`):
  default   the reachable real corpus (L1000 + Cell Painting files of ../shared/data plus the 9
            benchmarks' structures), the paper's model and loss weights, batch 256 (a CPU-sized batch)
  rdkit3d   also the 3D modality from ETKDG conformers + RDKit 3D descriptors
  paper     the paper's six-modality corpus layout (set corpus.path to pretrain.zip's raw/);
            configs/paper.py adds the paper's optimisation schedule on top of it
Values cite their source: "spec §n" is ../shared/docs/CHMR_SPEC.md, "release" the authors' code.
"""
import ml_collections

from chmr_jax import config_util

VARIANTS = ("default", "rdkit3d", "paper")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_util.parse_variant(arg, VARIANTS)
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
    # (a generated corpus in the paper's layout). saved: a directory written by
    # `chmr-jax prepare --corpus ...` to use instead of building (empty: build, cached in cache_dir).
    config.corpus = ml_collections.ConfigDict(dict(
        kind="reachable", path="", saved="", join="inchikey14", aggregate="median", max_nan_fraction=0.5,
        # exclude: '' | 'all' | a comma list of benchmarks and/or CSV files of SMILES whose molecules are
        # left out of the corpus, structures and profiles, by join key (include_benchmarks otherwise adds
        # every benchmark molecule, test ones included, structures and profiles, no labels: a transductive
        # setting). A benchmark contributes its test split under exclude_split (the split it will be
        # evaluated with, finetune's config.split: '' = each benchmark's default protocol, or e.g.
        # 'key_scaffold'); a CSV every row of its exclude_smiles_column. exclude_test_of: the older name
        # (benchmarks only), read the same way.
        dose="all", include_benchmarks=True, exclude="", exclude_split="", exclude_smiles_column="smiles",
        exclude_test_of="",
        synthetic_molecules=400, synthetic_seed=0))
    config.corpus.modalities = ml_collections.ConfigDict(dict(
        expression="l1000_consensus+l1000_plate", cell="cellpainting_plate"))
    # Expected width of each modality: checked against the data at start (a wrong dim is an error).
    config.corpus.dims = ml_collections.ConfigDict(dict(expression=978, cell=454))
    # Synthetic corpus only: {source: width} overrides of the paper's widths (empty: the paper's).
    config.corpus.synthetic_dims = ml_collections.ConfigDict()

    if arg == "paper":
        config.corpus.kind = "paper"
        config.corpus.include_benchmarks = False
        config.corpus.modalities = ml_collections.ConfigDict(dict(
            cell="CP-Bray,CP-JUMP", gene="G-CRISPR,G-ORF", expression="GE"))
        config.corpus.dims = ml_collections.ConfigDict(dict(cell=2749, gene=1973, expression=978))  # spec §1

    # Padded graph batches: budgets from dataset statistics, rounded to multiples of pad_multiple.
    # 256 molecules per step keeps a 2-core CPU step near a second; the paper uses 3072 (paper.py).
    # device_blocks: on n > 1 devices the batch is n blocks, one per device, each with its own padding and
    # block-local indices, so message passing never reads another device's nodes (graphs.py).
    config.batch = ml_collections.ConfigDict(dict(batch_size=256, pad_multiple=64, n_sigma=4.0, device_blocks=True))

    # Pretraining inputs (spec §2, §4, §6).
    config.pretrain_data = ml_collections.ConfigDict(dict(
        knn_k=10,                    # spec §2: top-10 Tanimoto neighbours
        propagation_steps=5,         # spec §2: T = 5
        imputation="propagate",      # spec §2: 'propagate' | 'mean' (release) | 'zero'
        sca_mask="observed_or_propagated",  # spec §4: | 'observed' | 'all' (release: imputed rows are negatives)
        vicreg_first_view="mean",    # release: VICReg(observed-or-mean view, propagated view); 'main' = main input
        # VICReg's second view on measured rows: propagation clamps them to the measurement (= the first
        # view), so 'held_out' estimates them from the other measured rows (one fold of holdout_folds
        # held out per propagation); 'propagated' = the clamped copy (before this fix: invariance 0 there).
        vicreg_second_view="held_out", holdout_folds=5,
        context_clusters=100, context_floor=0.8, context_sparsity=0.995,  # spec §6
        # Gene nodes of the context graph (spec §6): the L1000 landmark genes of this modality, linked
        # to molecules by each observed signature's top 1% of genes by |z| (weight |z| / the signature's
        # largest |z|, in (0, 1]); gene-gene edges from the corpus (paper layout G-G.csv.gz) and/or a
        # Hetionet file (sif) given here.
        gene_modality="expression", gene_quantile=0.99, gene_network="",
        # Which cellular modalities pretraining uses: 'all', 'none' (structure only: no SCA, no profile
        # nodes) or a comma list.
        modalities="all",
        # The kNN and propagations run sharded over every device (propagation.py). Layout only (results
        # do not depend on it): query / database rows per tile, the database 'replicated' | 'sharded' (a
        # ring over the devices) | 'auto' (sharded once its packed bits pass a quarter of a device's
        # memory), feature columns per propagation call (0: 2048 on CPU, 256 on accelerators).
        knn_block=1024, knn_db_block=16384, knn_database="auto", propagation_chunk=0,
        # > 0: per-tile top-k by jax.lax.approx_max_k at this recall target (TPU: approximate, its recall
        # in benchmarks/RESULTS.md; CPU / GPU lower it exactly); 0: exact top-k (spec §2).
        knn_approx_recall=0.0))

    # Model (spec §1, §3, §5, §6). molecular: the always-present modalities; 'geometry' needs
    # config.geometry != 'none'.
    config.model = ml_collections.ConfigDict(dict(
        molecular="fingerprint,graph", latent=300, gnn_layers=5, gnn_width=300, gnn_dropout=0.5,
        residual=True, max_norm=0.0,   # max_norm > 0: the release's max-norm embedding option
        decoder_dropout=0.3, tree_depth=6,
        dtype="float32",             # 'bfloat16': activations / matmuls in bf16 (params, BN stats, losses float32)
        remat=False))                # recompute each GIN layer in the backward pass (less memory, ~1/3 more GIN FLOPs)

    # Objective (spec §4, §5, §7). lambda_sca = lambda1, lambda_vq = lambda2: the paper's best
    # setting (lambda1 = 10, lambda2 in {0.1, 1}); the release's argparse says 0.1 / 0.01.
    config.objective = ml_collections.ConfigDict(dict(
        lambda_sca=10.0, lambda_vq=1.0, tau=0.2, symmetric=False,
        infonce_impl="chunked",      # 'dense' | 'chunked' | 'ring' (across the devices of the mesh)
        # infonce_block: anchor rows per logits block (chunked) and per tile within a device (ring), so
        # no device holds more than infonce_block x N (chunked) or x N / devices (ring) logits.
        infonce_block=1024, vicreg_weights=(1.0, 1.0, 1.0), vq_eta=1.0, vq_mu=1.0, vq_reverse=True,
        walk_length=4, recon_kind="bce",
        lambda_cpr=1.0,              # weight of L_CPR (0: the "w/o CPR" ablation; not computed)
        cpr_source="modality",       # release: cellular targets decoded from p_c, molecule target from the anchor
        collapse_stats=True,         # log effective rank / std of the molecular projections (collapse.py)
        collapse_every=1))           # ... every k-th step only (a divisor of train.log_every_steps; 0: the logged steps)

    # Optimiser (spec §7): Adam + coupled L2 1e-8, lr 1e-4, the release's cosine lr*cos(7pi/16 t/T).
    config.optim = ml_collections.ConfigDict(dict(lr=1e-4, weight_decay=1e-8, schedule="release_cosine"))

    # The training loop. steps > 0 overrides epochs (a short run); every count is in optimiser steps.
    config.train = ml_collections.ConfigDict(dict(
        epochs=50,                   # spec §7 (newer upstream README)
        steps=0, seed=0,
        log_every_steps=10,          # metrics to metrics.jsonl / TensorBoard every n steps
        checkpoint_every_steps=200, keep_checkpoints=3,
        snapshot_epochs="",          # e.g. "1,3,10": also keep the checkpoint at the end of these epochs (snapshots/)
        max_skipped=20,              # stop when this many updates were skipped for NaN/inf
        devices=0,                   # 0 = every device (every process's devices with distributed)
        distributed=False,           # jax.distributed.initialize() first (multi-host: TPU pods, clusters)
        # jax.distributed.initialize's arguments; unset ('' / 0 / -1) = its auto-detection (SLURM, TPU pods,
        # JAX_COORDINATOR_* variables). A coordinator address implies distributed.
        coordinator_address="", num_processes=0, process_id=-1,
        heartbeat_timeout_s=100,     # multi-process: a peer silent this long ends the job with an error
        profile_steps="",            # e.g. "5:8": a jax.profiler trace of steps 5, 6, 7 (process 0) in workdir/profile/
        compilation_cache_dir="",    # JAX's persistent compilation cache ('' = off): a restart skips XLA compilation
        # Checkpoint commits: 'auto' = Orbax's commit_success.txt files (no directory renames) on gs:// and on
        # a gcsfuse-mounted workdir (found in /proc/mounts), atomic renames elsewhere; or 'rename' / 'commit_file'.
        checkpoint_atomicity="auto",
        progress="auto"))            # 'auto' (a bar on a terminal, log lines otherwise) | 'bar' | 'log'
    return config
