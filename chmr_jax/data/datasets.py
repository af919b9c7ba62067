"""Downstream benchmark loaders: the paper's 9 datasets and any user CSV, as one typed object.

`load_benchmark(name)` reads a registered dataset from the data directory; `load_csv(path, ...)`
reads any CSV with a SMILES column and chosen task columns. Both return a `MoleculeDataset` with
labels as float32 [n_rows, n_tasks] (NaN = missing) and the 14-char InChIKey block per row.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import featurize, paths, registry

CLASSIFICATION = "classification"
REGRESSION = "regression"

# name -> (file in registry, first task column, default split). The first-task columns follow
# InfoAlign's loaders (start_column); MoleculeNet files have smiles first, then the tasks.
BENCHMARKS: dict[str, tuple[str, int, str]] = {
    "chembl2k": ("assays.csv.gz", 4, "paper_scaffold"),
    "broad6k": ("assays.csv.gz", 2, "paper_scaffold"),
    "biogenadme": ("assays.csv.gz", 4, "paper_scaffold"),
    "moltoxcast": ("assays.csv.gz", 2, "paper_scaffold"),
    "bbbp": ("bbbp.csv", 1, "ogb_scaffold"),
    "bace": ("bace.csv", 1, "ogb_scaffold"),
    "clintox": ("clintox.csv", 1, "ogb_scaffold"),
    "sider": ("sider.csv", 1, "ogb_scaffold"),
    "hiv": ("hiv.csv", 1, "ogb_scaffold"),
}
ALL_BENCHMARKS = tuple(BENCHMARKS)
# Bump when molecule_keys' definition changes (parsing, key kind): cached keys are then recomputed.
KEYS_VERSION = 1


@dataclasses.dataclass
class MoleculeDataset:
    """A property-prediction dataset, one row per input line.

    smiles [n] str; labels float32 [n, t] with NaN for missing; keys [n] 14-char InChIKey block
    ('' where RDKit cannot parse the SMILES); metric 'roc_auc' (classification) or 'mae'.
    """
    name: str
    smiles: np.ndarray
    labels: np.ndarray
    task_names: list[str]
    task_type: str
    metric: str
    keys: np.ndarray
    default_split: str
    source: str
    lines: np.ndarray | None = None   # [n] the file's line number of each row (header = line 1)
    split_over_accepted: bool = False  # a user CSV: split the featurized molecules, not every row

    def __len__(self) -> int:
        return len(self.smiles)

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    def summary(self) -> dict:
        observed = np.isfinite(self.labels)
        return {"name": self.name, "rows": len(self), "tasks": self.num_tasks,
                "task_type": self.task_type, "metric": self.metric,
                "labels_missing": float(1 - observed.mean()) if observed.size else 0.0}


@contextlib.contextmanager
def open_csv(path):
    """(header, csv.reader positioned at the first data row) of a .csv[.gz]; a file without even a header
    row is a ValueError naming it."""
    with paths.open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file (no header row)") from None
        yield header, reader


def _read_table(path: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    """(header, rows, the file's line number where each row starts): errors and rejects name lines."""
    with open_csv(path) as (header, reader):
        rows, lines = [], []
        while True:
            start = reader.line_num + 1   # a quoted field may span lines: the row starts after the last one
            try:
                row = next(reader)
            except StopIteration:
                break
            rows.append(row)
            lines.append(start)
    for row, line in zip(rows, lines):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} fields but the header has "
                             f"{len(header)}; fix the row or quote fields that contain commas")
    return header, rows, np.array(lines, dtype=np.int64)


def _parse_labels(path: Path, header: list[str], rows: list[list[str]], cols: list[int],
                  lines: np.ndarray) -> np.ndarray:
    labels = np.full((len(rows), len(cols)), np.nan, dtype=np.float32)
    for i, row in enumerate(rows):
        for j, c in enumerate(cols):
            cell = row[c].strip()
            if cell in ("", "nan", "NaN", "NA", "None"):
                continue
            try:
                labels[i, j] = float(cell)
            except ValueError:
                raise ValueError(f"{path}, line {lines[i]}, column {header[c]!r}: label {cell!r} is "
                                 "not a number; use an empty cell for a missing label") from None
    return labels


def infer_task_type(labels: np.ndarray) -> str:
    """'classification' when every observed label is 0 or 1, else 'regression'."""
    observed = labels[np.isfinite(labels)]
    if observed.size and np.all((observed == 0) | (observed == 1)):
        return CLASSIFICATION
    return REGRESSION


def _metric_for(task_type: str) -> str:
    return "roc_auc" if task_type == CLASSIFICATION else "mae"


