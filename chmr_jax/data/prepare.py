"""Dataset preparation: load, featurize (cached), split (cached), optional 3D; one call per dataset.

`prepare_benchmark` / `prepare_csv` return a `PreparedDataset` that later stages (fine-tuning,
corpus building) consume; the `chmr-jax prepare` command prints one table row per dataset.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

from chmr_jax.data import datasets, featurize, geometry as geometry_lib, paths, splits


@dataclasses.dataclass
class PreparedDataset:
    dataset: datasets.MoleculeDataset
    features: featurize.MoleculeFeatures      # accepted molecules; features.rows index dataset rows
    split: dict                               # 'train'/'valid'/'test' -> dataset row indices
    geometry: geometry_lib.GeometryFeatures | None  # aligned with features (one row per accepted molecule)
    seconds: float
    rejects_file: Path | None = None          # the rejects CSV (row, smiles, reason), when there are rejects

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
            geometry_settings: geometry_lib.GeometrySettings = geometry_lib.GeometrySettings(),
            n_workers: int | None = None, show_progress: bool = True, check_split: bool = True) -> PreparedDataset:
    """Featurizes and splits `ds` (a user CSV over its accepted molecules; check_split: every part
    must hold a labelled molecule, see check_labelled_parts).

    geometry: 'none'; 'rdkit3d' (ETKDG + RDKit 3D descriptors); or a path to a user-supplied
    per-molecule matrix keyed by the 14-char InChIKey block (see data/geometry.py: load_external_matrix),
    e.g. Uni-Mol embeddings. Molecules without a row are flagged (ok=False).
    """
    start = time.perf_counter()
    feats = featurize.featurize_smiles(ds.smiles, settings, cache_dir, ds.name, n_workers, show_progress)
    rejects_file = None
    if cache_dir is not None and feats.rejects:
        # One numbering for every rejects list (prepare, embed's manifest, embed_smiles): the 0-based data row,
        # header excluded. Written again on a cache hit: a list cached before named file lines.
        key = featurize.cache_key([str(x) for x in ds.smiles], dataclasses.asdict(settings), "molecule")
        rejects_file = Path(cache_dir) / f"{ds.name}-{key}.rejects.csv"
        featurize.write_rejects(rejects_file, feats.rejects)
    kind = split_kind or ds.default_split
    if ds.split_over_accepted:
        # A user CSV is split over the molecules that featurized: a rejected row must not take a slot
        # (it could be the test part's only row). The split still holds dataset row indices.
        over_accepted = splits.load_or_make_split(feats.smiles, kind, cache_dir, ds.name, n_workers=n_workers)
        split = {part: feats.rows[idx] for part, idx in over_accepted.items()}
    else:   # a benchmark: its protocol's split over every row, as published
        split = splits.load_or_make_split(ds.smiles, kind, cache_dir, ds.name, n_workers=n_workers)
    if check_split:
        check_labelled_parts(ds, split, kind, len(feats))
    geo = geometry_features(feats.smiles, feats.keys, geometry, geometry_settings, cache_dir, ds.name,
                            n_workers, show_progress)
    return PreparedDataset(ds, feats, split, geo, time.perf_counter() - start, rejects_file)


def check_labelled_parts(ds: datasets.MoleculeDataset, split: dict, kind: str, n_accepted: int) -> None:
    """A split part without one labelled molecule cannot be trained or scored (its score would be NaN):
    a one-line error naming the part, before any work depends on it."""
    for part in ("train", "valid", "test"):
        if not np.isfinite(ds.labels[split[part]]).any():
            raise ValueError(f"{ds.source}: the {part} part of the {kind} split has no labelled molecule "
                             f"({len(split[part])} of {n_accepted} accepted molecules); use "
                             "--config.split=random (finetune) or --split random (prepare), or more data")
    if ds.split_over_accepted:   # a user CSV: each of its tasks must be scorable too (benchmarks keep their protocol)
        for part in ("train", "valid", "test"):
            empty = [t for j, t in enumerate(ds.task_names) if not np.isfinite(ds.labels[split[part], j]).any()]
            if empty:
                raise ValueError(f"{ds.source}: task column {empty[0]!r} has no label in the {part} part of the {kind} "
                                 f"split ({len(split[part])} molecules){f' (and {len(empty) - 1} more column(s): {empty[1:4]})' if len(empty) > 1 else ''}; "
                                 "label more molecules, leave the column out (--task_columns / --config.task_columns) "
                                 "or use another split (--split / --config.split)")


def geometry_features(smiles, keys, geometry: str, settings: geometry_lib.GeometrySettings, cache_dir,
                      name: str, n_workers=None, show_progress=True) -> geometry_lib.GeometryFeatures | None:
    """The 3D modality of molecules (smiles, join keys): None for 'none'; ETKDG + RDKit 3D
    descriptors for 'rdkit3d'; else rows of a user matrix file keyed by join key (missing: ok=False)."""
    if geometry == "none":
        return None
    if geometry == "rdkit3d":
        return geometry_lib.featurize_geometry(smiles, settings, cache_dir, name, n_workers, show_progress)
    shown = geometry   # (a gs:// matrix is read from its verified local copy but named by its URL)
    if paths.is_remote(geometry):
        geometry = str(paths.local_file(geometry, "geometry"))
    if not os.path.exists(geometry):
        raise ValueError(f"geometry must be 'rdkit3d', 'none' or an existing matrix file; "
                         f"{geometry!r} does not exist")
    try:
        values, available = geometry_lib.load_external_matrix(geometry, keys)
    except ValueError as e:
        raise ValueError(str(e).replace(geometry, shown)) from None
    return geometry_lib.GeometryFeatures(
        values=values, ok=available, names=[f"external_{i}" for i in range(values.shape[1])],
        reasons=[(int(i), f"no row for key {keys[i]} in {shown}") for i in np.nonzero(~available)[0]])


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no datasets)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).rjust(widths[c]) if c != "dataset" else str(r[c]).ljust(widths[c])
                               for c in cols)
    header = line({c: c for c in cols})
    return "\n".join([header, "-" * len(header)] + [line(r) for r in rows])


# ---- pretraining corpora ------------------------------------------------------------------------

CORPUS_KINDS = ("reachable", "paper", "synthetic")


def parse_modality_spec(spec: str) -> list[list[str]]:
    """'A+B,C' -> [[A, B], [C]]: ',' concatenates sources' columns, '+' stacks sources' rows
    (same features, aligned by name)."""
    return [[s.strip() for s in block.split("+") if s.strip()] for block in spec.split(",") if block.strip()]


def _reachable_sources(data_dir, join: str, dose: str) -> dict:
    """The real profile files reachable offline, as ProfileTables by source name."""
    from chmr_jax.data import profiles, registry
    lookup = profiles.read_repurposing_samples(
        registry.fetch("cellpainting_plate", "repurposing_samples_20200324.txt", data_dir))
    return {
        "l1000_consensus": lambda: profiles.read_l1000_consensus(
            registry.fetch("l1000_drugbank", "consensi-drugbank.tsv.gz", data_dir),
            registry.fetch("l1000_drugbank", "drugbank_structures.tsv", data_dir), join, "l1000_consensus"),
        "l1000_plate": lambda: profiles.read_l1000_plate(
            registry.fetch("l1000_plate", "LJP005_A375_24H_X1_B19_level3.gct", data_dir), lookup, join,
            dose, "l1000_plate"),
        "cellpainting_plate": lambda: profiles.read_cellprofiler_plate(
            registry.fetch("cellpainting_plate", "SQ00015054_normalized_feature_select.csv.gz", data_dir),
            lookup, join, dose, "cellpainting_plate"),
    }


def benchmark_keys(names, join: str, data_dir, cache_dir, n_workers=None) -> dict:
    """{benchmark: join keys of its parseable rows}."""
    out = {}
    for name in names:
        ds = datasets.load_benchmark(name, data_dir, cache_dir, n_workers)
        keys = ds.keys if join == "inchikey14" else featurize.keys_of_smiles(ds.smiles, join, n_workers)
        out[name] = [k for k in keys if k]
    return out


def excluded_benchmarks(spec: str) -> list[str]:
    """The benchmark part of corpus.exclude: '' (none), 'all' (the nine benchmarks) or a comma list of
    benchmarks (items that are not benchmark names are CSV files: exclusion_items)."""
    return exclusion_items(spec)[0]


def exclude_spec(cfg) -> str:
    """config.corpus's exclusion list: `exclude` and the older `exclude_test_of`, read the same way."""
    return ",".join(s for s in (cfg.get("exclude", ""), cfg.get("exclude_test_of", "")) if s)


