"""Embeddings out of a pretrained encoder, for downstream JAX pipelines (and anything reading Parquet).

  load_encoder(workdir)      -> Encoder: `apply(params, batch)` is a pure, jittable function of the
                                encoder state and one padded batch; `batches(features)` makes batches
  embed_molecules(enc, smiles) -> {name: array} per accepted molecule, plus the rejected rows (in memory)
  export(enc, input, out)    -> the streaming `chmr-jax embed`: sharded outputs, resumable, every device
  load_embeddings(out)       -> (arrays, manifest): lazy arrays over the shards, in input order

Arrays per molecule (D = latent width, H = tree depth):
  <modality> [D] per molecular modality (e.g. fingerprint, graph), anchor [D] (their sum, spec Eq. 2),
  tree_codes [H] int32 heap indices of the anchor's Tree-VQ path (level h code in [2^h, 2^(h+1))),
  tree_paths [H] int32 the same path as within-level indices (0 .. 2^h - 1),
  tree_vectors [H, D] the straight-through vectors (forward value: the chosen unit code vectors).
Only SMILES are needed: the cellular modalities are training-time signals, not inference inputs.

Streaming export (`export`): a first pass counts the input rows and hashes the file, which fixes the
shard plan (shard i = input rows [i * S, (i + 1) * S), S = shard_size) before anything is embedded.
Process p of N embeds shards i with i % N == p: featurized in the worker pool one shard ahead of the
devices, packed with fixed padding budgets (one compilation), run jitted over a mesh of the local
devices (one graph block per device, as pretraining), and written per shard atomically:
  numpy/<array>-<i>.npy, parquet/part-<i>.parquet, tfds/chmr_embeddings/1.0.0/...array_record-<i>-of-<N>,
then shards/<i>.json (rows, molecules, rejects, sha256 of every file). A rerun skips shards whose record
and digests check out. plan.json pins the input (sha256, rows), the encoder (checkpoint step, sha256 of
the parameters), the arguments and the budget: a rerun with any of them changed is refused. Process 0
writes the TFDS dataset_info and manifest.json last; memory does not grow with the number of rows.
Cloud storage: a gs:// --out is written into a fresh local folder that starts as a copy of the bucket
folder (paths.staged: a killed run's finished shards come back from there) and every finished shard,
then its record, is uploaded at once (paths.push); process 0 reads the other hosts' records from the
bucket and uploads the metadata and manifest last. The local folder is deleted when embed ends. A gs:// --input is
read from its verified local copy (paths.local_file).
"""

# One job per module (issue 34): layout.py (formats, file names), encoder.py (the pretrained encoder),
# device.py (budgets, the device runner, embed_molecules), inputs.py (streaming readers, featurization one
# shard ahead), writers.py (NumPy / Parquet / TFDS), plan.py (the shard plan, resume, the run: export),
# reader.py (load_embeddings). Every name of the former module is importable from here.
from chmr_jax.downstream.export.layout import FORMATS, ALIASES, TFDS_NAME, TFDS_DIR, STRINGS, BUDGET_SAMPLE, PLAN_VERSION, FILES  # noqa: F401
from chmr_jax.downstream.export.encoder import Encoder, _slot_inputs, load_encoder, encoder_of, embed_features  # noqa: F401
from chmr_jax.downstream.export.device import embed_budget, DeviceRunner, _split_oversized, embed_molecules, _embed_block  # noqa: F401
from chmr_jax.downstream.export.inputs import _kind, _column, iter_molecules, read_molecules, scan_input, _Featurizer, _shards_of  # noqa: F401
from chmr_jax.downstream.export.writers import _sha256, _tmp, _shard_files, _write_numpy, _parquet_table, _write_parquet, _tfds_features, _write_tfds, _write_tfds_metadata  # noqa: F401
from chmr_jax.downstream.export.plan import _KILL_AFTER, _record_path, _finished, _barrier, _check_plan, export, _export  # noqa: F401
from chmr_jax.downstream.export.reader import ShardedArray, _LastShard, load_embeddings  # noqa: F401
