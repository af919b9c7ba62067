"""The weight-free 3D modality: ETKDG conformers + RDKit 3D descriptors, and user-supplied matrices.

The stand-in for Uni-Mol (spec §1): per molecule one seeded ETKDGv3 conformer, described by RDKit's
AUTOCORR3D, RDF, MORSE, WHIM, GETAWAY blocks and 11 shape descriptors (GEOMETRY_DIM values). A
molecule whose embedding fails is flagged (ok = False, a NaN row, the reason), never raised.
Results are cached on disk like featurize.featurize_smiles. `load_external_matrix` aligns a
precomputed per-molecule matrix (e.g. Uni-Mol embeddings) to the corpus' join keys instead.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import files
from chmr_jax.data.featurize import cache_key, map_chunks, parse_smiles


@dataclasses.dataclass(frozen=True)
class GeometrySettings:
    """ETKDG conformer + RDKit 3D descriptors (the weight-free stand-in for Uni-Mol, spec §1)."""
    seed: int = 0xF00D
    timeout_s: int = 10         # per embedding attempt; giant macrocycles otherwise stall a worker
    mmff_optimize: bool = False  # ETKDGv3 geometries are already reasonable; MMFF costs ~2x time


GEOMETRY_BLOCKS = (("AUTOCORR3D", 80), ("RDF", 210), ("MORSE", 224), ("WHIM", 114), ("GETAWAY", 273))
SHAPE_DESCRIPTORS = ("PMI1", "PMI2", "PMI3", "NPR1", "NPR2", "RadiusOfGyration",
                     "InertialShapeFactor", "Eccentricity", "Asphericity", "SpherocityIndex", "PBF")
GEOMETRY_DIM = sum(d for _, d in GEOMETRY_BLOCKS) + len(SHAPE_DESCRIPTORS)


def geometry_feature_names() -> list[str]:
    names = [f"{block}_{i}" for block, dim in GEOMETRY_BLOCKS for i in range(dim)]
    return names + list(SHAPE_DESCRIPTORS)


def geometry_descriptors(smiles: str, settings: GeometrySettings) -> np.ndarray | str:
    """float64 [GEOMETRY_DIM] raw 3D descriptors, or the failure reason."""
    from rdkit import Chem
    from rdkit.Chem import AllChem, rdMolDescriptors as rd

    mol = parse_smiles(smiles)
    if mol is None:
        return "unparsable SMILES"
    mol = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = settings.seed
    params.timeout = settings.timeout_s
    status = AllChem.EmbedMolecule(mol, params)
    if status != 0:  # one retry from random coordinates, as RDKit recommends for hard cases
        params.useRandomCoords = True
        status = AllChem.EmbedMolecule(mol, params)
    if status != 0:
        return "3D embedding failed"
    try:
        if settings.mmff_optimize:
            AllChem.MMFFOptimizeMolecule(mol)
        parts = [rd.CalcAUTOCORR3D(mol), rd.CalcRDF(mol), rd.CalcMORSE(mol), rd.CalcWHIM(mol),
                 rd.CalcGETAWAY(mol)]
        parts.append([getattr(rd, "Calc" + name)(mol) for name in SHAPE_DESCRIPTORS])
        out = np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])
    except Exception as err:  # noqa: BLE001
        return f"3D descriptor error: {type(err).__name__}: {err}"
    if out.shape != (GEOMETRY_DIM,):
        return f"3D descriptor size {out.shape[0]} != {GEOMETRY_DIM}"
    return out


def _geometry_chunk(args):
    start, smiles, settings = args
    return start, [geometry_descriptors(s, settings) for s in smiles]


@dataclasses.dataclass
class GeometryFeatures:
    """Raw 3D descriptors [n, d] (float32, NaN rows where embedding failed) and ok flags [n]."""
    values: np.ndarray
    ok: np.ndarray
    reasons: list            # [(index, reason)] for failed molecules
    names: list

    def standardized(self, fit_rows: np.ndarray | None = None) -> np.ndarray:
        """Z-scored copy; statistics over ok rows (of `fit_rows` if given, e.g. the train split).

        Non-finite entries and failed rows become 0 (the mean), so they carry no signal; use `ok`
        to tell them apart.
        """
        return standardize(self.values, self.ok, fit_rows)


def standardize(values: np.ndarray, ok: np.ndarray, fit_rows: np.ndarray | None = None,
                eps: float = 1e-6) -> np.ndarray:
    """Column z-scores over finite entries of ok rows; non-finite entries -> 0."""
    use = ok.copy()
    if fit_rows is not None:
        mask = np.zeros_like(ok)
        mask[fit_rows] = True
        use &= mask
    fit = np.where(np.isfinite(values[use]), values[use], np.nan)
    with np.errstate(all="ignore"):
        mean = np.nan_to_num(np.nanmean(fit, axis=0)) if len(fit) else np.zeros(values.shape[1])
        std = np.nan_to_num(np.nanstd(fit, axis=0)) if len(fit) else np.ones(values.shape[1])
        out = (values - mean) / np.maximum(std, eps)
    out[~np.isfinite(out)] = 0.0
    out[~ok] = 0.0
    return out.astype(np.float32)


def featurize_geometry(smiles: Sequence[str], settings: GeometrySettings = GeometrySettings(),
                       cache_dir: str | os.PathLike | None = None, name: str = "smiles",
                       n_workers: int | None = None, show_progress: bool = True) -> GeometryFeatures:
    """3D descriptors for each SMILES (cached like featurize_smiles). Failures are flagged, not raised."""
    smiles = [str(s) for s in smiles]
    cache_path = None
    if cache_dir is not None:
        key = cache_key(smiles, dataclasses.asdict(settings), "geometry")
        cache_path = Path(cache_dir) / f"{name}-geometry-{key}.npz"
        if cache_path.exists():
            with np.load(cache_path, allow_pickle=False) as data:
                return GeometryFeatures(values=data["values"], ok=data["ok"],
                                        reasons=[tuple(r) for r in json.loads(str(data["reasons"]))],
                                        names=geometry_feature_names())
    results = map_chunks(_geometry_chunk, smiles, (settings,), f"3D {name}", n_workers,
                         chunk_size=32, show_progress=show_progress)
    values = np.full((len(smiles), GEOMETRY_DIM), np.nan, dtype=np.float32)
    ok = np.zeros(len(smiles), dtype=bool)
    reasons = []
    for i, r in enumerate(results):
        if isinstance(r, str):
            reasons.append((i, r))
        else:
            values[i] = r
            ok[i] = True
    if cache_path is not None:
        files.atomic_savez(cache_path, values=values, ok=ok, reasons=np.array(json.dumps(reasons)))
    return GeometryFeatures(values=values, ok=ok, reasons=reasons, names=geometry_feature_names())


def load_external_matrix(path: str | os.PathLike, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Aligns a user-supplied per-molecule matrix (e.g. Uni-Mol embeddings) to `keys`.

    Accepted files: `.npz` with arrays `keys` [m] (str) and `data` [m, d]; or `.csv`/`.csv.gz`
    whose first column is the key and the rest are numbers. Returns (float32 [n, d] with zeros
    where absent, bool [n] available). Duplicate keys and non-numeric cells are errors that name
    the file and row.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "keys" not in data or "data" not in data:
                raise ValueError(f"{path}: an external matrix .npz needs arrays 'keys' and 'data'; "
                                 f"found {list(data.keys())}")
            ext_keys = [str(k) for k in data["keys"]]
            matrix = np.asarray(data["data"], dtype=np.float32)
        if matrix.ndim != 2 or len(matrix) != len(ext_keys):
            raise ValueError(f"{path}: 'data' must be [len(keys), d]; got {matrix.shape} for "
                             f"{len(ext_keys)} keys")
    else:
        import gzip
        opener = gzip.open if path.suffix == ".gz" else open
        ext_keys, rows = [], []
        with opener(path, "rt", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            for line_no, row in enumerate(reader, start=2):
                try:
                    rows.append([float(x) for x in row[1:]])
                except ValueError:
                    raise ValueError(f"{path}, line {line_no}: non-numeric value in {row[1:6]}...") from None
                if len(rows[-1]) != len(header) - 1:
                    raise ValueError(f"{path}, line {line_no}: {len(rows[-1])} values, header has "
                                     f"{len(header) - 1}")
                ext_keys.append(row[0])
        matrix = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(header) - 1)
    index: dict[str, int] = {}
    for i, k in enumerate(ext_keys):
        if k in index:
            raise ValueError(f"{path}: duplicate key {k!r} (entries {index[k]} and {i}); "
                             "aggregate replicates before supplying the matrix")
        index[k] = i
    out = np.zeros((len(keys), matrix.shape[1]), dtype=np.float32)
    available = np.zeros(len(keys), dtype=bool)
    for i, k in enumerate(keys):
        j = index.get(str(k))
        if j is not None:
            out[i] = matrix[j]
            available[i] = True
    return out, available
