"""Outputs: the three writers (NumPy, Parquet, TFDS ArrayRecord), one set of files per shard.
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.downstream.export.layout import STRINGS, TFDS_DIR, TFDS_NAME


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
