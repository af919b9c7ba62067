"""Importers that turn real profile files into `corpus.ProfileTable`s, and the paper's corpus layout.

  read_gct                    GCT 1.3 (row metadata, column metadata, matrix)
  read_l1000_consensus        consensus signature tables (rows = compounds, columns = Entrez ids)
                              with structures given as InChI (dhimmel/lincs + DrugBank)
  read_l1000_plate            a level-3 GCT plate, robust-z-scored per probe against the plate's
                              DMSO wells, wells of a compound aggregated later as replicates
  read_repurposing_samples    Drug Repurposing Hub samples: broad_id -> SMILES
  read_cellprofiler_plate     per-well CellProfiler / pycytominer CSV (Metadata_* columns)
  read_paper_layout           InfoAlign/CHMR raw_data/pretrain/raw (structure.csv.gz, <NAME>.csv.gz +
                              <NAME>_feature.npz, optional G-G.csv.gz and L1k_idmaps.csv)
  stack_tables                rows of several sources with the same features (aligned by name)
  read_gene_network           gene-gene edges from Hetionet's sif or a source_id,target_id table
A generated corpus in the paper's layout (synthetic values) is synthetic.py.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import featurize, paths
from chmr_jax.data.corpus import CorpusError, ProfileTable

PAPER_MODALITIES = {"CP-Bray": 1783, "CP-JUMP": 966, "G-CRISPR": 1111, "G-ORF": 862, "GE": 978}
PAPER_ROW_ID = {"CP-Bray": "cell_bid", "CP-JUMP": "cell_jid", "G-CRISPR": "ncbi_gene_id",
                "G-ORF": "ncbi_gene_id", "GE": "express_id"}
MISSING_TOKENS = {"", "nan", "NaN", "NA", "N/A", "-666"}


def _open_text(path: Path):
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"{path}: no such file")
    return paths.open_text(path)


def _float(cell: str) -> float:
    return float("nan") if cell.strip() in MISSING_TOKENS else float(cell)


# ---- GCT -------------------------------------------------------------------------------------------

def read_gct(path) -> tuple[dict, dict, np.ndarray]:
    """GCT 1.3 -> (row metadata {field: [n_rows]}, column metadata {field: [n_cols]} incl. 'id',
    matrix float32 [n_rows, n_cols])."""
    path = Path(path)
    with _open_text(path) as fh:
        version = fh.readline().strip()
        if version != "#1.3":
            raise CorpusError(f"{path}: expected a GCT 1.3 file (first line '#1.3'), got {version!r}")
        try:
            n_rows, n_cols, n_rmeta, n_cmeta = (int(x) for x in fh.readline().split())
        except ValueError:
            raise CorpusError(f"{path}, line 2: expected 4 integers (rows cols row-meta col-meta)") from None
        header = fh.readline().rstrip("\n").split("\t")
        if len(header) != 1 + n_rmeta + n_cols:
            raise CorpusError(f"{path}, line 3: {len(header)} fields, expected {1 + n_rmeta + n_cols}")
        col_meta = {"id": header[1 + n_rmeta:]}
        for i in range(n_cmeta):
            fields = fh.readline().rstrip("\n").split("\t")
            col_meta[fields[0]] = fields[1 + n_rmeta:]
        row_meta = {name: [] for name in header[:1 + n_rmeta]}
        matrix = np.empty((n_rows, n_cols), np.float32)
        for i in range(n_rows):
            fields = fh.readline().rstrip("\n").split("\t")
            if len(fields) != len(header):
                raise CorpusError(f"{path}, line {4 + n_cmeta + i}: {len(fields)} fields, expected {len(header)}")
            for name, value in zip(header[:1 + n_rmeta], fields):
                row_meta[name].append(value)
            try:
                matrix[i] = [_float(x) for x in fields[1 + n_rmeta:]]
            except ValueError as err:
                raise CorpusError(f"{path}, line {4 + n_cmeta + i}: {err}") from None
    return row_meta, col_meta, matrix


# ---- structures -----------------------------------------------------------------------------------

def read_repurposing_samples(path) -> dict:
    """Drug Repurposing Hub samples file -> {broad_id: smiles, pert_id (13 chars): smiles}."""
    lookup: dict = {}
    with _open_text(path) as fh:
        lines = [line for line in fh if not line.startswith("!")]
    reader = csv.DictReader(lines, delimiter="\t")
    if not reader.fieldnames or "broad_id" not in reader.fieldnames or "smiles" not in reader.fieldnames:
        raise CorpusError(f"{path}: expected tab-separated columns broad_id and smiles after '!' header lines")
    for row in reader:
        smiles = (row.get("smiles") or "").strip()
        if not smiles:
            continue
        lookup.setdefault(row["broad_id"], smiles)
        lookup.setdefault(row["broad_id"][:13], smiles)
    return lookup


def _resolve(ids: Sequence[str], lookup: dict) -> str | None:
    for i in ids:
        if i and i in lookup:
            return lookup[i]
        if i and i[:13] in lookup:
            return lookup[i[:13]]
    return None


# ---- L1000 ----------------------------------------------------------------------------------------

def read_l1000_consensus(signatures_path, structures_path, join: str = "inchikey14",
                         source: str | None = None) -> ProfileTable:
    """Consensus signatures (TSV: 'perturbagen' then Entrez gene id columns) joined to structures
    (TSV with drugbank_id and inchi) through the perturbagen id."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    structures = {}
    with _open_text(structures_path) as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        need = {"drugbank_id", "inchi"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise CorpusError(f"{structures_path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["drugbank_id"] in structures:
                raise CorpusError(f"{structures_path}, line {line}: duplicate drugbank_id {row['drugbank_id']}")
            structures[row["drugbank_id"]] = row["inchi"]
    keys, smiles, rows, ids, skipped = [], [], [], [], []
    with _open_text(signatures_path) as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        genes = header[1:]
        seen = set()
        for line, fields in enumerate(reader, start=2):
            pid = fields[0]
            if pid in seen:
                raise CorpusError(f"{signatures_path}, line {line}: duplicate perturbagen {pid}; "
                                  "consensus tables have one row per compound")
            seen.add(pid)
            if len(fields) != len(header):
                raise CorpusError(f"{signatures_path}, line {line}: {len(fields)} fields, header has {len(header)}")
            inchi = structures.get(pid)
            if not inchi:
                skipped.append((pid, "no structure for this perturbagen"))
                continue
            mol = Chem.MolFromInchi(inchi)
            if mol is None or mol.GetNumAtoms() == 0:
                skipped.append((pid, "InChI does not parse"))
                continue
            try:
                values = [_float(x) for x in fields[1:]]
            except ValueError as err:
                raise CorpusError(f"{signatures_path}, line {line}: {err}") from None
            keys.append(featurize.molecule_key(mol, join))
            smiles.append(Chem.MolToSmiles(mol))
            rows.append(values)
            ids.append(pid)
    return ProfileTable(source=source or str(signatures_path), keys=keys, smiles=smiles,
                        values=np.asarray(rows, np.float32).reshape(len(rows), len(genes)),
                        feature_names=genes, row_ids=ids, skipped=skipped)


def robust_z(values: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """(x - median_ctrl) / (1.4826 MAD_ctrl) per row (probe); MAD 0 falls back to the std, then 1."""
    ctrl = values[:, controls]
    med = np.nanmedian(ctrl, axis=1, keepdims=True)
    mad = 1.4826 * np.nanmedian(np.abs(ctrl - med), axis=1, keepdims=True)
    std = np.nanstd(ctrl, axis=1, keepdims=True)
    scale = np.where(mad > 0, mad, np.where(std > 0, std, 1.0))
    return ((values - med) / scale).astype(np.float32)


def _select_dose(doses: np.ndarray, groups: np.ndarray, dose: str) -> np.ndarray:
    """Mask of wells kept: 'all'; 'max' (each compound's highest dose); or a number (that dose)."""
    if dose == "all":
        return np.ones(len(doses), bool)
    if dose == "max":
        keep = np.zeros(len(doses), bool)
        for g in np.unique(groups):
            idx = np.nonzero(groups == g)[0]
            keep[idx[doses[idx] == np.nanmax(doses[idx])]] = True
        return keep
    return np.isclose(doses, float(dose), rtol=1e-3)


def read_l1000_plate(gct_path, structure_lookup: dict, join: str = "inchikey14", dose: str = "all",
                     source: str | None = None) -> ProfileTable:
    """A level-3 L1000 plate: every treated well becomes a profile of robust z-scores against the
    plate's DMSO (ctl_vehicle) wells, columns named by Entrez gene id (pr_gene_id); the wells of
    one compound are replicates, aggregated by the corpus."""
    row_meta, col_meta, matrix = read_gct(gct_path)
    for field in ("pert_id", "pert_type"):
        if field not in col_meta:
            raise CorpusError(f"{gct_path}: column metadata has no {field!r}; needed to find DMSO and compounds")
    pert_type = np.array(col_meta["pert_type"])
    is_dmso = (pert_type == "ctl_vehicle") | (np.char.upper(np.array(col_meta["pert_id"])) == "DMSO")
    if not is_dmso.any():
        raise CorpusError(f"{gct_path}: no DMSO (ctl_vehicle) wells to z-score against")
    z = robust_z(matrix, is_dmso).T                                   # wells x probes
    genes = row_meta.get("pr_gene_id") or row_meta["id"]
    pert_ids = np.array(col_meta["pert_id"])
    doses = np.array([_float(x) for x in col_meta.get("pert_dose", ["nan"] * len(pert_ids))])
    keep = ~is_dmso & _select_dose(doses, pert_ids, dose)
    keys, smiles, rows, ids, skipped = [], [], [], [], []
    for w in np.nonzero(keep)[0]:
        well = col_meta["id"][w]
        s = _resolve([pert_ids[w]], structure_lookup)
        if s is None:
            skipped.append((well, f"no structure for {pert_ids[w]}"))
            continue
        key = featurize.key_of_smiles(s, join)
        if not key:
            skipped.append((well, f"structure of {pert_ids[w]} does not parse"))
            continue
        keys.append(key)
        smiles.append(s)
        rows.append(z[w])
        ids.append(well)
    return ProfileTable(source=source or str(gct_path), keys=keys, smiles=smiles,
                        values=np.asarray(rows, np.float32).reshape(len(rows), len(genes)),
                        feature_names=list(genes), row_ids=ids, skipped=skipped)


# ---- Cell Painting ---------------------------------------------------------------------------------

def read_cellprofiler_plate(path, structure_lookup: dict, join: str = "inchikey14", dose: str = "all",
                            source: str | None = None) -> ProfileTable:
    """Per-well profiles with Metadata_* columns (pycytominer style). DMSO / control wells are
    excluded; each compound well is a profile (wells of one compound are replicates). Structures:
    Metadata_broad_sample (full Broad id) or Metadata_pert_id through `structure_lookup`."""
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader)
        data = list(reader)
    meta = [i for i, h in enumerate(header) if h.startswith("Metadata_")]
    feat = [i for i, h in enumerate(header) if not h.startswith("Metadata_")]
    if not feat:
        raise CorpusError(f"{path}: no feature columns (every column starts with Metadata_)")
    col = {header[i]: i for i in meta}

    def get(row, name):
        return row[col[name]].strip() if name in col else ""

    wells = np.array([get(r, "Metadata_Well") or str(i) for i, r in enumerate(data)])
    broad = [get(r, "Metadata_broad_sample") for r in data]
    pert = [get(r, "Metadata_pert_id") for r in data]
    is_control = np.array([b.upper() == "DMSO" or get(r, "Metadata_pert_type") == "control"
                           or get(r, "Metadata_broad_sample_type") == "control" for b, r in zip(broad, data)])
    doses = np.array([_float(get(r, "Metadata_mmoles_per_liter") or "nan") for r in data])
    compound = np.array([p or b for p, b in zip(pert, broad)])
    keep = ~is_control & _select_dose(doses, compound, dose)
    keys, smiles, rows, ids, skipped = [], [], [], [], []
    for i in np.nonzero(keep)[0]:
        s = _resolve([broad[i], pert[i]], structure_lookup)
        key14 = get(data[i], "Metadata_InChIKey14")
        if s is None and key14 and join == "inchikey14":
            # No SMILES, but the plate's own InChIKey block still joins to a molecule the corpus
            # has from another source (counted as 'not in corpus' if it has none).
            key, s = key14, ""
        elif s is None:
            skipped.append((wells[i], f"no structure for {broad[i] or pert[i]}"))
            continue
        else:
            key = featurize.key_of_smiles(s, join)
        if not key:
            skipped.append((wells[i], f"structure of {broad[i]} does not parse"))
            continue
        try:
            rows.append([_float(data[i][j]) for j in feat])
        except ValueError as err:
            raise CorpusError(f"{path}, line {i + 2} (well {wells[i]}): {err}") from None
        keys.append(key)
        smiles.append(s)
        ids.append(str(wells[i]))
    return ProfileTable(source=source or str(path), keys=keys, smiles=smiles,
                        values=np.asarray(rows, np.float32).reshape(len(rows), len(feat)),
                        feature_names=[header[j] for j in feat], row_ids=ids, skipped=skipped)


def stack_tables(tables: Sequence[ProfileTable], source: str | None = None) -> ProfileTable:
    """Rows of several sources measuring the same features, columns aligned by feature name.
    Different feature sets are an error naming both files and the first differences."""
    first = tables[0]
    names = list(first.feature_names)
    rows, keys, smiles, ids, skipped = [first.values], list(first.keys), list(first.smiles), list(first.row_ids), list(first.skipped)
    for t in tables[1:]:
        if set(t.feature_names) != set(names):
            only_a = sorted(set(names) - set(t.feature_names))[:5]
            only_b = sorted(set(t.feature_names) - set(names))[:5]
            raise CorpusError(f"cannot stack {t.source} ({len(t.feature_names)} features) onto {first.source} "
                              f"({len(names)} features): only in the first {only_a}, only in the second {only_b}")
        order = {n: i for i, n in enumerate(t.feature_names)}
        rows.append(t.values[:, [order[n] for n in names]])
        keys += t.keys
        smiles += t.smiles
        ids += t.row_ids
        skipped += t.skipped
    return ProfileTable(source=source or " + ".join(t.source for t in tables), keys=keys, smiles=smiles,
                        values=np.concatenate(rows), feature_names=names, row_ids=ids, skipped=skipped)


# ---- the paper's layout ------------------------------------------------------------------------------

def read_paper_layout(root, modalities: Sequence[str] | None = None, join: str = "inchikey14",
                      expected_dims: dict | None = None, n_workers: int | None = None, keys_of=None):
    """Reads InfoAlign/CHMR `raw_data/pretrain/raw` as-is.

    Returns (structures [(smiles, 'structure.csv.gz', join key)], {NAME: ProfileTable}, gene_edges [E, 2] str
    or None, l1k_gene_ids [978] str or None). Profile rows are joined to structures through mol_id
    (the first SMILES of each mol_id); rows whose mol_id is unknown or does not parse are skipped
    and counted. keys_of: what computes the join keys (default featurize.keys_of_smiles; records.Share's
    splits the work between processes).
    """
    root = Path(root)
    names = list(modalities or PAPER_MODALITIES)
    structure_path = root / "structure.csv.gz"
    mol_smiles: dict = {}
    with _open_text(structure_path) as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"mol_id", "smiles"} <= set(reader.fieldnames):
            raise CorpusError(f"{structure_path}: expected columns mol_id and smiles, got {reader.fieldnames}")
        for row in reader:
            mol_smiles.setdefault(row["mol_id"], row["smiles"])
    mol_ids = list(mol_smiles)
    mol_key = dict(zip(mol_ids, (keys_of or featurize.keys_of_smiles)([mol_smiles[m] for m in mol_ids], join, n_workers)))
    tables = {}
    for name in names:
        csv_path, npz_path = root / f"{name}.csv.gz", root / f"{name}_feature.npz"
        with _open_text(csv_path) as fh:
            reader = csv.reader(fh)
            header = next(reader)
            rows = list(reader)
        if "mol_id" not in header:
            raise CorpusError(f"{csv_path}: no mol_id column; columns are {header}")
        m_col, id_col = header.index("mol_id"), 0 if header[0] != "mol_id" else 1
        if not npz_path.exists():
            raise CorpusError(f"{npz_path}: no such file (features of {csv_path.name})")
        with np.load(npz_path, allow_pickle=False) as data:
            if "data" not in data:
                raise CorpusError(f"{npz_path}: expected an array named 'data', found {list(data.keys())}")
            values = np.asarray(data["data"], np.float32)
        if values.ndim != 2 or len(values) != len(rows):
            raise CorpusError(f"{npz_path}: 'data' has shape {values.shape} but {csv_path.name} has "
                              f"{len(rows)} rows; the two files must describe the same rows in the same order")
        want = (expected_dims or {}).get(name)
        if want is not None and values.shape[1] != want:
            raise CorpusError(f"{npz_path}: {values.shape[1]} features but {name} should have {want}")
        seen: dict = {}
        keep, keys, smiles, ids, skipped = [], [], [], [], []
        for i, row in enumerate(rows):
            pair = (row[id_col], row[m_col])
            if pair in seen:
                raise CorpusError(f"{csv_path}, lines {seen[pair] + 2} and {i + 2}: duplicate id "
                                  f"{header[id_col]}={row[id_col]} for mol_id={row[m_col]}")
            seen[pair] = i
            key = mol_key.get(row[m_col])
            if row[m_col] not in mol_smiles:
                skipped.append((row[id_col], f"mol_id {row[m_col]} not in structure.csv.gz"))
                continue
            if not key:
                skipped.append((row[id_col], f"structure of {row[m_col]} does not parse"))
                continue
            keep.append(i)
            keys.append(key)
            smiles.append(mol_smiles[row[m_col]])
            ids.append(row[id_col])
        tables[name] = ProfileTable(source=str(csv_path), keys=keys, smiles=smiles, values=values[keep],
                                    feature_names=[f"{name}_{j}" for j in range(values.shape[1])],
                                    row_ids=ids, skipped=skipped)
    gene_edges = l1k = None
    if (root / "G-G.csv.gz").exists():
        with _open_text(root / "G-G.csv.gz") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"source_id", "target_id"} <= set(reader.fieldnames):
                raise CorpusError(f"{root / 'G-G.csv.gz'}: expected columns source_id, target_id")
            gene_edges = np.array([(r["source_id"], r["target_id"]) for r in reader], dtype=str).reshape(-1, 2)
    if (root / "L1k_idmaps.csv").exists():
        with _open_text(root / "L1k_idmaps.csv") as fh:
            l1k = np.array([r["ncbi_gene_id"] for r in csv.DictReader(fh)], dtype=str)
    if l1k is not None and "GE" in tables and tables["GE"].values.shape[1] == len(l1k):
        # GE's columns are the L1000 landmark genes in L1k_idmaps.csv order: name them by Entrez id,
        # so molecule-gene edges of the context graph reach the same gene nodes as G-G.csv.gz.
        tables["GE"].feature_names = [str(g) for g in l1k]
    # The join keys go along, so corpus.assemble does not compute them a second time.
    structures = [(mol_smiles[m], "structure.csv.gz", mol_key[m]) for m in mol_ids]
    return structures, tables, gene_edges, l1k


