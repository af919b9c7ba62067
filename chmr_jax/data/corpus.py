"""The multi-modal pretraining corpus: molecules joined with cellular profiles that are mostly missing.

A `Corpus` holds, for n molecules: the join key and SMILES, the molecular features (graphs and
fingerprints, from `featurize`), and for every cellular modality named in the config a float32
matrix [n, dim] with a boolean availability mask [n]. Availability is data: a row of zeros with
available=False is "not measured", never "measured as zero".

Profiles come from `ProfileTable`s (one per source file, see the importers in `profiles.py`). A
modality may concatenate several sources (e.g. cell = CP-Bray + CP-JUMP); a molecule is available
for the modality when any source observed it, and the missing part is imputed per column (counted).
Replicate profiles of one molecule are aggregated (median, mean, or first as the release does).
Within an observed profile, a row with more than `max_nan_fraction` NaN/inf entries is dropped;
remaining NaN entries are imputed with the column mean over observed molecules. Every drop, skip
and imputation is counted in the manifest.

Saved as a directory: `corpus.npz` (keys, smiles, per-modality values/availability), `features.npz`
(featurize.MoleculeFeatures) and `manifest.json` (format version, sources, settings, counts,
availability per modality, feature names). `chmr-jax prepare --corpus` and pretraining's cache write
per-molecule records instead, built in shares by every process (records.py); `Corpus.load` reads both.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import featurize, files

FORMAT_VERSION = 1
JOIN_KEYS = featurize.JOIN_KEYS
AGGREGATES = ("median", "mean", "first")


class CorpusError(ValueError):
    """Bad corpus input: the message names the file, the row or id, and what to do."""


@dataclasses.dataclass
class ProfileTable:
    """Profiles from one source file, one row per profile (replicates allowed).

    keys: join key per row (see `featurize.molecule_key`); smiles: a structure per row ('' when the molecule
    is known from elsewhere); values float32 [rows, dim]; skipped: [(row id, reason)] for rows the
    importer could not use (no structure, unparsable structure, ...), kept for the manifest.
    """
    source: str
    keys: list
    smiles: list
    values: np.ndarray
    feature_names: list
    row_ids: list
    skipped: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.values = np.asarray(self.values, np.float32)
        n = len(self.keys)
        if self.values.ndim != 2 or self.values.shape[0] != n or len(self.smiles) != n or len(self.row_ids) != n:
            raise CorpusError(f"{self.source}: {n} keys, {len(self.smiles)} smiles, {len(self.row_ids)} ids "
                              f"but values of shape {self.values.shape}")
        if self.values.shape[1] != len(self.feature_names):
            raise CorpusError(f"{self.source}: {self.values.shape[1]} value columns but "
                              f"{len(self.feature_names)} feature names")


@dataclasses.dataclass
class Modality:
    values: np.ndarray          # float32 [n, dim]; zeros where not available
    available: np.ndarray       # bool [n]
    feature_names: list
    sources: list

    @property
    def dim(self) -> int:
        return self.values.shape[1]


def read_manifest(path) -> dict:
    """A corpus' manifest.json; a CorpusError naming the file if it is not JSON (a truncated copy)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not a JSON manifest ({e}): a truncated or interrupted copy; delete the corpus "
                          "folder (and its copy in the bucket for a gs:// cache) and build it again") from None


