"""Embeddings out of a pretrained encoder, for downstream JAX pipelines (and anything reading Parquet).

  load_encoder(workdir)      -> Encoder: `apply(params, batch)` is a pure, jittable function of the
                                encoder state and one padded batch; `batches(features)` makes batches
  embed_molecules(enc, smiles) -> {name: array} per accepted molecule, plus the rejected rows
  write_npz / write_parquet / write_tfds   the three export formats (all beside one manifest.json)
  load_embeddings(out)       -> (arrays, manifest) from an export directory

Arrays per molecule (D = latent width, H = tree depth):
  <modality> [D] per molecular modality (e.g. fingerprint, graph), anchor [D] (their sum, spec Eq. 2),
  tree_codes [H] int32 heap indices of the anchor's Tree-VQ path (level h code in [2^h, 2^(h+1))),
  tree_paths [H] int32 the same path as within-level indices (0 .. 2^h - 1),
  tree_vectors [H, D] the straight-through vectors (forward value: the chosen unit code vectors).
Only SMILES are needed: the cellular modalities are training-time signals, not inference inputs.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from chmr_jax.data import featurize, files, graphs
from chmr_jax.mechanisms import tree_vq
from chmr_jax import progress as progress_lib

FORMATS = ("npz", "parquet", "tfds")
TFDS_NAME = "chmr_embeddings"


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
        fp = features.fingerprints()
        for group in graphs.partition(features, np.arange(len(features)), budget):
            x = np.zeros((budget.n_graph, fp.shape[1]), np.float32)
            x[:len(group)] = fp[group]
            yield group, {"graph": graphs.pack(features, group, budget), "inputs": {"fingerprint": x}}


def load_encoder(workdir, step: int | None = None) -> Encoder:
    """The encoder of a `chmr-jax pretrain` (or `chmr-jax convert`) workdir, in eval mode."""
    from chmr_jax.training import pretrain

    return encoder_of(*pretrain.load_pretrained(workdir, step), workdir)


def encoder_of(model, config, meta, workdir) -> Encoder:
    """The Encoder of an already restored model (eval mode), e.g. from `pretrain.load_pretrained`."""
    if "geometry" in model.mol_names:
        raise ValueError(f"{workdir}: this encoder takes the geometry modality as input; export supports "
                         "encoders on SMILES-derived inputs only (config.model.molecular='fingerprint,graph')")
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
    """Every output of `encoder.apply` for each molecule of `features` (numpy, in order)."""
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


def read_molecules(path, smiles_column: str = "smiles", id_column: str | None = None) -> tuple[list, list]:
    """(smiles, ids) from a .csv[.gz] (SMILES column by name, ids from id_column or the row number)
    or a .smi file (one 'SMILES [id]' per line, whitespace separated, '#' comments)."""
    from chmr_jax.data import datasets

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such input file")
    if path.suffix == ".smi":
        smiles, ids = [], []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            smiles.append(parts[0])
            ids.append(parts[1] if len(parts) > 1 else f"line{n}")
        return smiles, ids
    header, rows, _ = datasets._read_table(path)
    lower = [h.lower() for h in header]
    if smiles_column.lower() not in lower:
        raise ValueError(f"{path}: no SMILES column {smiles_column!r}; columns are {header}. "
                         "Pass --smiles_column")
    s = lower.index(smiles_column.lower())
    if id_column is not None and id_column not in header:
        raise ValueError(f"{path}: no id column {id_column!r}; columns are {header}")
    i = header.index(id_column) if id_column else None
    return [r[s] for r in rows], [r[i] if i is not None else f"row{n}" for n, r in enumerate(rows)]


def embed_molecules(encoder: Encoder, smiles: Sequence[str], ids: Sequence[str] | None = None,
                    batch_size: int = 256, cache_dir=None, show_progress: bool = True) -> tuple[dict, list]:
    """(arrays, rejects): arrays has 'id', 'smiles', 'key' and every apply output for the accepted
    molecules in input order; rejects lists {'row', 'id', 'smiles', 'reason'} for the others."""
    ids = list(ids) if ids is not None else [f"row{i}" for i in range(len(smiles))]
    if len(ids) != len(smiles):
        raise ValueError(f"{len(ids)} ids for {len(smiles)} SMILES")
    features = featurize.featurize_smiles(smiles, encoder.settings, cache_dir, "embed",
                                          show_progress=show_progress, verbose=False)
    rejects = [{"row": int(r), "id": ids[r], "smiles": s, "reason": why} for r, s, why in features.rejects]
    if len(features) == 0:
        raise ValueError(f"none of the {len(smiles)} molecules could be featurized; first rejects: {rejects[:3]}")
    arrays = embed_features(encoder, features, batch_size, show_progress)
    arrays = {"id": np.array([ids[r] for r in features.rows]), "smiles": np.asarray(features.smiles, str),
              "key": np.asarray(features.keys, str), **arrays}
    return arrays, rejects


def manifest_for(encoder: Encoder, arrays: dict, rejects: list, source: str, formats) -> dict:
    import chmr_jax
    return {"chmr_jax_version": chmr_jax.__version__, "pretrained": str(Path(encoder.workdir).resolve()),
            "checkpoint_step": encoder.step, "model": encoder.config.get("model", {}),
            "featurizer": dataclasses.asdict(encoder.settings), "input": str(source),
            "molecules": int(len(arrays["id"])), "rejects": rejects,
            "arrays": {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in arrays.items()},
            "formats": {f: FILES[f] for f in formats}}


FILES = {"npz": "embeddings.npz", "parquet": "embeddings.parquet", "tfds": f"tfds/{TFDS_NAME}/1.0.0"}


def write_npz(out: Path, arrays: dict) -> Path:
    path = Path(out) / FILES["npz"]
    files.atomic_savez(path, **arrays)
    return path


def write_parquet(out: Path, arrays: dict) -> Path:
    """One row per molecule; vectors as fixed-size lists (tree_vectors: H lists of D)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name, value in arrays.items():
        if value.ndim == 1:
            columns[name] = pa.array(value.tolist() if value.dtype.kind == "U" else value)
            continue
        arr = pa.array(np.ascontiguousarray(value).reshape(-1))
        for width in reversed(value.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, width)
        columns[name] = arr
    path = Path(out) / FILES["parquet"]
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)
    return path


