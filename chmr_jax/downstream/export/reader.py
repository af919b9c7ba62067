"""Loading: lazy arrays over the shards (ShardedArray, load_embeddings).
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from chmr_jax.data import paths

from chmr_jax.downstream.export.layout import ALIASES, FORMATS, STRINGS, TFDS_NAME
from chmr_jax.downstream.export.writers import _shard_files


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
