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
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from chmr_jax.data import datasets, featurize, files, graphs, paths
from chmr_jax.mechanisms import tree_vq
from chmr_jax import progress as progress_lib

FORMATS = ("numpy", "parquet", "tfds")
ALIASES = {"npz": "numpy"}   # the format's name before outputs were sharded
TFDS_NAME = "chmr_embeddings"
TFDS_DIR = f"tfds/{TFDS_NAME}/1.0.0"
STRINGS = ("id", "smiles", "key")
BUDGET_SAMPLE = 2048          # input rows whose molecules size the padding budget
PLAN_VERSION = 1
# Tests only: SIGKILL this process once it has written this many shards (a crash at a shard boundary).
_KILL_AFTER = int(os.environ.get("CHMR_EMBED_KILL_AFTER_SHARDS", "0"))


@dataclasses.dataclass
class Encoder:
    """A pretrained encoder as a pure function plus its state.

    apply(params, batch) -> {modality: [G, D], 'anchor': [G, D], 'tree_codes': [G, H] int32,
    'tree_paths': [G, H] int32, 'tree_vectors': [G, H, D]}; rows whose batch['graph'].graph_mask
    is False are padding. params holds the parameters (nnx.Param state); the batch-norm running
    statistics are baked into apply. `apply, params = load_encoder(DIR)` unpacks the two.
    """
    apply: Callable
    params: nnx.State
    settings: featurize.FeaturizerSettings
    mol_names: list
    config: dict
    step: int
    workdir: str

    def __iter__(self):
        return iter((self.apply, self.params))

    def batches(self, features: featurize.MoleculeFeatures, batch_size: int = 256,
                pad_multiple: int = 64) -> Iterator[tuple[np.ndarray, dict]]:
        """(molecule indices, batch) over `features` in order, every batch with the same shapes
        (one compilation of a jitted apply)."""
        budget = graphs.estimate_budget(features.n_atoms, features.n_edges, batch_size, pad_multiple)
        for group in graphs.partition(features, np.arange(len(features)), budget):
            g = graphs.pack(features, group, budget)
            yield group, {"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}}

    def params_digest(self) -> str:
        """sha256 of every parameter (tree order, bytes): what identifies the weights of an export."""
        h = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            h.update(jax.tree_util.keystr(path).encode())
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        return h.hexdigest()


def _slot_inputs(features, g: graphs.GraphBatch) -> np.ndarray:
    """float32 [G, F] fingerprint input per graph slot (zeros for padding slots), via the batch's index."""
    idx = np.asarray(g.index)
    real = idx >= 0
    fp = features.fingerprints(idx[real])
    x = np.zeros((len(idx), fp.shape[1]), np.float32)
    x[real] = fp
    return x


def load_encoder(workdir, step: int | None = None) -> Encoder:
    """The encoder of a `chmr-jax pretrain` (or `chmr-jax convert`) workdir, in eval mode."""
    from chmr_jax.training import pretrain

    return encoder_of(*pretrain.load_pretrained(workdir, step), workdir)


def encoder_of(model, config, meta, workdir) -> Encoder:
    """The Encoder of an already restored model (eval mode), e.g. from `pretrain.load_pretrained`."""
    if "geometry" in model.mol_names:
        raise ValueError(f"{workdir}: this encoder takes the geometry modality as input; embed needs SMILES-only "
                         "encoders: `chmr-jax convert --drop_geometry` (a converted release) or pretrain with "
                         "--config.model.molecular=fingerprint,graph")
    # params: the trainable parameters only (so jax.grad over them just works); the batch-norm
    # running statistics (eval mode) are constants of `apply`.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, batch):
        m = nnx.merge(graphdef, params, rest)
        out = m.encode(batch["graph"], batch["inputs"])
        vq = tree_vq.tree_vq(m.codebook[...], out["anchor"], batch["graph"].graph_mask)
        return {**{n: out[n] for n in m.mol_names}, "anchor": out["anchor"], "tree_codes": vq.codes,
                "tree_paths": tree_vq.paths(vq.codes).astype(jnp.int32), "tree_vectors": vq.quantized}

    return Encoder(apply=apply, params=params, settings=featurize.FeaturizerSettings.from_config(config.featurize),
                   mol_names=list(model.mol_names), config=config.to_dict(), step=int(meta["step"]),
                   workdir=str(workdir))


def embed_features(encoder: Encoder, features: featurize.MoleculeFeatures, batch_size: int = 256,
                   show_progress: bool = True) -> dict:
    """Every output of `encoder.apply` for each molecule of `features` (numpy, in order), on one device
    with a budget from all of `features` (the simple in-memory path; `export` streams)."""
    apply = jax.jit(encoder.apply)
    out: dict = {}
    with progress_lib.Progress(len(features), "embed", unit="mol", enabled=show_progress) as bar:
        for group, batch in encoder.batches(features, batch_size):
            res = jax.device_get(apply(encoder.params, batch))
            for name, value in res.items():
                if name not in out:
                    out[name] = np.zeros((len(features),) + value.shape[1:], value.dtype)
                out[name][group] = value[:len(group)]
            bar.update(len(group))
    return out


# ---- the device side: fixed budgets, a mesh of the local devices ---------------------------------

def embed_budget(encoder: Encoder, sample: featurize.MoleculeFeatures, batch_size: int,
                 n_devices: int) -> graphs.GraphBudget:
    """The padding budget of `batch_size` molecules (rounded up to the device count) in one graph block
    per device, sized from `sample`'s molecules with the pretraining config's pad_multiple / n_sigma."""
    cfg = encoder.config.get("batch", {})
    if len(sample) == 0:
        raise ValueError("none of the molecules sampled to size the batch budget could be featurized "
                         f"(the first {BUDGET_SAMPLE} rows); check the SMILES column")
    per_block = -(-batch_size // n_devices)
    pad = int(cfg.get("pad_multiple", 64))
    budget = graphs.estimate_budget(sample.n_atoms, sample.n_edges, per_block * n_devices, pad,
                                    float(cfg.get("n_sigma", 4.0)), graph_multiple=n_devices, blocks=n_devices)
    # The sample is the input's first rows only: a block must still hold the largest molecule the featurizer
    # accepts (max_atoms, at a mean degree of 4), so no later molecule is rejected for its size.
    one, largest = budget.block(), encoder.settings.max_atoms
    n_node = max(one.n_node, graphs.round_up(largest + 1, pad))
    n_edge = max(one.n_edge, graphs.round_up(4 * largest, pad))
    return dataclasses.replace(budget, n_node=n_node * budget.blocks, n_edge=n_edge * budget.blocks)


class DeviceRunner:
    """encoder.apply jitted over a 1-D mesh of `devices` (default: this process's local devices): the
    batch's leading axes sharded one graph block per device, the parameters replicated."""

    def __init__(self, encoder: Encoder, budget: graphs.GraphBudget, devices=None):
        devices = list(devices if devices is not None else jax.local_devices())
        if budget.blocks != len(devices):
            raise ValueError(f"budget {budget} has {budget.blocks} blocks for {len(devices)} devices")
        self.mesh = Mesh(np.array(devices), ("data",))
        self.budget = budget
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.params = jax.device_put(encoder.params, NamedSharding(self.mesh, P()))
        self.apply = jax.jit(encoder.apply)
        self.encoder = encoder
        self.model_seconds = 0.0

    def out_spec(self, features) -> dict:
        """{name: jax.ShapeDtypeStruct [G, ...]} of apply's outputs (no computation)."""
        g = graphs.pack(features, np.arange(min(1, len(features))), self.budget)
        batch = {"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}}
        return jax.eval_shape(self.apply, self.params, batch)

    def __call__(self, features: featurize.MoleculeFeatures, spec: dict) -> dict:
        """{name: [len(features), ...]} for every molecule of `features`, in order. One batch is in
        flight while the next is packed (asynchronous dispatch)."""
        out = {k: np.zeros((len(features),) + v.shape[1:], v.dtype) for k, v in spec.items()}
        pending = None

        def collect(item):
            index, res = item
            t0 = time.perf_counter()
            res = jax.device_get(res)
            self.model_seconds += time.perf_counter() - t0
            real = index >= 0
            for k, v in res.items():
                out[k][index[real]] = v[real]

        for group in graphs.partition(features, np.arange(len(features)), self.budget):
            g = graphs.pack(features, group, self.budget)
            batch = jax.device_put({"graph": g, "inputs": {"fingerprint": _slot_inputs(features, g)}},
                                   self.batch_sharding)
            t0 = time.perf_counter()
            res = self.apply(self.params, batch)
            self.model_seconds += time.perf_counter() - t0
            if pending is not None:
                collect(pending)
            pending = (np.asarray(g.index), res)
        if pending is not None:
            collect(pending)
        return out


def _split_oversized(features, budget: graphs.GraphBudget):
    """(indices that fit one graph block, [(index, reason)] for those that do not)."""
    one = budget.block()
    big = (features.n_atoms > one.n_node - 1) | (features.n_edges > one.n_edge)
    why = (f"larger than one batch block ({one.n_node - 1} atoms / {one.n_edge} edges); raise --batch_size "
           "or lower the featurizer's max_atoms")
    return np.nonzero(~big)[0], [(int(i), why) for i in np.nonzero(big)[0]]


def embed_molecules(encoder: Encoder, smiles: Sequence[str], ids: Sequence[str] | None = None,
                    batch_size: int = 256, cache_dir=None, show_progress: bool = True) -> tuple[dict, list]:
    """(arrays, rejects): arrays has 'id', 'smiles', 'key' and every apply output for the accepted
    molecules in input order; rejects lists {'row', 'id', 'smiles', 'reason'} for the others.
    In memory, with the budget and device layout of `export` (so the same values)."""
    ids = list(ids) if ids is not None else [f"row{i}" for i in range(len(smiles))]
    if len(ids) != len(smiles):
        raise ValueError(f"{len(ids)} ids for {len(smiles)} SMILES")
    features = featurize.featurize_smiles(smiles, encoder.settings, cache_dir, "embed",
                                          show_progress=show_progress, verbose=False)
    if len(features) == 0:
        rejects = [{"row": int(r), "id": ids[r], "smiles": s, "reason": why} for r, s, why in features.rejects]
        raise ValueError(f"none of the {len(smiles)} molecules could be featurized; first rejects: {rejects[:3]}")
    sample = features.subset(np.nonzero(features.rows < BUDGET_SAMPLE)[0])
    runner = DeviceRunner(encoder, embed_budget(encoder, sample, batch_size, len(jax.local_devices())))
    arrays, rejects = _embed_block(runner, runner.out_spec(features), features, ids, 0)
    return arrays, rejects


def _embed_block(runner: DeviceRunner, spec: dict, features, ids: Sequence[str], row0: int):
    """(arrays, rejects) of one featurized block of input rows (rows relative to the block, ids per row,
    row0 the block's first input row)."""
    keep, oversized = _split_oversized(features, runner.budget)
    rejected = [(int(r), s, why) for r, s, why in features.rejects]
    rejected += [(int(features.rows[i]), str(features.smiles[i]), why) for i, why in oversized]
    rejects = [{"row": row0 + r, "id": ids[r], "smiles": s, "reason": why} for r, s, why in sorted(rejected)]
    if len(keep) < len(features):
        features = features.subset(keep)
    outputs = runner(features, spec)
    arrays = {"id": np.array([ids[r] for r in features.rows], dtype=str).reshape(-1),
              "smiles": np.asarray(features.smiles, str).reshape(-1),
              "key": np.asarray(features.keys, str).reshape(-1), **outputs}
    return arrays, rejects


# ---- input: streaming readers ---------------------------------------------------------------------

def _kind(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for kind in ("parquet", "smi", "csv"):
        if name.endswith("." + kind):
            return kind
    if name.endswith(".tsv") or name.endswith(".txt"):
        raise ValueError(f"{path}: unsupported input type; use .csv[.gz] (comma separated, header row), "
                         ".smi[.gz] or .parquet")
    return "csv"


def _column(path, header: list[str], name: str, flag: str, case_insensitive: bool) -> int:
    names = [h.lower() for h in header] if case_insensitive else list(header)
    key = name.lower() if case_insensitive else name
    if key not in names:
        raise ValueError(f"{path}: no {'SMILES' if flag == '--smiles_column' else 'id'} column {name!r}; "
                         f"columns are {header}. Pass {flag}")
    return names.index(key)


def iter_molecules(path, smiles_column: str = "smiles", id_column: str | None = None) -> Iterator[tuple[str, str]]:
    """(smiles, id) per input row, streamed: a .csv[.gz] (SMILES column by name, case-insensitive; ids
    from id_column or 'row<i>', i the 0-based data row), a .smi[.gz] (one 'SMILES [id]' per line,
    whitespace separated, '#' comments; default id 'line<n>') or a .parquet file (read in batches)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file")
    kind = _kind(path)
    if kind == "smi":
        with paths.open_text(path) as fh:
            for n, line in enumerate(fh, start=1):
                parts = line.split()
                if parts and not parts[0].startswith("#"):
                    yield parts[0], (parts[1] if len(parts) > 1 else f"line{n}")
        return
    if kind == "parquet":
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        header = pf.schema_arrow.names
        s = header[_column(path, header, smiles_column, "--smiles_column", True)]
        i = header[_column(path, header, id_column, "--id_column", False)] if id_column else None
        row = 0
        for batch in pf.iter_batches(batch_size=8192, columns=[s] + ([i] if i and i != s else [])):
            smi = batch.column(s).to_pylist()
            ident = batch.column(i).to_pylist() if i else [f"row{row + k}" for k in range(len(smi))]
            for a, b in zip(smi, ident):
                yield ("" if a is None else str(a)), str(b)
            row += len(smi)
        return
    with datasets.open_csv(path) as (header, reader):
        s = _column(path, header, smiles_column, "--smiles_column", True)
        i = _column(path, header, id_column, "--id_column", False) if id_column else None
        need = max(s, i if i is not None else 0) + 1
        for n, row in enumerate(reader):
            if len(row) < need:
                raise ValueError(f"{path}, line {reader.line_num}: {len(row)} fields, the "
                                 f"{header[need - 1]!r} column is field {need}; fix the row or quote fields "
                                 "that contain commas")
            yield row[s], (row[i] if i is not None else f"row{n}")


def read_molecules(path, smiles_column: str = "smiles", id_column: str | None = None) -> tuple[list, list]:
    """(smiles, ids) of a whole input file (iter_molecules, into lists)."""
    pairs = list(iter_molecules(path, smiles_column, id_column))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def scan_input(path, smiles_column: str = "smiles", id_column: str | None = None) -> dict:
    """The input's identity and size in one streaming pass: {'path', 'sha256' (of the file's bytes),
    'rows'} (the column checks happen here too, before anything is embedded)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if _kind(path) == "parquet":
        import pyarrow.parquet as pq
        next(iter_molecules(path, smiles_column, id_column), None)   # column checks
        rows = pq.ParquetFile(path).metadata.num_rows
    else:
        rows = sum(1 for _ in iter_molecules(path, smiles_column, id_column))
    return {"path": str(path.resolve()), "sha256": h.hexdigest(), "rows": rows}


# ---- featurization one shard ahead ---------------------------------------------------------------

class _Featurizer:
    """Featurizes blocks of SMILES in a worker pool (spawned: JAX is running) without waiting:
    submit() returns a handle whose get() assembles the MoleculeFeatures."""

    def __init__(self, settings, n_workers: int | None, chunk_size: int = 256):
        self.settings, self.chunk_size = settings, chunk_size
        n_workers = n_workers or os.cpu_count() or 1
        # (workers ignore SIGINT: Ctrl-C reaches the main process alone, which ends the pool; no worker tracebacks)
        self.pool = featurize._pool_context().Pool(n_workers, signal.signal, (signal.SIGINT, signal.SIG_IGN)) \
            if n_workers > 1 else None
        self.seconds = 0.0   # time spent waiting for results (or featurizing, without a pool)

    def submit(self, smiles: list[str]):
        tasks = [(s, smiles[s:s + self.chunk_size], self.settings) for s in range(0, len(smiles), self.chunk_size)]
        pending = self.pool.map_async(featurize._featurize_chunk, tasks) if self.pool else None

        def get():
            t0 = time.perf_counter()
            results = pending.get() if pending is not None else map(featurize._featurize_chunk, tasks)
            feats = featurize._assemble(smiles, [r for _, chunk in results for r in chunk], self.settings)
            self.seconds += time.perf_counter() - t0
            return feats
        return get

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def _shards_of(rows: Iterator[tuple[str, str]], shard_size: int, wanted: set) -> Iterator[tuple[int, list, list]]:
    """(shard, smiles, ids) of the wanted shards, in order; the others' rows are read past, not kept."""
    smiles, ids, shard = [], [], 0
    for k, (s, i) in enumerate(rows):
        if k // shard_size != shard:
            if shard in wanted:
                yield shard, smiles, ids
            smiles, ids, shard = [], [], k // shard_size
        if shard in wanted:
            smiles.append(s)
            ids.append(i)
    if shard in wanted and smiles:
        yield shard, smiles, ids


# ---- outputs: one set of files per shard ---------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + f".tmp{os.getpid()}")


def _shard_files(fmt: str, shard: int, n_shards: int, names: Sequence[str]) -> list[str]:
    if fmt == "numpy":
        return [f"numpy/{name}-{shard:05d}.npy" for name in names]
    if fmt == "parquet":
        return [f"parquet/part-{shard:05d}.parquet"]
    return [f"{TFDS_DIR}/{TFDS_NAME}-train.array_record-{shard:05d}-of-{n_shards:05d}"]


def _write_numpy(out: Path, rel: list[str], names: list[str], arrays: dict) -> None:
    for r, name in zip(rel, names):
        tmp = _tmp(out / r)
        with open(tmp, "wb") as fh:
            np.save(fh, arrays[name])
        os.replace(tmp, out / r)


def _parquet_table(arrays: dict):
    """One row per molecule; vectors as fixed-size lists (tree_vectors: H lists of D)."""
    import pyarrow as pa

    columns = {}
    for name, value in arrays.items():
        if value.ndim == 1:
            columns[name] = pa.array(value.tolist() if value.dtype.kind == "U" else value,
                                     type=pa.string() if value.dtype.kind == "U" else None)
            continue
        arr = pa.array(np.ascontiguousarray(value).reshape(-1))
        for width in reversed(value.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, width)
        columns[name] = arr
    return pa.table(columns)


def _write_parquet(out: Path, rel: list[str], arrays: dict) -> None:
    import pyarrow.parquet as pq
    tmp = _tmp(out / rel[0])
    pq.write_table(_parquet_table(arrays), tmp)
    os.replace(tmp, out / rel[0])


def _tfds_features(spec: dict):
    import tensorflow_datasets as tfds
    return tfds.features.FeaturesDict({
        name: tfds.features.Text() if name in STRINGS else
        tfds.features.Tensor(shape=tuple(s["shape"]), dtype=np.dtype(s["dtype"])) for name, s in spec.items()})


def _write_tfds(out: Path, rel: list[str], arrays: dict, features) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    tmp = _tmp(out / rel[0])
    writer = ArrayRecordWriter(str(tmp), "group_size:1")   # group size 1: fast random access
    for i in range(len(arrays["id"])):
        writer.write(features.serialize_example(features.encode_example({k: v[i] for k, v in arrays.items()})))
    writer.close()
    os.replace(tmp, out / rel[0])


def _write_tfds_metadata(out: Path, spec: dict, lengths: list[int], description: str = "",
                         n_bytes: int | None = None) -> Path:
    """dataset_info.json / features.json for the shards: tfds.data_source('chmr_embeddings',
    data_dir=OUT/tfds, split='train') reads them without TensorFlow. n_bytes: the shards' total size
    (default: of the local files; a multi-host gs:// export passes the bucket's)."""
    import tensorflow_datasets as tfds
    path = out / TFDS_DIR
    if n_bytes is None:
        n_bytes = sum(p.stat().st_size for p in path.glob(f"{TFDS_NAME}-train.array_record-*")
                      if ".tmp" not in p.name)   # not a killed run's leftovers
    split = tfds.core.SplitInfo(name="train", shard_lengths=list(lengths), num_bytes=n_bytes)
    tfds.folder_dataset.write_metadata(
        data_dir=path, features=_tfds_features(spec), split_infos=[split],
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", check_data=False,
        description=description or "chmr_jax embeddings (see manifest.json beside tfds/)")
    return path


def _record_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:05d}.json"


def _finished(out: Path, shard: int, plan_sha: str) -> dict | None:
    """The shard's record if it belongs to this plan and every file it lists has its digest; else None."""
    path = _record_path(out, shard)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if record.get("plan") != plan_sha:
        return None
    for rel, digest in record["files"].items():
        if not (out / rel).exists() or _sha256(out / rel) != digest:
            return None
    return record


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_plan(out: Path, plan: dict, name=None) -> None:
    """Refuses an OUT (named `name`: a gs:// --out is checked in its local mirror) that holds another
    plan's shards (another input, encoder or arguments)."""
    path = out / "plan.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for part in ("input", "encoder", "args", "budget"):
        for key in sorted(set(old.get(part, {})) | set(plan[part])):
            if key == "path":
                continue
            a, b = old.get(part, {}).get(key), plan[part].get(key)
            if a != b:
                what = f"made with other flags (--{key}: {a} -> {b})" if part == "args" else \
                    f"of a different {part} ({key}: {a} -> {b})"
                raise ValueError(f"{name or out} holds an export {what}; resuming "
                                 "needs the same input, encoder and arguments: pass a new --out or delete it")


def export(encoder: Encoder, input_path, out, formats=FORMATS, smiles_column: str = "smiles",
           id_column: str | None = None, batch_size: int = 256, cache_dir=None, log=print,
           shard_size: int = 10_000, n_workers: int | None = None, show_progress: bool = True) -> dict:
    """The streaming export (module docstring): embeds `input_path` into OUT's shards (this process's
    share; skipping finished ones), then process 0 writes the TFDS metadata and OUT/manifest.json.
    Returns the manifest (on process 0; the plan elsewhere). cache_dir is unused (streamed input is not
    cached; kept for the call signature). A gs:// OUT is written in a fresh local folder that starts as
    a copy of the bucket folder (paths.staged), each finished shard uploaded at once."""
    kw = dict(formats=formats, smiles_column=smiles_column, id_column=id_column, batch_size=batch_size, log=log,
              shard_size=shard_size, n_workers=n_workers, show_progress=show_progress)
    if paths.is_remote(out):
        url = os.fspath(paths.as_path(out))
        # (the plan and the shard records; each process then fetches the files of its own finished shards)
        with paths.staged(url, "--out", only=lambda rel: rel == "plan.json" or rel.startswith("shards/")) as local:
            return _export(encoder, input_path, local, out_url=url, **kw)
    return _export(encoder, input_path, Path(out), out_url=None, **kw)


def _export(encoder: Encoder, input_path, out: Path, out_url: str | None, formats, smiles_column, id_column,
            batch_size, log, shard_size, n_workers, show_progress) -> dict:
    formats = [ALIASES.get(f, f) for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats: unknown {unknown}; choose from {list(FORMATS)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard_size ({shard_size}) and --batch_size ({batch_size}) must be positive")
    formats = [f for f in FORMATS if f in formats]
    out_name = out_url or out   # (shards are written under temporary names, renamed and hashed: local files)
    input_name = os.fspath(input_path)
    input_path = paths.local_file(input_path, "--input")   # a gs:// input: read from its verified local copy
    t_start = time.perf_counter()
    try:
        info = scan_input(input_path, smiles_column, id_column)
    except (ValueError, FileNotFoundError) as e:   # name a gs:// input by its URL, not this host's copy
        raise type(e)(str(e).replace(str(input_path), input_name)) from None
    if info["rows"] == 0:
        raise ValueError(f"{input_name}: no molecules (no data rows)")
    n_shards = -(-info["rows"] // shard_size)

    featurizer = _Featurizer(encoder.settings, n_workers)
    try:
        head = [s for s, _ in zip((s for s, _ in iter_molecules(input_path, smiles_column, id_column)),
                                  range(BUDGET_SAMPLE))]
        sample = featurizer.submit(head)()
        devices = jax.local_devices()
        budget = embed_budget(encoder, sample, batch_size, len(devices))
        runner = DeviceRunner(encoder, budget, devices)
        spec = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in runner.out_spec(sample).items()}
        spec = {**{k: {"shape": [], "dtype": "str"} for k in STRINGS}, **spec}
        plan = {"version": PLAN_VERSION, "input": info,
                "encoder": {"workdir": str(paths.as_path(encoder.workdir)), "checkpoint_step": encoder.step,
                            "params_sha256": encoder.params_digest()},
                "args": {"formats": formats, "smiles_column": smiles_column, "id_column": id_column,
                         "batch_size": batch_size, "shard_size": shard_size, "shards": n_shards},
                "budget": dataclasses.asdict(budget), "arrays": spec}
        # the input's path is left out: a moved (identical) input still resumes
        plan_sha = hashlib.sha256(json.dumps({**plan, "input": {k: v for k, v in info.items() if k != "path"}},
                                             sort_keys=True).encode()).hexdigest()
        _check_plan(out, plan, out_name)
        if out_url:   # every host has its copy of the bucket folder before process 0 replaces plan.json there
            _barrier("chmr_embed_plan_checked")
        if jax.process_index() == 0:
            files.atomic_write_text(out / "plan.json", json.dumps(plan, indent=1))
            paths.push(out, "--out", only={"plan.json"}.__contains__, to=out_url)

        mine = [i for i in range(n_shards) if i % jax.process_count() == jax.process_index()]
        if out_url:   # the files of this process's shards that the bucket has records of (digests checked next)
            wanted = set()
            for i in mine:
                try:
                    r = json.loads(_record_path(out, i).read_text())
                except (OSError, ValueError):
                    continue
                if r.get("plan") == plan_sha:
                    wanted |= set(r["files"])
            if wanted:
                paths.pull(out_url, "--out", only=wanted.__contains__, into=out)
        done = {i for i in mine if _finished(out, i, plan_sha) is not None}
        if done:
            log(f"resuming: {len(done)} of {len(mine)} shards of this process already written (digests "
                f"checked), skipped: {sorted(done)}")
        todo = [i for i in mine if i not in done]
        names = list(spec)
        tfds_features = _tfds_features(spec) if "tfds" in formats else None
        n_todo = sum(min(shard_size, info["rows"] - i * shard_size) for i in todo)
        shards = _shards_of(iter_molecules(input_path, smiles_column, id_column), shard_size, set(todo))
        with progress_lib.Progress(n_todo, "embed", unit="mol", enabled=show_progress) as bar:
            nxt = next(shards, None)
            pending = (nxt, featurizer.submit(nxt[1])) if nxt else None
            while pending is not None:
                (shard, smiles, ids), get = pending
                feats = get()
                nxt = next(shards, None)           # the next shard featurizes while this one is on the devices
                pending = (nxt, featurizer.submit(nxt[1])) if nxt else None
                arrays, rejects = _embed_block(runner, {k: jax.ShapeDtypeStruct([0] + v["shape"], v["dtype"])
                                                        for k, v in spec.items() if k not in STRINGS},
                                               feats, ids, shard * shard_size)
                del feats
                written = {}
                for fmt in formats:
                    rel = _shard_files(fmt, shard, n_shards, names)
                    if fmt == "numpy":
                        _write_numpy(out, rel, names, arrays)
                    elif fmt == "parquet":
                        _write_parquet(out, rel, arrays)
                    else:
                        _write_tfds(out, rel, arrays, tfds_features)
                    written.update({r: _sha256(out / r) for r in rel})
                record = {"shard": shard, "rows": [shard * shard_size, shard * shard_size + len(smiles)],
                          "molecules": int(len(arrays["id"])), "rejects": rejects, "files": written,
                          "plan": plan_sha}
                files.atomic_write_text(_record_path(out, shard), json.dumps(record))
                if out_url:   # the shard's files, then its record (uploaded oldest first)
                    sent = set(written) | {_record_path(out, shard).relative_to(out).as_posix()}
                    paths.push(out, "--out", only=sent.__contains__, to=out_url)
                bar.update(len(smiles))
                if len(done) + todo.index(shard) + 1 == _KILL_AFTER:    # tests: a crash between shards
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        featurizer.close()
    log(f"process {jax.process_index()} of {jax.process_count()}: wrote shards {todo}; "
        f"featurization wait {featurizer.seconds:.1f}s, model {runner.model_seconds:.1f}s "
        f"({len(jax.local_devices())} local devices, budget {budget})")
    _barrier("chmr_embed_shards_written")
    if jax.process_index() != 0:
        return plan
    in_bucket = None
    if out_url:   # the other hosts' records (their shards stay in the bucket), and what the bucket holds
        if jax.process_count() > 1:
            paths.pull(out_url, "--out", only=lambda rel: rel.startswith("shards/"), into=out)
        in_bucket = paths.listing(out_url)
    records, rejects = [], []
    for i in range(n_shards):
        path = _record_path(out, i)
        if not path.exists():
            raise ValueError(f"{out_name}: shard {i} has no record after every process finished; rerun the same command")
        r = json.loads(path.read_text())
        if r.get("plan") != plan_sha:   # e.g. a concurrent run with other arguments into the same --out
            raise ValueError(f"{out_name}: shard {i} was written by another embed run (its plan differs); use a new --out")
        missing = [rel for rel in r["files"] if in_bucket is not None and rel not in in_bucket]
        if missing:   # (records go up after their files: only a concurrent deletion gets here)
            raise ValueError(f"{out_name}: shard {i}'s files {missing[:3]} are not in the bucket; rerun the same command")
        records.append({k: r[k] for k in ("shard", "rows", "molecules", "files")} | {"n_rejects": len(r["rejects"])})
        rejects += r["rejects"]
    if "tfds" in formats:   # (every listed file is in the bucket: checked above)
        _write_tfds_metadata(out, spec, [r["molecules"] for r in records],
                             n_bytes=None if in_bucket is None else sum(
                                 int(in_bucket[rel]["size"]) for r in records for rel in r["files"] if rel.startswith("tfds/")))
    import chmr_jax
    manifest = {"chmr_jax_version": chmr_jax.__version__, "pretrained": plan["encoder"]["workdir"],
                "checkpoint_step": encoder.step, "params_sha256": plan["encoder"]["params_sha256"],
                "model": encoder.config.get("model", {}), "featurizer": dataclasses.asdict(encoder.settings),
                "input": input_name, "input_sha256": info["sha256"], "rows": info["rows"],
                "molecules": sum(r["molecules"] for r in records), "rejects": rejects, "arrays": spec,
                "formats": {f: FILES[f] for f in formats}, "shard_size": shard_size, "shards": records,
                "budget": plan["budget"], "processes": jax.process_count()}
    files.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    # (a gs:// --out: the TFDS metadata, then the manifest; every shard went up when it was finished, and
    # this folder holds only this process's copies of them)
    paths.push(out, "--out", to=out_url,
               only=lambda rel: rel == "manifest.json" or (rel.startswith("tfds/") and ".array_record-" not in rel))
    log(f"embedded {manifest['molecules']} of {info['rows']} molecules ({len(rejects)} rejected, listed in "
        f"manifest.json) with {encoder.workdir} step {encoder.step} -> {out_name} "
        f"({n_shards} shards, {time.perf_counter() - t_start:.1f}s)")
    return manifest


FILES = {"numpy": "numpy/<array>-<shard>.npy", "parquet": "parquet/part-<shard>.parquet", "tfds": TFDS_DIR}


# ---- loading: lazy arrays over the shards ---------------------------------------------------------

class ShardedArray:
    """An array [rows, ...] stored as consecutive shards, read on demand: len, shape, dtype, indexing by
    int / slice / index or mask arrays (a tuple indexes the trailing axes too) and np.asarray (reads
    all). Only the shards a read touches are loaded (NumPy shards are memory-mapped)."""

    def __init__(self, load: Callable[[int], np.ndarray], lengths: Sequence[int], shape, dtype):
        self._load = load
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.shape = (int(self.offsets[-1]),) + tuple(shape)
        self.dtype = np.dtype(dtype)

    ndim = property(lambda self: len(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.lengths)})"

    def _rows(self, key) -> np.ndarray:
        if isinstance(key, slice):
            return np.arange(*key.indices(len(self)))
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"boolean index of shape {key.shape} for {len(self)} rows")
            return np.nonzero(key)[0]
        if key.dtype.kind not in "iu":
            raise IndexError(f"rows must be indexed by ints, slices or masks, got {key.dtype}")
        key = np.where(key < 0, key + len(self), key)
        if key.size and (key.min() < 0 or key.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        return key

    def _take(self, rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(-1)
        shard = np.searchsorted(self.offsets, flat, "right") - 1
        order = np.argsort(shard, kind="stable")
        pieces = [np.zeros((0,) + self.shape[1:], self.dtype)]
        for s in np.unique(shard):
            local = flat[shard == s] - self.offsets[s]
            data = self._load(int(s))
            if len(local) and np.all(np.diff(local) == 1):
                pieces.append(np.asarray(data[local[0]:local[-1] + 1]))
            else:
                pieces.append(np.asarray(data[local]))
        values = np.concatenate(pieces)
        result = np.empty_like(values)
        result[order] = values
        return result.reshape(rows.shape + self.shape[1:])

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            s = int(np.searchsorted(self.offsets, i, "right") - 1)
            value = np.asarray(self._load(s)[i - self.offsets[s]])
            return value[rest] if rest else value
        value = self._take(self._rows(key))
        return value[(slice(None),) + rest] if rest else value

    def __iter__(self):
        for s in range(len(self.lengths)):
            yield from np.asarray(self._load(s))

    def __array__(self, dtype=None, copy=None):
        values = self._take(np.arange(len(self)))
        return values if dtype is None else values.astype(dtype)

    def tolist(self) -> list:
        return np.asarray(self).tolist()


class _LastShard:
    """Caches the most recently loaded shard (Parquet / TFDS loaders read a whole shard at a time)."""

    def __init__(self, load):
        self._load, self._key, self._value = load, None, None

    def __call__(self, s):
        if self._key != s:
            self._key, self._value = s, self._load(s)
        return self._value


def load_embeddings(out, fmt: str | None = None) -> tuple[dict, dict]:
    """(arrays, manifest) from an export directory: {name: ShardedArray} in input order (accepted
    molecules; 'id' names each), read lazily from fmt's shards ('numpy': memory-mapped .npy, 'parquet'
    or 'tfds': a shard at a time; default: the first of those the export has). np.asarray(arrays[name])
    reads one array whole. A gs:// export is first mirrored to local disk (paths.pull: only files that
    differ), then read from there the same way."""
    name = os.fspath(paths.as_path(out)) if paths.is_remote(out) else out
    out = paths.pull(out, "export", prune=True) if paths.is_remote(out) else Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{name} is not a finished chmr_jax export (no manifest.json); run (or rerun) "
                                "`chmr-jax embed`")
    manifest = json.loads(manifest_path.read_text())
    if "shards" not in manifest:
        raise ValueError(f"{out} is an export of an older chmr_jax (one embeddings.npz, no shards); read it with "
                         "np.load(OUT/embeddings.npz) or rerun `chmr-jax embed` into a new --out")
    fmt = fmt or next(f for f in FORMATS if f in manifest["formats"])
    fmt = ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt not in manifest["formats"]:
        raise ValueError(f"{out} has no {fmt} output (written: {sorted(manifest['formats'])}); pass fmt= one of those")
    spec, records = manifest["arrays"], manifest["shards"]
    lengths = [r["molecules"] for r in records]
    n_shards = len(records)

    def dtype_of(name):
        return np.dtype(str) if spec[name]["dtype"] == "str" else np.dtype(spec[name]["dtype"])

    arrays = {}
    if fmt == "numpy":
        for name in spec:
            def load(s, name=name):
                return np.load(out / _shard_files("numpy", s, n_shards, [name])[0], mmap_mode="r")
            arrays[name] = ShardedArray(load, lengths, spec[name]["shape"], dtype_of(name))
        return arrays, manifest
    if fmt == "parquet":
        import pyarrow.parquet as pq

        def table(s):
            return pq.read_table(out / _shard_files("parquet", s, n_shards, [])[0])
        table = _LastShard(table)
        for name in spec:
            def load(s, name=name):
                col = table(s).column(name).combine_chunks()
                for _ in spec[name]["shape"]:
                    col = col.flatten()
                values = np.asarray(col.to_numpy(zero_copy_only=False))
                if name in STRINGS:
                    values = values.astype(str)
                return values.reshape([lengths[s]] + spec[name]["shape"])
            arrays[name] = ShardedArray(load, lengths, spec[name]["shape"], dtype_of(name))
        return arrays, manifest
    import tensorflow_datasets as tfds
    source = tfds.data_source(TFDS_NAME, data_dir=out / "tfds", split="train")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(int)

    def rows(s):
        return [source[i] for i in range(offsets[s], offsets[s + 1])]
    rows = _LastShard(rows)
    for name in spec:
        def load(s, name=name):
            values = [r[name] for r in rows(s)]
            if name in STRINGS:
                return np.array([v.decode() if isinstance(v, bytes) else v for v in values], dtype=str)
            return np.stack(values) if values else np.zeros([0] + spec[name]["shape"], spec[name]["dtype"])
        arrays[name] = ShardedArray(load, lengths, spec[name]["shape"], dtype_of(name))
    return arrays, manifest
