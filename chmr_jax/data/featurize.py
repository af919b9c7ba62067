"""RDKit featurization of molecules (2D): OGB-compatible graphs, fingerprints, join keys.

Everything here is plain numpy + RDKit (no torch, no OGB package). Results are cached on disk keyed
by the SMILES list and the settings, so a second run loads in well under a second per dataset.

Per accepted molecule:
  graph        node features [n_atoms, 9] (OGB vocabularies 119,5,12,12,10,6,6,2,2), bond features
               [n_edges, 3] (5,6,2), edges in both directions.
  fingerprint  Morgan bits (radius/size configurable, default 2/1024) and MACCS keys (167 bits).
  target       Morgan bits at the reconstruction radius (default 4/1024), the CPR molecule target.
  key          the 14-character InChIKey connectivity block (stereoisomers share it).
Rejected molecules (unparsable, empty, over the atom budget) are kept out of the arrays and written
to a rejects CSV with their row number and reason; nothing disappears silently.
The 3D modality (conformers, 3D descriptors, external matrices) is geometry.py.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from chmr_jax.data import files
from chmr_jax.progress import Progress

FEATURIZE_VERSION = 1  # bump when the feature definitions change; invalidates caches

# OGB's allowable feature lists (ogb.utils.features), reproduced so we need no OGB install.
# Unknown values map to the last entry ("misc"), as OGB's safe_index does.
ATOMIC_NUM = list(range(1, 119)) + ["misc"]
CHIRALITY = ["CHI_UNSPECIFIED", "CHI_TETRAHEDRAL_CW", "CHI_TETRAHEDRAL_CCW", "CHI_OTHER", "misc"]
DEGREE = list(range(11)) + ["misc"]
FORMAL_CHARGE = list(range(-5, 6)) + ["misc"]
NUM_HS = list(range(9)) + ["misc"]
NUM_RADICAL_E = list(range(5)) + ["misc"]
HYBRIDIZATION = ["SP", "SP2", "SP3", "SP3D", "SP3D2", "misc"]
IS_AROMATIC = [False, True]
IS_IN_RING = [False, True]
BOND_TYPE = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", "misc"]
# OGB has no "misc" for stereo; newer RDKit stereo kinds (atropisomers) map to the last entry.
BOND_STEREO = ["STEREONONE", "STEREOZ", "STEREOE", "STEREOCIS", "STEREOTRANS", "STEREOANY"]
IS_CONJUGATED = [False, True]

ATOM_VOCAB_SIZES = (119, 5, 12, 12, 10, 6, 6, 2, 2)
BOND_VOCAB_SIZES = (5, 6, 2)
MACCS_BITS = 167


def _safe_index(options: list, value) -> int:
    try:
        return options.index(value)
    except ValueError:
        return len(options) - 1


def atom_features(atom) -> list[int]:
    """The 9 OGB categorical atom features of an RDKit atom."""
    return [
        _safe_index(ATOMIC_NUM, atom.GetAtomicNum()),
        _safe_index(CHIRALITY, str(atom.GetChiralTag())),
        _safe_index(DEGREE, atom.GetTotalDegree()),
        _safe_index(FORMAL_CHARGE, atom.GetFormalCharge()),
        _safe_index(NUM_HS, atom.GetTotalNumHs()),
        _safe_index(NUM_RADICAL_E, atom.GetNumRadicalElectrons()),
        _safe_index(HYBRIDIZATION, str(atom.GetHybridization())),
        IS_AROMATIC.index(atom.GetIsAromatic()),
        IS_IN_RING.index(atom.IsInRing()),
    ]


def bond_features(bond) -> list[int]:
    """The 3 OGB categorical bond features of an RDKit bond."""
    return [
        _safe_index(BOND_TYPE, str(bond.GetBondType())),
        _safe_index(BOND_STEREO, str(bond.GetStereo())),
        IS_CONJUGATED.index(bond.GetIsConjugated()),
    ]


def mol_to_graph(mol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (node_feats int16 [n, 9], edge_index int32 [e, 2] as (sender, receiver), edge_feats int8 [e, 3]).

    Every bond appears twice, i -> j then j -> i, in RDKit bond order (as OGB's smiles2graph).
    """
    nodes = np.array([atom_features(a) for a in mol.GetAtoms()], dtype=np.int16).reshape(-1, 9)
    edges, feats = [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        f = bond_features(bond)
        edges += [(i, j), (j, i)]
        feats += [f, f]
    edge_index = np.array(edges, dtype=np.int32).reshape(-1, 2)
    edge_feats = np.array(feats, dtype=np.int8).reshape(-1, 3)
    return nodes, edge_index, edge_feats


@dataclasses.dataclass(frozen=True)
class FeaturizerSettings:
    """What defines a featurization (and therefore its cache key)."""
    morgan_radius: int = 2
    morgan_size: int = 1024
    target_radius: int = 4   # CPR reconstruction target (spec §6)
    target_size: int = 1024
    max_atoms: int = 512     # heavier molecules are rejected (they would blow up padding budgets)

    @classmethod
    def from_config(cls, cfg) -> "FeaturizerSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(cfg).items() if k in names})


_MORGAN_CACHE: dict[tuple[int, int], object] = {}


def _morgan_bits(mol, radius: int, size: int) -> np.ndarray:
    from rdkit.Chem import rdFingerprintGenerator
    gen = _MORGAN_CACHE.get((radius, size))
    if gen is None:
        gen = _MORGAN_CACHE[(radius, size)] = rdFingerprintGenerator.GetMorganGenerator(
            radius=radius, fpSize=size)
    return gen.GetFingerprintAsNumPy(mol).astype(np.uint8)


def maccs_bits(mol) -> np.ndarray:
    from rdkit.Chem import MACCSkeys
    fp = MACCSkeys.GenMACCSKeys(mol)
    out = np.zeros(MACCS_BITS, dtype=np.uint8)
    out[list(fp.GetOnBits())] = 1
    return out


def parse_smiles(smiles: str):
    """RDKit molecule or None; RDKit's own error chatter is silenced (we report rejects ourselves)."""
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    if not isinstance(smiles, str):
        return None
    return Chem.MolFromSmiles(smiles.strip())  # an empty cell parses to a molecule with 0 atoms


JOIN_KEYS = ("inchikey14", "inchikey")


def molecule_key(mol, join: str = "inchikey14") -> str:
    """Join key of a parsed molecule: the 14-character InChIKey connectivity block (stereoisomers
    share it) or, with join='inchikey', the full InChIKey.

    When RDKit cannot make an InChI (e.g. dummy atoms '*'), the key is 'SMI' + 11 hex digits of
    the canonical SMILES' sha1: still 14 characters, stable, and never equal to a real InChIKey
    block (those are upper-case letters only).
    """
    from rdkit import Chem
    if join not in JOIN_KEYS:
        raise ValueError(f"join key must be one of {JOIN_KEYS}, got {join!r}")
    try:
        key = Chem.MolToInchiKey(mol)
    except Exception:  # noqa: BLE001  (RDKit raises assorted types for exotic chemistry)
        key = ""
    if key:
        return key[:14] if join == "inchikey14" else key
    return "SMI" + hashlib.sha1(Chem.MolToSmiles(mol).encode()).hexdigest()[:11]


def key_of_smiles(smiles: str, join: str = "inchikey14") -> str:
    """molecule_key of a SMILES, or '' when it does not parse or has no atoms."""
    mol = parse_smiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        return ""
    return molecule_key(mol, join)


def _keys_chunk(args):
    start, smiles, join = args
    return start, [key_of_smiles(s, join) for s in smiles]


def keys_of_smiles(smiles: Sequence[str], join: str = "inchikey14", n_workers: int | None = None,
                   desc: str = "molecule keys") -> list[str]:
    """key_of_smiles for many SMILES, in parallel processes, with progress for long lists."""
    return map_chunks(_keys_chunk, list(smiles), (join,), desc, n_workers, chunk_size=1024,
                      show_progress=len(smiles) > 5000)


def featurize_molecule(smiles: str, settings: FeaturizerSettings) -> dict | str:
    """Features of one molecule, or the reason (a string) why it is rejected."""
    mol = parse_smiles(smiles)
    if mol is None:
        return "unparsable SMILES"
    n_atoms = mol.GetNumAtoms()
    if n_atoms == 0:
        return "empty molecule (no atoms)"
    if n_atoms > settings.max_atoms:
        return f"too many atoms ({n_atoms} > max_atoms={settings.max_atoms})"
    try:
        nodes, edge_index, edge_feats = mol_to_graph(mol)
        return {
            "nodes": nodes, "edge_index": edge_index, "edge_feats": edge_feats,
            "morgan": np.packbits(_morgan_bits(mol, settings.morgan_radius, settings.morgan_size)),
            "maccs": np.packbits(maccs_bits(mol)),
            "target": np.packbits(_morgan_bits(mol, settings.target_radius, settings.target_size)),
            "key": molecule_key(mol),
        }
    except Exception as err:  # noqa: BLE001
        return f"featurization error: {type(err).__name__}: {err}"


def _featurize_chunk(args):
    start, smiles, settings = args
    return start, [featurize_molecule(s, settings) for s in smiles]


@dataclasses.dataclass
class MoleculeFeatures:
    """Featurized molecules of one SMILES list, graphs stored as concatenated ragged arrays.

    rows[i] is the input row of accepted molecule i; node_offsets/edge_offsets [n + 1] delimit
    molecule i's slice of nodes / edges; edge_index holds local atom indices.
    """
    smiles: np.ndarray        # str [n]
    rows: np.ndarray          # int64 [n]
    keys: np.ndarray          # str [n], 14-char InChIKey block ('' if unavailable)
    nodes: np.ndarray         # int16 [total_nodes, 9]
    edge_index: np.ndarray    # int32 [total_edges, 2]
    edge_feats: np.ndarray    # int8 [total_edges, 3]
    node_offsets: np.ndarray  # int64 [n + 1]
    edge_offsets: np.ndarray  # int64 [n + 1]
    morgan: np.ndarray        # uint8 [n, morgan_size / 8] packed bits
    maccs: np.ndarray         # uint8 [n, 21] packed bits
    target: np.ndarray        # uint8 [n, target_size / 8] packed bits
    n_input: int              # number of input rows (accepted + rejected)
    rejects: list             # [(row, smiles, reason)]
    settings: FeaturizerSettings

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.node_offsets)

    @property
    def n_edges(self) -> np.ndarray:
        return np.diff(self.edge_offsets)

    def graph(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(nodes, edge_index, edge_feats) of molecule i."""
        n0, n1 = self.node_offsets[i], self.node_offsets[i + 1]
        e0, e1 = self.edge_offsets[i], self.edge_offsets[i + 1]
        return self.nodes[n0:n1], self.edge_index[e0:e1], self.edge_feats[e0:e1]

    def fingerprints(self, idx=slice(None)) -> np.ndarray:
        """float32 [k, morgan_size + 167]: Morgan bits then MACCS bits (the 1D modality input)."""
        morgan = np.unpackbits(self.morgan[idx], axis=-1, count=self.settings.morgan_size)
        maccs = np.unpackbits(self.maccs[idx], axis=-1, count=MACCS_BITS)
        return np.concatenate([morgan, maccs], axis=-1).astype(np.float32)

    def targets(self, idx=slice(None)) -> np.ndarray:
        """float32 [k, target_size]: Morgan bits at the reconstruction radius."""
        return np.unpackbits(self.target[idx], axis=-1, count=self.settings.target_size).astype(np.float32)

    def row_to_index(self) -> dict[int, int]:
        return {int(r): i for i, r in enumerate(self.rows)}

    def subset(self, idx) -> "MoleculeFeatures":
        """The molecules `idx` (in that order) as a new MoleculeFeatures; rejects are not carried."""
        idx = np.asarray(idx, np.int64)

        def ragged(offsets):
            counts = np.diff(offsets)[idx]
            starts = offsets[:-1][idx]
            # element positions of each chosen molecule's slice, concatenated
            within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            return np.repeat(starts, counts) + within, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

        node_pos, node_offsets = ragged(self.node_offsets)
        edge_pos, edge_offsets = ragged(self.edge_offsets)
        return dataclasses.replace(
            self, smiles=self.smiles[idx], rows=self.rows[idx], keys=self.keys[idx], nodes=self.nodes[node_pos],
            edge_index=self.edge_index[edge_pos], edge_feats=self.edge_feats[edge_pos], node_offsets=node_offsets,
            edge_offsets=edge_offsets, morgan=self.morgan[idx], maccs=self.maccs[idx], target=self.target[idx],
            n_input=len(idx), rejects=[])

    # ---- persistence -------------------------------------------------------------------------
    _ARRAYS = ("smiles", "rows", "keys", "nodes", "edge_index", "edge_feats", "node_offsets",
               "edge_offsets", "morgan", "maccs", "target")

    def save(self, path: Path) -> None:
        meta = {"n_input": self.n_input, "rejects": self.rejects,
                "settings": dataclasses.asdict(self.settings), "version": FEATURIZE_VERSION}
        arrays = {name: getattr(self, name) for name in self._ARRAYS}
        files.atomic_savez(path, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: Path) -> "MoleculeFeatures":
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in cls._ARRAYS}
        return cls(**arrays, n_input=meta["n_input"],
                   rejects=[tuple(r) for r in meta["rejects"]],
                   settings=FeaturizerSettings(**meta["settings"]))


def smiles_digest(smiles: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in smiles:
        h.update(str(s).encode())
        h.update(b"\n")
    return h.hexdigest()


def cache_key(smiles: Sequence[str], settings_dict: dict, kind: str) -> str:
    payload = json.dumps({"smiles": smiles_digest(smiles), "settings": settings_dict,
                          "kind": kind, "version": FEATURIZE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _pool_context():
    # fork is fastest, but forking a process that already started JAX's threads can deadlock.
    return multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")


def map_chunks(fn, items: Sequence, extra: tuple, desc: str, n_workers: int | None,
               chunk_size: int = 256, show_progress: bool = True) -> list:
    """Applies `fn((start, chunk, *extra)) -> (start, results)` over chunks, in parallel processes
    when worthwhile, with a progress bar; returns the concatenated results in input order."""
    n = len(items)
    n_workers = n_workers or os.cpu_count() or 1
    tasks = [(s, list(items[s:s + chunk_size]), *extra) for s in range(0, n, chunk_size)]
    results: list = [None] * len(tasks)
    with Progress(n, desc, unit="mol", enabled=show_progress) as bar:
        if n_workers <= 1 or n < 2 * chunk_size:
            it = map(fn, tasks)
            pool = None
        else:
            pool = _pool_context().Pool(min(n_workers, len(tasks)))
            it = pool.imap_unordered(fn, tasks)
        try:
            for start, out in it:
                results[start // chunk_size] = out
                bar.update(len(out))
        finally:
            if pool is not None:
                pool.terminate()
    return [r for chunk in results for r in chunk]


def featurize_smiles(smiles: Sequence[str], settings: FeaturizerSettings = FeaturizerSettings(),
                     cache_dir: str | os.PathLike | None = None, name: str = "smiles",
                     n_workers: int | None = None, show_progress: bool = True,
                     verbose: bool = True, line_numbers: Sequence[int] | None = None) -> MoleculeFeatures:
    """Featurizes `smiles` (or loads the cached result). See MoleculeFeatures.

    cache_dir: where `<name>-<key>.npz` and `<name>-<key>.rejects.csv` are kept; None = no cache.
    line_numbers: [n] the input file's line of each SMILES: the rejects file then names lines (the
    numbering of the file's other errors) instead of 0-based rows.
    """
    smiles = [str(s) for s in smiles]
    cache_path = rejects_path = None
    if cache_dir is not None:
        key = cache_key(smiles, dataclasses.asdict(settings), "molecule")
        cache_path = Path(cache_dir) / f"{name}-{key}.npz"
        rejects_path = Path(cache_dir) / f"{name}-{key}.rejects.csv"
        if cache_path.exists():
            try:
                return MoleculeFeatures.load(cache_path)
            except Exception as err:  # noqa: BLE001  (a corrupt cache is rebuilt, not fatal)
                print(f"[featurize] cache {cache_path} unreadable ({err}); rebuilding", file=sys.stderr)

    results = map_chunks(_featurize_chunk, smiles, (settings,), f"featurize {name}",
                         n_workers, show_progress=show_progress)
    feats = _assemble(smiles, results, settings)
    if cache_path is not None:
        write_rejects(rejects_path, feats.rejects, line_numbers)
        feats.save(cache_path)
    if verbose and feats.rejects:
        where = f"; see {rejects_path}" if rejects_path else ""
        print(f"[featurize] {name}: {len(feats.rejects)} of {len(smiles)} molecules rejected{where}",
              file=sys.stderr)
    return feats


def _assemble(smiles: list[str], results: list, settings: FeaturizerSettings) -> MoleculeFeatures:
    ok = [(row, r) for row, r in enumerate(results) if isinstance(r, dict)]
    rejects = [(row, smiles[row], r) for row, r in enumerate(results) if isinstance(r, str)]
    n_nodes = np.array([len(r["nodes"]) for _, r in ok], dtype=np.int64)
    n_edges = np.array([len(r["edge_index"]) for _, r in ok], dtype=np.int64)

    def stack(field, shape, dtype):
        return np.concatenate([r[field] for _, r in ok]) if ok else np.zeros(shape, dtype)

    morgan_bytes = -(-settings.morgan_size // 8)
    target_bytes = -(-settings.target_size // 8)
    return MoleculeFeatures(
        smiles=np.array([smiles[row] for row, _ in ok], dtype=str),
        rows=np.array([row for row, _ in ok], dtype=np.int64),
        keys=np.array([r["key"] for _, r in ok], dtype="<U14"),
        nodes=stack("nodes", (0, 9), np.int16),
        edge_index=stack("edge_index", (0, 2), np.int32),
        edge_feats=stack("edge_feats", (0, 3), np.int8),
        node_offsets=np.concatenate([[0], np.cumsum(n_nodes)]).astype(np.int64),
        edge_offsets=np.concatenate([[0], np.cumsum(n_edges)]).astype(np.int64),
        morgan=np.stack([r["morgan"] for _, r in ok]) if ok else np.zeros((0, morgan_bytes), np.uint8),
        maccs=np.stack([r["maccs"] for _, r in ok]) if ok else np.zeros((0, 21), np.uint8),
        target=np.stack([r["target"] for _, r in ok]) if ok else np.zeros((0, target_bytes), np.uint8),
        n_input=len(smiles), rejects=rejects, settings=settings)


def write_rejects(path: Path, rejects: Iterable[tuple], line_numbers: Sequence[int] | None = None) -> None:
    """(row, smiles, reason) per reject; with line_numbers, the row's file line (column 'line')."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["row" if line_numbers is None else "line", "smiles", "reason"])
    writer.writerows(rejects if line_numbers is None else
                     [(int(line_numbers[row]), smi, why) for row, smi, why in rejects])
    files.atomic_write_text(path, buf.getvalue())   # (a killed run leaves no truncated list to upload)
