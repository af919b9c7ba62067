"""Train/valid/test splits over dataset rows.

paper_scaffold  CHMR/InfoAlign protocol (chembl2k, broad6k, biogenadme, moltoxcast): isomeric
                Murcko scaffold groups in first-appearance order, the group list shuffled with
                numpy's legacy RNG seeded 3, then cut by row count: train = first int(0.6 N) rows,
                valid = next int(0.15 N), test = the rest (groups may straddle a cut).
ogb_scaffold    OGB / Hu et al. (MoleculeNet): scaffold sets sorted largest first (ties: larger
                last index first), each whole set goes to train while it fits 80%, else valid
                while it fits 90%, else test.
random          a seeded permutation cut 80/10/10 (fractions configurable).

Rows whose SMILES do not parse each form a group of their own, so split sizes are a function of
the row count alone and do not change with featurization settings. Splits are saved as JSON
beside the featurization cache and reloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import featurize, files

SPLIT_KINDS = ("paper_scaffold", "ogb_scaffold", "random")


def scaffold_smiles(smiles: str, isomeric: bool = True) -> str | None:
    """Murcko scaffold SMILES ('' for acyclic molecules), None when the SMILES does not parse."""
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold
    mol = featurize.parse_smiles(smiles)
    if mol is None:
        return None
    return Chem.MolToSmiles(MurckoScaffold.GetScaffoldForMol(mol), isomericSmiles=isomeric)


def _scaffold_chunk(args):
    start, smiles = args
    return start, [scaffold_smiles(s) for s in smiles]


def scaffolds_of(smiles: Sequence[str], n_workers: int | None = None) -> list[str | None]:
    return featurize.map_chunks(_scaffold_chunk, list(smiles), (), "scaffolds", n_workers,
                                chunk_size=1024, show_progress=len(smiles) > 5000)


def scaffold_groups(scaffolds: Sequence[str | None]) -> list[list[int]]:
    """Row groups sharing a scaffold, in first-appearance order; unparsable rows are singletons."""
    groups: dict[object, list[int]] = {}
    for row, scaffold in enumerate(scaffolds):
        groups.setdefault(scaffold if scaffold is not None else ("unparsable", row), []).append(row)
    return list(groups.values())


def paper_scaffold_split(scaffolds: Sequence[str | None], fractions=(0.6, 0.15, 0.25),
                         seed: int = 3) -> dict[str, np.ndarray]:
    groups = scaffold_groups(scaffolds)
    n = len(scaffolds)
    train_cut = int(fractions[0] * n)
    valid_cut = int(fractions[1] * n) + train_cut
    # RandomState(seed).shuffle draws exactly what np.random.seed(seed); np.random.shuffle(list)
    # draws, and permuting group positions equals shuffling the list of groups.
    order = np.arange(len(groups))
    np.random.RandomState(seed).shuffle(order)
    flat = np.array([row for g in order for row in groups[g]], dtype=np.int64)
    return {"train": flat[:train_cut], "valid": flat[train_cut:valid_cut], "test": flat[valid_cut:]}


def ogb_scaffold_split(scaffolds: Sequence[str | None], fractions=(0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    groups = scaffold_groups(scaffolds)
    groups = sorted(groups, key=lambda g: (len(g), g[-1]), reverse=True)
    n = len(scaffolds)
    train_cut, valid_cut = fractions[0] * n, (fractions[0] + fractions[1]) * n
    train, valid, test = [], [], []
    for g in groups:
        if len(train) + len(g) > train_cut:
            if len(train) + len(valid) + len(g) > valid_cut:
                test += g
            else:
                valid += g
        else:
            train += g
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in
            (("train", train), ("valid", valid), ("test", test))}


def random_split(n: int, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    train_cut = int(fractions[0] * n)
    valid_cut = train_cut + int(fractions[1] * n)
    return {"train": np.sort(perm[:train_cut]), "valid": np.sort(perm[train_cut:valid_cut]),
            "test": np.sort(perm[valid_cut:])}


def make_split(smiles: Sequence[str], kind: str, seed: int | None = None,
               fractions: Sequence[float] | None = None,
               n_workers: int | None = None) -> dict[str, np.ndarray]:
    """Computes a split of kind `kind` (see SPLIT_KINDS) over the rows of `smiles`."""
    if kind == "paper_scaffold":
        return paper_scaffold_split(scaffolds_of(smiles, n_workers), tuple(fractions or (0.6, 0.15, 0.25)),
                                    3 if seed is None else seed)
    if kind == "ogb_scaffold":
        return ogb_scaffold_split(scaffolds_of(smiles, n_workers), tuple(fractions or (0.8, 0.1, 0.1)))
    if kind == "random":
        return random_split(len(smiles), tuple(fractions or (0.8, 0.1, 0.1)), 0 if seed is None else seed)
    raise ValueError(f"unknown split kind {kind!r}; choose from {SPLIT_KINDS}")


def load_or_make_split(smiles: Sequence[str], kind: str, cache_dir: str | os.PathLike | None,
                       name: str = "smiles", seed: int | None = None,
                       fractions: Sequence[float] | None = None,
                       n_workers: int | None = None) -> dict[str, np.ndarray]:
    """make_split, saved to / reloaded from `<cache_dir>/<name>-split-<kind>-<key>.json`."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"unknown split kind {kind!r}; choose from {SPLIT_KINDS}")
    if cache_dir is None:
        return make_split(smiles, kind, seed, fractions, n_workers)
    settings = {"kind": kind, "seed": seed, "fractions": list(fractions) if fractions else None}
    path = Path(cache_dir) / f"{name}-split-{kind}-{featurize.cache_key(list(smiles), settings, 'split')}.json"
    if path.exists():
        with open(path) as fh:
            saved = json.load(fh)
        return {k: np.asarray(saved[k], dtype=np.int64) for k in ("train", "valid", "test")}
    split = make_split(smiles, kind, seed, fractions, n_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, json.dumps({**settings, **{k: v.tolist() for k, v in split.items()}}))
    return split
