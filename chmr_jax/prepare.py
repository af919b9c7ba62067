"""Dataset preparation: load, featurize (cached), split (cached), optional 3D; one call per dataset.

`prepare_benchmark` / `prepare_csv` return a `PreparedDataset` that later stages (fine-tuning,
corpus building) consume; the `chmr-jax prepare` command prints one table row per dataset.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from chmr_jax import datasets, featurize, splits


@dataclasses.dataclass
class PreparedDataset:
    dataset: datasets.MoleculeDataset
    features: featurize.MoleculeFeatures      # accepted molecules; features.rows index dataset rows
    split: dict                               # 'train'/'valid'/'test' -> dataset row indices
    geometry: featurize.GeometryFeatures | None  # aligned with features (one row per accepted molecule)
    seconds: float

    def split_indices(self, part: str) -> np.ndarray:
        """Indices into `features` (accepted molecules only) of split part `part`."""
        lookup = self.features.row_to_index()
        return np.array([lookup[r] for r in self.split[part] if r in lookup], dtype=np.int64)

    def row(self) -> dict:
        """Counts for the prepare table."""
        ds, f = self.dataset, self.features
        out = {"dataset": ds.name, "rows": len(ds), "molecules": len(f), "tasks": ds.num_tasks,
               "type": ds.task_type[:5], "rejects": len(f.rejects),
               "train": len(self.split["train"]), "valid": len(self.split["valid"]),
               "test": len(self.split["test"])}
        out["3d_fail"] = "-" if self.geometry is None else int((~self.geometry.ok).sum())
        out["seconds"] = round(self.seconds, 1)
        return out


def prepare(ds: datasets.MoleculeDataset, settings: featurize.FeaturizerSettings,
            cache_dir, split_kind: str | None = None, geometry: str = "none",
            geometry_settings: featurize.GeometrySettings = featurize.GeometrySettings(),
            n_workers: int | None = None, show_progress: bool = True) -> PreparedDataset:
    """Featurizes and splits `ds`.

    geometry: 'none'; 'rdkit3d' (ETKDG + RDKit 3D descriptors); or a path to a user-supplied
    per-molecule matrix keyed by the 14-char InChIKey block (see featurize.load_external_matrix),
    e.g. Uni-Mol embeddings. Molecules without a row are flagged (ok=False).
    """
    start = time.perf_counter()
    feats = featurize.featurize_smiles(ds.smiles, settings, cache_dir, ds.name, n_workers, show_progress)
    split = splits.load_or_make_split(ds.smiles, split_kind or ds.default_split, cache_dir, ds.name,
                                      n_workers=n_workers)
    geo = None
    if geometry == "rdkit3d":
        geo = featurize.featurize_geometry(feats.smiles, geometry_settings, cache_dir, ds.name,
                                           n_workers, show_progress)
    elif geometry != "none":
        if not os.path.exists(geometry):
            raise ValueError(f"geometry must be 'rdkit3d', 'none' or an existing matrix file; "
                             f"{geometry!r} does not exist")
        values, available = featurize.load_external_matrix(geometry, feats.keys)
        geo = featurize.GeometryFeatures(
            values=values, ok=available, names=[f"external_{i}" for i in range(values.shape[1])],
            reasons=[(int(i), f"no row for key {feats.keys[i]} in {geometry}")
                     for i in np.nonzero(~available)[0]])
    return PreparedDataset(ds, feats, split, geo, time.perf_counter() - start)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no datasets)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).rjust(widths[c]) if c != "dataset" else str(r[c]).ljust(widths[c])
                               for c in cols)
    header = line({c: c for c in cols})
    return "\n".join([header, "-" * len(header)] + [line(r) for r in rows])