def exclusion_items(spec: str) -> tuple[list[str], list[str]]:
    """(benchmarks, CSV files) named by corpus.exclude: 'all' (the nine benchmarks), benchmark names and
    CSV files of SMILES (any user's evaluation set), comma separated. A name that is neither a benchmark
    nor a .csv[.gz] file is an error naming it."""
    from chmr_jax import config_util
    benchmarks, csvs = [], []
    for item in config_util.parse_list(spec):
        if item == "all":
            benchmarks += [b for b in datasets.ALL_BENCHMARKS if b not in benchmarks]
        elif item in datasets.ALL_BENCHMARKS:
            if item not in benchmarks:
                benchmarks.append(item)
        elif item.lower().endswith((".csv", ".csv.gz")):
            csvs.append(item)
        else:
            import difflib
            close = difflib.get_close_matches(item, list(datasets.ALL_BENCHMARKS), n=1)
            raise ValueError(f"corpus.exclude (--exclude_test): {item!r} is neither a benchmark nor a .csv file"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; choose from {list(datasets.ALL_BENCHMARKS)}, 'all', or name a CSV of SMILES")
    return benchmarks, csvs


def test_split_keys(benchmark: str, join: str, data_dir, cache_dir, n_workers=None, split_kind: str | None = None) -> set:
    """Join keys of a benchmark's test split: the split it is evaluated with (`split_kind`, the same
    value as finetune's config.split; None or '' = the benchmark's default protocol)."""
    ds = datasets.load_benchmark(benchmark, data_dir, cache_dir, n_workers)
    split = splits.load_or_make_split(ds.smiles, split_kind or ds.default_split, cache_dir, ds.name,
                                      n_workers=n_workers)
    test_smiles = [ds.smiles[i] for i in split["test"]]
    keys = [ds.keys[i] for i in split["test"]] if join == "inchikey14" else \
        featurize.keys_of_smiles(test_smiles, join, n_workers)
    return {k for k in keys if k}


def csv_keys(path, column: str, join: str, n_workers=None) -> set:
    """Join keys of every molecule of a CSV (its SMILES column `column`, matched exactly): a user's
    evaluation set to keep out of the corpus. Unparsable SMILES have no key and are skipped."""
    local = paths.local_file(path, "corpus.exclude")
    if not local.is_file():
        raise FileNotFoundError(f"corpus.exclude (--exclude_test): {path}: no such file")
    with datasets.open_csv(local) as (header, reader):
        if column not in header:
            raise ValueError(f"corpus.exclude: {path} has no column {column!r} (columns: {header}); "
                             "set corpus.exclude_smiles_column")
        col = header.index(column)
        smiles = [row[col] for row in reader if len(row) > col and row[col].strip()]
    return {k for k in featurize.keys_of_smiles(smiles, join, n_workers) if k}


def exclusion_keys(cfg, join: str, data_dir, cache_dir, n_workers=None) -> tuple[set, dict]:
    """(join keys to leave out of the corpus, what they came from) for config.corpus: `exclude` (and
    the older `exclude_test_of`, read the same way). Benchmarks contribute their test split under
    `exclude_split` (the split the benchmarks will be evaluated with: '' = each one's default
    protocol, or e.g. 'key_scaffold'); CSV files every molecule."""
    benchmarks, csvs = exclusion_items(exclude_spec(cfg))
    split_kind = cfg.get("exclude_split", "") or None
    keys, report = set(), {"benchmarks": benchmarks, "split": split_kind or "default", "csv": {}}
    for benchmark in benchmarks:
        keys |= test_split_keys(benchmark, join, data_dir, cache_dir, n_workers, split_kind)
    for path in csvs:
        found = csv_keys(path, cfg.get("exclude_smiles_column", "smiles"), join, n_workers)
        report["csv"][str(path)] = len(found)
        keys |= found
    report["keys"] = len(keys)
    return keys, report


def corpus_settings_digest(cfg, settings: featurize.FeaturizerSettings) -> str:
    """16 hex digits of what defines the corpus `cfg` (config.corpus) describes: its settings and the
    featurizer's (pretraining's cache key, and the records manifest's settings_digest)."""
    import hashlib
    import json

    from chmr_jax.data import registry
    # dims are expectations checked by pretrain.validate(), not inputs: they do not change the corpus.
    spec = {"corpus": {k: v for k, v in cfg.to_dict().items() if k not in ("dims", "saved")},
            "featurize": dataclasses.asdict(settings)}
    # An evaluation set named by file is edited in place under the same name: its content keys the corpus.
    csvs = exclusion_items(exclude_spec(cfg))[1]
    if csvs:
        spec["exclude_csv_sha256"] = [registry.sha256_of(paths.local_file(c, "corpus.exclude")) for c in csvs]
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_corpus(cfg, settings: featurize.FeaturizerSettings = featurize.FeaturizerSettings(),
                 data_dir=None, cache_dir=None, n_workers=None, verbose=True):
    """Builds the pretraining corpus described by `cfg` (config.corpus; see configs/default.py) in this
    process (records.build builds it in shares, one per process)."""
    from chmr_jax.data import corpus as corpus_lib
    return corpus_lib.assemble(**corpus_inputs(cfg, settings, data_dir, cache_dir, n_workers), verbose=verbose)


def _write_layout_atomically(root: Path, write) -> None:
    """write(folder) into a fresh folder beside `root`, then renamed to it: the processes of a multi-host run
    all generate the (deterministic) synthetic layout into one shared cache at once, and none may read files
    that another is still writing. The first rename wins; the others' copies are dropped."""
    import shutil
    import tempfile
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + ".tmp"))
    try:
        write(tmp)
        try:
            os.rename(tmp, root)       # (onto nothing or an empty folder)
        except OSError:
            if (root / "L1k_idmaps.csv").exists():   # another process' complete layout: keep it
                return
            shutil.rmtree(root, ignore_errors=True)   # an interrupted write of older code
            os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def corpus_inputs(cfg, settings: featurize.FeaturizerSettings = featurize.FeaturizerSettings(),
                  data_dir=None, cache_dir=None, n_workers=None, keys_of=None) -> dict:
    """corpus.assemble's arguments for the corpus `cfg` describes (the profile tables read whole: reading
    and aggregating them is cheap next to featurizing the molecules). keys_of: what computes the join keys
    of the paper layout's structures and of the benchmarks' (default featurize.keys_of_smiles; a
    records.Share's keys_of_smiles has each process compute its share)."""
    from chmr_jax.data import profiles, synthetic

    kind = cfg.kind
    if kind not in CORPUS_KINDS:
        raise ValueError(f"corpus kind must be one of {CORPUS_KINDS}, got {kind!r}")
    join = cfg.join
    structures, gene_edges = [], None
    if kind == "reachable":
        available = _reachable_sources(data_dir, join, cfg.dose)
    else:
        root = cfg.path
        if root and paths.is_remote(root):   # gs://.../raw: read from its local mirror (downloaded once)
            root = paths.pull(root, "config.corpus.path", prune=True)
        if kind == "synthetic":
            dims = dict(cfg.get("synthetic_dims") or {}) or None
            tag = "" if not dims else "-d" + "-".join(f"{k}{v}" for k, v in sorted(dims.items()))
            root = Path(cache_dir) / f"synthetic-layout-n{cfg.synthetic_molecules}-s{cfg.synthetic_seed}{tag}"
            if not (root / "L1k_idmaps.csv").exists():
                full = {**profiles.PAPER_MODALITIES, **dims} if dims else None
                _write_layout_atomically(root, lambda where: synthetic.write_synthetic_paper_layout(
                    where, cfg.synthetic_molecules, cfg.synthetic_seed, dims=full))
        if not root:
            raise ValueError("corpus.kind='paper' needs corpus.path: the directory holding structure.csv.gz "
                             "and the <NAME>.csv.gz / <NAME>_feature.npz files (pretrain.zip's raw/)")
        names = sorted({s for spec in cfg.modalities.values() for block in parse_modality_spec(spec) for s in block})
        structures, tables, gene_edges, _ = profiles.read_paper_layout(root, names, join, n_workers=n_workers,
                                                                       keys_of=keys_of)
        available = {name: (lambda t=t: t) for name, t in tables.items()}
    if cfg.include_benchmarks:
        for name in datasets.ALL_BENCHMARKS:
            ds = datasets.load_benchmark(name, data_dir, cache_dir, n_workers)
            if join == "inchikey14":   # (the dataset's keys, computed and cached with it: not again)
                structures += [(s, name, str(k)) for s, k in zip(ds.smiles, ds.keys)]
            else:
                structures += [(s, name) for s in ds.smiles]

    loaded: dict = {}
    modality_sources = {}
    for modality, spec in cfg.modalities.items():
        blocks = []
        for block in parse_modality_spec(spec):
            unknown = [s for s in block if s not in available]
            if unknown:
                raise ValueError(f"corpus modality {modality!r} names unknown sources {unknown}; "
                                 f"available for kind={kind!r}: {sorted(available)}")
            tables = [loaded.setdefault(s, available[s]()) for s in block]
            blocks.append(tables[0] if len(tables) == 1 else profiles.stack_tables(tables, "+".join(block)))
        modality_sources[modality] = blocks
    exclude, exclusion = exclusion_keys(cfg, join, data_dir, cache_dir, n_workers)
    expected = dict(cfg.dims) if "dims" in cfg and cfg.dims else None
    return dict(structures=structures, modality_sources=modality_sources, join=join, aggregate=cfg.aggregate,
                max_nan_fraction=cfg.max_nan_fraction, settings=settings, cache_dir=cache_dir, exclude_keys=exclude,
                n_workers=n_workers, gene_edges=gene_edges, name=f"corpus-{kind}", expected_dims=expected,
                exclusion=exclusion if exclude else None, keys_of=keys_of)