def read_gene_network(path) -> np.ndarray:
    """Gene-gene edges [E, 2] (str Entrez ids) from Hetionet's layout or a two-column table.

    Accepted: Hetionet's `hetionet-v1.0-edges.sif(.gz)` (tab-separated source, metaedge, target;
    rows whose two ends are `Gene::<id>` are kept, e.g. GiG / GcG / Gr>G), or a CSV/TSV with columns
    source_id and target_id (the paper layout's G-G.csv.gz).
    """
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"gene network file {path} not found (config.pretrain_data.gene_network)")
    with _open_text(path) as fh:
        header = fh.readline().rstrip("\n")
        delim = "\t" if "\t" in header else ","
        cols = header.split(delim)
        edges = []
        if {"source_id", "target_id"} <= set(cols):
            a, b = cols.index("source_id"), cols.index("target_id")
            for line in fh:
                f = line.rstrip("\n").split(delim)
                if len(f) > max(a, b):
                    edges.append((f[a], f[b]))
        elif cols[:3] == ["source", "metaedge", "target"]:
            for line in fh:
                f = line.rstrip("\n").split("\t")
                if len(f) >= 3 and f[0].startswith("Gene::") and f[2].startswith("Gene::"):
                    edges.append((f[0][6:], f[2][6:]))
        else:
            raise CorpusError(f"{path}: expected Hetionet's sif header 'source metaedge target' or columns "
                              f"source_id,target_id; got {cols}")
    return np.array(edges, dtype=str).reshape(-1, 2)