@dataclasses.dataclass
class Corpus:
    keys: np.ndarray                    # str [n]
    smiles: np.ndarray                  # str [n]
    features: featurize.MoleculeFeatures  # aligned: features row i is molecule i
    modalities: dict                    # name -> Modality
    manifest: dict
    gene_edges: np.ndarray | None = None  # optional [E, 2] str gene ids (paper layout G-G.csv.gz)

    def __len__(self) -> int:
        return len(self.keys)

    def index_of(self) -> dict:
        return {str(k): i for i, k in enumerate(self.keys)}

    def subset(self, idx) -> "Corpus":
        """Molecules `idx` (in that order) with their features and profiles; the manifest records it."""
        idx = np.asarray(idx, np.int64)
        modalities = {name: dataclasses.replace(m, values=m.values[idx], available=m.available[idx])
                      for name, m in self.modalities.items()}
        manifest = {**self.manifest, "subset_of": self.manifest.get("name", ""), "subset_size": int(len(idx))}
        return Corpus(keys=self.keys[idx], smiles=self.smiles[idx], features=self.features.subset(idx),
                      modalities=modalities, manifest=manifest, gene_edges=self.gene_edges)

    def with_modalities(self, which: str = "all") -> "Corpus":
        """The corpus restricted to some cellular modalities: 'all', 'none' (structure only) or a comma
        list of names (an unknown name is an error naming the ones there are)."""
        if which == "all":
            return self
        names = [] if which == "none" else [n.strip() for n in which.split(",") if n.strip()]
        unknown = [n for n in names if n not in self.modalities]
        if unknown:
            raise CorpusError(f"modalities {unknown} are not in the corpus (it has {sorted(self.modalities)}); "
                              "use 'all', 'none' or a comma list of those")
        manifest = {**self.manifest, "modalities_used": names}
        return dataclasses.replace(self, modalities={n: self.modalities[n] for n in names}, manifest=manifest)

    def hide(self, fraction: float, seed: int = 0) -> "Corpus":
        """A copy where a further `fraction` of each modality's observed profiles is marked missing
        (values zeroed), chosen at random with `seed`; the manifest records how many per modality."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction to hide must be in [0, 1], got {fraction}")
        rng = np.random.default_rng(seed)
        modalities, hidden = {}, {}
        for name, m in self.modalities.items():
            observed = np.flatnonzero(m.available)
            drop = rng.choice(observed, size=int(round(fraction * len(observed))), replace=False)
            available = m.available.copy()
            available[drop] = False
            values = m.values.copy()
            values[drop] = 0.0
            modalities[name] = dataclasses.replace(m, values=values, available=available)
            hidden[name] = {"observed_before": int(len(observed)), "hidden": int(len(drop))}
        manifest = {**self.manifest, "hidden": {"fraction": fraction, "seed": seed, "modalities": hidden}}
        return dataclasses.replace(self, modalities=modalities, manifest=manifest)

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"keys": self.keys, "smiles": self.smiles}
        for name, m in self.modalities.items():
            arrays[f"values/{name}"] = m.values
            arrays[f"available/{name}"] = m.available
        if self.gene_edges is not None:
            arrays["gene_edges"] = np.asarray(self.gene_edges, dtype=str)
        files.atomic_savez(directory / "corpus.npz", **arrays)
        self.features.save(directory / "features.npz")
        # written last: its presence marks a complete corpus
        files.atomic_write_text(directory / "manifest.json", json.dumps(self.manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Corpus":
        directory = Path(directory)
        manifest_path = directory / "manifest.json"
        if not manifest_path.exists():
            raise CorpusError(f"{directory}: no manifest.json; not a chmr_jax corpus (or an interrupted "
                              "save). Build it with `chmr-jax prepare --corpus ...`")
        manifest = read_manifest(manifest_path)
        if "records" in manifest:   # per-molecule records (records.py); else the dense npz files below
            from chmr_jax.data import records
            return records.read_corpus(directory)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{directory}: corpus format {manifest.get('format_version')} but this chmr_jax "
                              f"reads format {FORMAT_VERSION}; rebuild the corpus")
        with np.load(directory / "corpus.npz", allow_pickle=False) as data:
            modalities = {}
            for name, info in manifest["modalities"].items():
                modalities[name] = Modality(values=data[f"values/{name}"], available=data[f"available/{name}"],
                                            feature_names=info["feature_names"], sources=info["sources"])
            gene_edges = data["gene_edges"] if "gene_edges" in data else None
            keys, smiles = data["keys"], data["smiles"]
        return cls(keys=keys, smiles=smiles, features=featurize.MoleculeFeatures.load(directory / "features.npz"),
                   modalities=modalities, manifest=manifest, gene_edges=gene_edges)


def _aggregate(rows: np.ndarray, how: str) -> np.ndarray:
    if how == "first" or len(rows) == 1:
        return rows[0]
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # all-NaN columns stay NaN
        return np.nanmedian(rows, axis=0) if how == "median" else np.nanmean(rows, axis=0)


def aggregate_table(table: ProfileTable, aggregate: str = "median", max_nan_fraction: float = 0.5,
                    allowed_keys: set | None = None) -> tuple[dict, dict]:
    """Aggregates replicate rows of one source per key.

    Returns ({key: profile float32 [dim] (may hold NaN)}, counts). Non-finite entries count as NaN;
    a row whose NaN fraction exceeds max_nan_fraction is dropped; rows whose key is not in
    `allowed_keys` (when given) are counted as not in the corpus.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    values = table.values.astype(np.float32, copy=True)
    n_inf = int(np.isinf(values).sum())
    values[~np.isfinite(values)] = np.nan
    nan_frac = np.isnan(values).mean(axis=1) if values.shape[1] else np.zeros(len(values))
    groups: dict = {}
    counts = {"rows": len(values), "inf_entries": n_inf, "dropped_nan_rows": 0, "not_in_corpus": 0}
    for i, key in enumerate(table.keys):
        if nan_frac[i] > max_nan_fraction:
            counts["dropped_nan_rows"] += 1
            continue
        if allowed_keys is not None and key not in allowed_keys:
            counts["not_in_corpus"] += 1
            continue
        groups.setdefault(key, []).append(i)
    out = {key: _aggregate(values[idx], aggregate) for key, idx in groups.items()}
    counts["molecules"] = len(out)
    counts["replicate_rows_merged"] = sum(len(idx) - 1 for idx in groups.values())
    return out, counts


