"""Input: streaming readers of CSV / SMILES files, and featurization one shard ahead of the devices.
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Iterator

from chmr_jax.data import datasets, featurize, paths


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
