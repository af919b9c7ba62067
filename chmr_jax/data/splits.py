"""Train/valid/test splits over dataset rows.

paper_scaffold  CHMR/InfoAlign protocol (chembl2k, broad6k, biogenadme, moltoxcast): isomeric
                Murcko scaffold groups in first-appearance order, the group list shuffled with
                numpy's legacy RNG seeded 3, then cut by row count: train = first int(0.6 N) rows,
                valid = next int(0.15 N), test = the rest (groups may straddle a cut). Kept for the
                comparison with the paper; it puts stereoisomers of test molecules in train
                (isomeric scaffolds differ, Morgan fingerprints do not).
key_scaffold    the paper protocol's fractions, seed and shuffle over groups that no stereoisomer or
                shared scaffold crosses: rows sharing a non-isomeric Murcko scaffold or a connectivity
                key (14-char InChIKey block) are one group, and whole groups are cut (a group goes
                to the part its first row falls in), so no test molecule has its skeleton in train.
ogb_scaffold    OGB / Hu et al. (MoleculeNet): scaffold sets sorted largest first (ties: larger
                last index first), each whole set goes to train while it fits 80%, else valid
                while it fits 90%, else test.
random          a seeded permutation cut 80/10/10 (fractions configurable).

Rows whose SMILES do not parse each form a group of their own, so split sizes are a function of
the row count alone and do not change with featurization settings. Splits are saved as JSON
beside the featurization cache and reloaded, keyed on the SMILES, the settings and SPLIT_VERSION.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from chmr_jax.data import featurize, files

SPLIT_KINDS = ("paper_scaffold", "key_scaffold", "ogb_scaffold", "random")
# Bump when a split's definition changes (scaffolds, grouping, order, cuts): saved splits of an
# earlier version are then recomputed instead of reused.
SPLIT_VERSION = 2


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


def _key_scaffold_chunk(args):
    start, smiles = args
    out = []
    for s in smiles:
        mol = featurize.parse_smiles(s)
        out.append(None if mol is None else (scaffold_smiles(s, isomeric=False), featurize.molecule_key(mol)))
    return start, out


def key_scaffolds_of(smiles: Sequence[str], n_workers: int | None = None) -> list[tuple[str, str] | None]:
    """(non-isomeric Murcko scaffold, 14-char InChIKey block) per SMILES; None when it does not parse."""
    return featurize.map_chunks(_key_scaffold_chunk, list(smiles), (), "scaffolds and keys", n_workers,
                                chunk_size=1024, show_progress=len(smiles) > 5000)


def key_scaffold_groups(pairs: Sequence[tuple[str, str] | None]) -> list[list[int]]:
    """Connected rows (sharing a non-isomeric scaffold or a connectivity key), each group sorted, the
    groups in first-appearance order; unparsable rows are singletons."""
    parent = list(range(len(pairs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict = {}
    for row, pair in enumerate(pairs):
        for label in (() if pair is None else (("scaffold", pair[0]), ("key", pair[1]))):
            other = first.setdefault(label, row)
            a, b = find(row), find(other)
            parent[max(a, b)] = min(a, b)    # the root stays the group's first row
    groups: dict[int, list[int]] = {}
    for row in range(len(pairs)):
        groups.setdefault(find(row), []).append(row)
    return list(groups.values())


def whole_group_split(groups: Sequence[Sequence[int]], n: int, fractions=(0.6, 0.15, 0.25),
                      seed: int = 3) -> dict[str, np.ndarray]:
    """The paper protocol's shuffle (legacy RNG, `seed`) and cuts, but never inside a group: each
    group goes to the part where its first row falls in the shuffled order."""
    train_cut = int(fractions[0] * n)
    valid_cut = int(fractions[1] * n) + train_cut
    order = np.arange(len(groups))
    np.random.RandomState(seed).shuffle(order)
    parts: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    placed = 0
    for g in order:
        part = "train" if placed < train_cut else "valid" if placed < valid_cut else "test"
        parts[part] += groups[g]
        placed += len(groups[g])
    return {k: np.array(v, dtype=np.int64) for k, v in parts.items()}


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
    if kind == "key_scaffold":
        return whole_group_split(key_scaffold_groups(key_scaffolds_of(smiles, n_workers)), len(smiles),
                                 tuple(fractions or (0.6, 0.15, 0.25)), 3 if seed is None else seed)
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
    settings = {"kind": kind, "seed": seed, "fractions": list(fractions) if fractions else None,
                "version": SPLIT_VERSION}
    path = Path(cache_dir) / f"{name}-split-{kind}-{featurize.cache_key(list(smiles), settings, 'split')}.json"
    if path.exists():
        with open(path) as fh:
            saved = json.load(fh)
        return {k: np.asarray(saved[k], dtype=np.int64) for k in ("train", "valid", "test")}
    split = make_split(smiles, kind, seed, fractions, n_workers)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, json.dumps({**settings, **{k: v.tolist() for k, v in split.items()}}))
    return split