def _tfds_features(arrays: dict):
    import tensorflow_datasets as tfds
    spec = {}
    for name, value in arrays.items():
        if value.dtype.kind == "U":
            spec[name] = tfds.features.Text()
        else:
            spec[name] = tfds.features.Tensor(shape=value.shape[1:], dtype=value.dtype)
    return tfds.features.FeaturesDict(spec)


def write_tfds(out: Path, arrays: dict, description: str = "") -> Path:
    """A TFDS dataset (split 'train', array_record) readable without TensorFlow:
    tfds.data_source('chmr_embeddings', data_dir=OUT/tfds, split='train') or
    tfds.builder_from_directory(OUT/tfds/chmr_embeddings/1.0.0).as_data_source()."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(out) / FILES["tfds"]
    path.mkdir(parents=True, exist_ok=True)
    features = _tfds_features(arrays)
    shard = path / f"{TFDS_NAME}-train.array_record-00000-of-00001"
    writer = ArrayRecordWriter(str(shard), "group_size:1")   # group size 1: fast random access
    n = len(arrays["id"])
    for i in range(n):
        writer.write(features.serialize_example(features.encode_example({k: v[i] for k, v in arrays.items()})))
    writer.close()
    split = tfds.core.SplitInfo(name="train", shard_lengths=[n], num_bytes=shard.stat().st_size)
    tfds.folder_dataset.write_metadata(
        data_dir=path, features=features, split_infos=[split],
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", check_data=False,
        description=description or "chmr_jax embeddings (see manifest.json beside tfds/)")
    return path


WRITERS = {"npz": write_npz, "parquet": write_parquet, "tfds": write_tfds}


def export(encoder: Encoder, input_path, out, formats=FORMATS, smiles_column: str = "smiles",
           id_column: str | None = None, batch_size: int = 256, cache_dir=None, log=print) -> dict:
    """Reads molecules, embeds them, writes the formats and OUT/manifest.json; returns the manifest."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats: unknown {unknown}; choose from {list(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    smiles, ids = read_molecules(input_path, smiles_column, id_column)
    arrays, rejects = embed_molecules(encoder, smiles, ids, batch_size, cache_dir)
    for f in formats:
        log(f"{f}: {WRITERS[f](out, arrays)}")
    manifest = manifest_for(encoder, arrays, rejects, input_path, formats)
    files.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    log(f"embedded {manifest['molecules']} of {len(smiles)} molecules ({len(rejects)} rejected, listed in "
        f"manifest.json) with {encoder.workdir} step {encoder.step} -> {out}")
    return manifest


def load_embeddings(out, fmt: str = "npz") -> tuple[dict, dict]:
    """(arrays, manifest) from an export directory; arrays as numpy, strings as str arrays."""
    out = Path(out)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{out} is not a chmr_jax export (no manifest.json); run `chmr-jax embed`")
    manifest = json.loads(manifest_path.read_text())
    shapes = manifest["arrays"]
    if fmt == "npz":
        with np.load(out / FILES["npz"]) as data:
            return {k: data[k] for k in data.files}, manifest
    if fmt == "parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(out / FILES["parquet"])
        arrays = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            shape = shapes[name]["shape"]
            for _ in shape:
                col = col.flatten()
            values = np.asarray(col.to_numpy(zero_copy_only=False))
            if shapes[name]["dtype"].startswith("<U"):
                values = values.astype(str)
            arrays[name] = values.reshape([len(table)] + shape)
        return arrays, manifest
    if fmt == "tfds":
        import tensorflow_datasets as tfds
        source = tfds.data_source(TFDS_NAME, data_dir=out / "tfds", split="train")
        rows = [source[i] for i in range(len(source))]
        arrays = {}
        for name in shapes:
            values = [r[name] for r in rows]
            if shapes[name]["dtype"].startswith("<U"):
                arrays[name] = np.array([v.decode() if isinstance(v, bytes) else v for v in values])
            else:
                arrays[name] = np.stack(values)
        return arrays, manifest
    raise ValueError(f"fmt must be one of {list(FORMATS)}, got {fmt!r}")
