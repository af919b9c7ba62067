"""A generated corpus in exactly the paper's layout (profiles.read_paper_layout reads it back).

  synthetic_smiles              n distinct valid SMILES enumerated from fragments (deterministic)
  enumerate_smiles              the first n distinct valid canonical SMILES of any candidate stream
  write_synthetic_paper_layout  structure.csv.gz, <NAME>.csv.gz + <NAME>_feature.npz, G-G.csv.gz and
                                L1k_idmaps.csv with values that depend on structure (or on planted
                                per-molecule factors), at the paper's missingness by default
Used by `chmr-jax prepare --corpus synthetic`, the tests, the planted-signal check and the
paper-scale benchmark; nothing here reads real data.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np

from chmr_jax.data import featurize
from chmr_jax.data.profiles import PAPER_MODALITIES, PAPER_ROW_ID


def enumerate_smiles(candidates, n: int, exclude=()) -> list[str]:
    """The first n distinct valid canonical SMILES among `candidates` (an iterable of SMILES strings,
    e.g. fragment products) that are not in `exclude`; an error if there are fewer."""
    from rdkit import Chem
    out, seen = [], set(exclude)
    if n <= 0:
        return out
    for smiles in candidates:
        mol = featurize.parse_smiles(smiles)
        if mol is None:
            continue
        canonical = Chem.MolToSmiles(mol)
        if canonical in seen:
            continue
        seen.add(canonical)
        out.append(canonical)
        if len(out) == n:
            return out
    raise ValueError(f"can enumerate at most {len(out)} synthetic molecules; {n} asked")


def synthetic_smiles(n: int) -> list[str]:
    """n distinct, valid, drug-like-ish SMILES enumerated from fragments (deterministic)."""
    import itertools
    heads = ["", "C", "CC", "CCC", "CC(C)", "CCCC", "OCC", "NCC", "FC", "ClCC"]
    rings = ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCNCC1", "c1ccoc1", "c1ccsc1", "C1CCOC1", "c1cnccn1",
             "c1ccc2ccccc2c1", "C1CC1"]
    links = ["", "C", "CC", "C(=O)N", "OC", "NC(=O)"]
    tails = ["O", "N", "Cl", "F", "C(=O)O", "C#N", "S", "OC", "C(F)(F)F", "c1ccccc1"]
    return enumerate_smiles((f"{h}{r}{link}{t}" for t, link, r, h in itertools.product(tails, links, rings, heads)), n)


def write_synthetic_paper_layout(root, n_molecules: int = 400, seed: int = 0,
                                 dims: dict | None = None, observed: dict | None = None,
                                 replicate_fraction: float = 0.1, n_genes: int = 50, smiles: list | None = None,
                                 factors: np.ndarray | None = None, noise: float = 0.3) -> Path:
    """Writes a small corpus in exactly the paper's layout (see profiles.read_paper_layout) with synthetic
    values that depend on structure (a random projection of Morgan bits plus noise), so that
    structure-aware propagation has signal. Missingness per modality (`observed` fractions)
    defaults to the paper corpus' flavour: GE and the genetic modalities > 90% missing.

    smiles: the molecules (default: `synthetic_smiles(n_molecules)`); factors [n, k]: when given,
    every modality's values are a random linear map of these per-molecule factors plus `noise`
    (the planted-signal corpus, see chmr_jax.downstream.planted) instead of a projection of the bits."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dims = dict(dims or PAPER_MODALITIES)
    observed = {"CP-Bray": 0.35, "CP-JUMP": 0.5, "G-CRISPR": 0.06, "G-ORF": 0.05, "GE": 0.08, **(observed or {})}
    smiles = list(smiles) if smiles is not None else synthetic_smiles(n_molecules)
    n_molecules = len(smiles)
    mol_ids = [f"m{i}" for i in range(n_molecules)]
    with gzip.open(root / "structure.csv.gz", "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["mol_id", "smiles", "inchikey"])
        for m, s in zip(mol_ids, smiles):
            w.writerow([m, s, ""])
    feats = featurize.featurize_smiles(smiles, featurize.FeaturizerSettings(morgan_size=256), None, "synthetic",
                                       n_workers=1, show_progress=False, verbose=False)
    bits = feats.fingerprints()[:, :256]
    for name, dim in dims.items():
        chosen = np.nonzero(rng.random(n_molecules) < observed[name])[0]
        reps = chosen[rng.random(len(chosen)) < replicate_fraction]
        rows = np.concatenate([chosen, reps])
        if factors is None:
            proj = rng.normal(size=(256, dim)).astype(np.float32) / 8
            values = bits[rows] @ proj + noise * rng.normal(size=(len(rows), dim)).astype(np.float32)
        else:
            mix = rng.normal(size=(factors.shape[1], dim)).astype(np.float32) / np.sqrt(factors.shape[1])
            values = factors[rows] @ mix + noise * rng.normal(size=(len(rows), dim)).astype(np.float32)
        id_col = PAPER_ROW_ID.get(name, "row_id")
        with gzip.open(root / f"{name}.csv.gz", "wt", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([id_col, "mol_id"])
            for j, r in enumerate(rows):
                w.writerow([f"{name[:2].lower()}{j}" if id_col != "ncbi_gene_id" else str(1000 + j), mol_ids[r]])
        np.savez(root / f"{name}_feature.npz", data=values.astype(np.float32))
    with gzip.open(root / "G-G.csv.gz", "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source_id", "target_id"])
        for _ in range(3 * n_genes):
            a, b = rng.integers(1000, 1000 + n_genes, size=2)
            if a != b:
                w.writerow([a, b])
    with open(root / "L1k_idmaps.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ncbi_gene_id"])
        for j in range(dims.get("GE", 978)):
            w.writerow([1000 + j])
    return root