def assemble(structures: Sequence[tuple], modality_sources: dict, join: str = "inchikey14",
             aggregate: str = "median", max_nan_fraction: float = 0.5,
             settings: featurize.FeaturizerSettings = featurize.FeaturizerSettings(),
             cache_dir=None, exclude_keys: set | None = None, n_workers: int | None = None,
             gene_edges: np.ndarray | None = None, name: str = "corpus",
             expected_dims: dict | None = None, verbose: bool = True, exclusion: dict | None = None,
             keys_of=None) -> Corpus:
    """Builds a Corpus.

    structures: (smiles, origin) pairs of molecules to include even without profiles (e.g. the
        benchmarks), or (smiles, origin, join key) when the caller already computed the `join` keys
        (read_paper_layout does); profile tables add their own molecules.
    modality_sources: {modality: [ProfileTable, ...]} concatenated in the given order.
    exclude_keys: join keys never to include (the leakage guard: a benchmark's test molecules).
    expected_dims: {modality: dim} from the config; a mismatch is an error naming the sources.
    exclusion: what exclude_keys came from (prepare.exclusion_keys), kept in the manifest.
    keys_of: what computes join keys of structures given without one (default featurize.keys_of_smiles).
    """
    plan = plan_molecules(structures, modality_sources, join, exclude_keys, n_workers, keys_of)

    # 2. Featurize; molecules the featurizer rejects leave the corpus with their profiles.
    feats = featurize.featurize_smiles(plan.smiles, settings, cache_dir, name, n_workers,
                                       show_progress=verbose, verbose=verbose)
    keys, smiles, modalities, manifest = finish(plan, feats.rows, len(feats.rejects), modality_sources, aggregate,
                                                max_nan_fraction, settings, name, expected_dims, exclusion)
    return Corpus(keys=keys, smiles=smiles, features=feats, modalities=modalities, manifest=manifest,
                  gene_edges=gene_edges)


@dataclasses.dataclass
class MoleculePlan:
    """The corpus' candidate molecules before featurization, the same on every process that builds it:
    join keys in corpus order (structures before profiles, first SMILES seen per key, excluded keys out)
    and the structure of each (the featurizer's input list, row i for order[i])."""
    join: str
    order: list
    smiles: list
    counts: dict
    origin_keys: dict
    start: float


def plan_molecules(structures: Sequence[tuple], modality_sources: dict, join: str = "inchikey14",
                   exclude_keys: set | None = None, n_workers: int | None = None, keys_of=None) -> MoleculePlan:
    """Step 1 of `assemble`: the molecule list (deterministic: a function of the inputs only)."""
    if join not in JOIN_KEYS:
        raise ValueError(f"join key must be one of {JOIN_KEYS}, got {join!r}")
    start = time.perf_counter()
    exclude_keys = set(exclude_keys or ())
    counts: dict = {"structures_in": len(structures), "structures_unparsable": 0, "excluded_leakage": 0}

    # 1. The molecule list: the first SMILES seen for each key, structures before profiles.
    order: list = []
    smiles_of: dict = {}
    origin_keys: dict = {}
    keys_for_structures = [s[2] if len(s) > 2 else None for s in structures]
    todo = [i for i, k in enumerate(keys_for_structures) if k is None]
    if todo:
        for i, key in zip(todo, (keys_of or featurize.keys_of_smiles)([structures[i][0] for i in todo], join, n_workers)):
            keys_for_structures[i] = key
    excluded = set()
    for (smiles, origin, *_), key in zip(structures, keys_for_structures):
        if not key:
            counts["structures_unparsable"] += 1
            continue
        if key in exclude_keys:
            excluded.add(key)
            continue
        origin_keys.setdefault(origin, set()).add(key)
        if key not in smiles_of:
            smiles_of[key] = smiles
            order.append(key)
    lost_rows: dict = {}   # profile rows (replicates) of excluded molecules, per modality
    for modality, tables in modality_sources.items():
        for table in tables:
            for key, smiles in zip(table.keys, table.smiles):
                if key in exclude_keys:
                    excluded.add(key)
                    lost_rows[modality] = lost_rows.get(modality, 0) + 1
                    continue
                if key not in smiles_of and smiles:
                    smiles_of[key] = smiles
                    order.append(key)
    counts["excluded_leakage"] = len(excluded)
    counts["excluded_profile_rows"] = {m: lost_rows.get(m, 0) for m in modality_sources}
    return MoleculePlan(join, order, [smiles_of[k] for k in order], counts, origin_keys, start)