def load_csv(path: str | os.PathLike, smiles_column: str = "smiles",
             task_columns: Sequence[str] | None = None, task_type: str | None = None,
             name: str | None = None, cache_dir: str | os.PathLike | None = None,
             default_split: str = "ogb_scaffold", n_workers: int | None = None,
             flags: dict | None = None) -> MoleculeDataset:
    """Loads any CSV (optionally .gz) with a SMILES column and numeric task columns.

    Column names match exactly (a SMILES column that differs in case is an error naming it).
    task_columns: default = every column after the SMILES column; a task column without one label is
    an error naming it. task_type: inferred from the labels (all 0/1 -> classification) unless given.
    Labels must be numbers or empty cells. flags: how errors name the settings, e.g.
    {'smiles_column': '--smiles_column ', 'task_columns': '--task_columns '} (default 'smiles_column=').
    """
    flags = flags or {}
    path = paths.local_file(path, "csv")   # (a gs:// CSV: its verified local copy)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    header, rows, lines = _read_table(path)
    if not rows:
        raise ValueError(f"{path}: the file has no rows (only a header); add molecules below it")
    flag = lambda key: flags.get(key, f"{key}=")
    if smiles_column not in header:   # column names match exactly: a near miss is named, never taken
        near = [h for h in header if h.lower() == smiles_column.lower()]
        hint = f"did you mean {flag('smiles_column')}{near[0]}? (column names match exactly)" if near else \
            f"pass {flag('smiles_column')}<column>"
        raise ValueError(f"{path}: no SMILES column {smiles_column!r}; columns are {header}; {hint}")
    s_col = header.index(smiles_column)
    if task_columns is None:
        cols = list(range(s_col + 1, len(header)))
    else:
        missing = [c for c in task_columns if c not in header]
        if missing:
            raise ValueError(f"{path}: task columns {missing} not found (column names match exactly); columns are "
                             f"{header}")
        cols = [header.index(c) for c in task_columns]
    if not cols:
        raise ValueError(f"{path}: no task columns (after {smiles_column!r}); pass {flag('task_columns')}a,b")
    return _build(name or path.name.split(".")[0], path, header, rows, lines, s_col, cols, task_type,
                  default_split, cache_dir, n_workers, split_over_accepted=True, task_flag=flag("task_columns"))


def _build(name, path, header, rows, lines, s_col, cols, task_type, default_split, cache_dir, n_workers,
           split_over_accepted=False, task_flag=None):
    labels = _parse_labels(path, header, rows, cols, lines)
    if task_flag is not None:   # a user CSV: a task without one label would be trained and scored as nothing
        empty = [header[c] for j, c in enumerate(cols) if not np.isfinite(labels[:, j]).any()]
        if empty:
            raise ValueError(f"{path}: task column{'s' * (len(empty) > 1)} {', '.join(map(repr, empty))} "
                             f"{'have' if len(empty) > 1 else 'has'} no label in any of the {len(rows)} rows; "
                             f"leave {'them' if len(empty) > 1 else 'it'} out with {task_flag}"
                             f"{','.join(header[c] for c in cols if header[c] not in empty) or '...'}")
    if task_type is None:
        task_type = infer_task_type(labels)
    if task_type not in (CLASSIFICATION, REGRESSION):
        raise ValueError(f"task_type must be {CLASSIFICATION!r} or {REGRESSION!r}, got {task_type!r}")
    smiles = np.array([r[s_col].strip() for r in rows], dtype=str)
    return MoleculeDataset(
        name=name, smiles=smiles, labels=labels, task_names=[header[c] for c in cols],
        task_type=task_type, metric=_metric_for(task_type),
        keys=molecule_keys(smiles, cache_dir=cache_dir, name=name, n_workers=n_workers),
        default_split=default_split, source=str(path), lines=lines, split_over_accepted=split_over_accepted)


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None,
                   n_workers: int | None = None) -> MoleculeDataset:
    """Loads one of the paper's 9 benchmarks (see ALL_BENCHMARKS) from the data directory."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)} or use load_csv")
    basename, first_task, split = BENCHMARKS[name]
    path = registry.fetch(name, basename, data_dir)
    header, rows, lines = _read_table(path)
    s_col = [h.lower() for h in header].index("smiles")
    return _build(name, path, header, rows, lines, s_col, list(range(first_task, len(header))), None,
                  split, cache_dir, n_workers)


def molecule_keys(smiles: Sequence[str], cache_dir: str | os.PathLike | None = None,
                  name: str = "smiles", n_workers: int | None = None) -> np.ndarray:
    """14-char InChIKey block per SMILES ('' if unparsable), cached by the SMILES list and KEYS_VERSION."""
    smiles = [str(s) for s in smiles]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{name}-keys-{featurize.cache_key(smiles, {'version': KEYS_VERSION}, 'keys')}.npy"
        if path.exists():
            return np.load(path)
    keys = np.array(featurize.keys_of_smiles(smiles, "inchikey14", n_workers, f"keys {name}"), dtype="<U14")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
        np.save(tmp, keys)
        os.replace(tmp, path)
    return keys