def finish(plan: MoleculePlan, rows, n_rejects: int, modality_sources: dict, aggregate: str = "median",
           max_nan_fraction: float = 0.5, settings: featurize.FeaturizerSettings = featurize.FeaturizerSettings(),
           name: str = "corpus", expected_dims: dict | None = None, exclusion: dict | None = None):
    """Step 3 of `assemble`, given the plan's rows the featurizer accepted (ascending): (keys, smiles,
    modalities, manifest) of the corpus, molecule i being plan row rows[i]."""
    join, order, counts, origin_keys, start = plan.join, plan.order, dict(plan.counts), plan.origin_keys, plan.start
    keys = np.array([order[r] for r in rows], dtype=str)
    counts["featurize_rejects"] = int(n_rejects)
    index = {k: i for i, k in enumerate(keys)}
    corpus_keys = set(index)
    n = len(keys)

    # 3. Modalities.
    modalities, modality_counts = {}, {}
    for modality, tables in modality_sources.items():
        if not tables:
            raise CorpusError(f"modality {modality!r} has no source files; check the corpus config")
        parts, names, avail_any, source_counts = [], [], np.zeros(n, bool), {}
        for table in tables:
            profiles, c = aggregate_table(table, aggregate, max_nan_fraction, corpus_keys)
            c["skipped_by_importer"] = len(table.skipped)
            dim = table.values.shape[1]
            block = np.full((n, dim), np.nan, np.float32)
            for key, prof in profiles.items():
                block[index[key]] = prof
                avail_any[index[key]] = True
            parts.append(block)
            names += list(table.feature_names)
            source_counts[table.source] = c
        values = np.concatenate(parts, axis=1)
        if expected_dims and modality in expected_dims and values.shape[1] != expected_dims[modality]:
            raise CorpusError(
                f"modality {modality!r}: sources {[t.source for t in tables]} give {values.shape[1]} "
                f"columns but the config says dim={expected_dims[modality]}; fix the config or the files")
        # Missing entries of observed molecules: the other source's block, NaN cells. Column mean.
        observed_rows = values[avail_any]
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            col_mean = np.nanmean(observed_rows, axis=0) if len(observed_rows) else np.zeros(values.shape[1])
        col_mean = np.nan_to_num(col_mean).astype(np.float32)
        holes = np.isnan(values) & avail_any[:, None]
        values = np.where(holes, col_mean[None, :], values)
        values[~avail_any] = 0.0
        modalities[modality] = Modality(values=values.astype(np.float32), available=avail_any,
                                        feature_names=names, sources=[t.source for t in tables])
        modality_counts[modality] = {"observed": int(avail_any.sum()), "fraction": float(avail_any.mean()) if n else 0.0,
                                     "dim": int(values.shape[1]), "imputed_entries": int(holes.sum()),
                                     "source_counts": source_counts}
        if not avail_any.any():
            print(f"[corpus] warning: modality {modality!r} has no observed molecule in this corpus "
                  "(it will be 100% missing)", file=sys.stderr)

    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "created_unix": int(time.time()),
        "join": join, "aggregate": aggregate, "max_nan_fraction": max_nan_fraction,
        "featurizer": dataclasses.asdict(settings), "molecules": n, "counts": counts,
        "modalities": {m: {**modality_counts[m], "feature_names": modalities[m].feature_names,
                           "sources": modalities[m].sources} for m in modalities},
        "origins": {o: len(k & corpus_keys) for o, k in origin_keys.items()},
        "exclusion": exclusion,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return keys, np.array([plan.smiles[r] for r in rows], dtype=str), modalities, manifest


def overlap_table(corpus: Corpus, groups: dict) -> list[dict]:
    """For each named group of join keys (e.g. a benchmark's molecules): how many are in the corpus
    and how many of those have each modality observed."""
    index = corpus.index_of()
    rows = []
    for group, keys in groups.items():
        present = [index[k] for k in set(keys) if k in index]
        row = {"group": group, "molecules": len(set(keys)), "in_corpus": len(present)}
        for name, m in corpus.modalities.items():
            row[name] = int(m.available[present].sum()) if present else 0
        rows.append(row)
    return rows


def summary_rows(corpus: Corpus) -> list[dict]:
    rows = [{"modality": "(molecules)", "dim": "-", "observed": len(corpus), "fraction": "100.0%"}]
    for name, m in corpus.modalities.items():
        rows.append({"modality": name, "dim": m.dim, "observed": int(m.available.sum()),
                     "fraction": f"{m.available.mean():.1%}" if len(corpus) else "-"})
    return rows
