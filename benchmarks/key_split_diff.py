"""What `--config.split=key_scaffold` changes against each cellular benchmark's default split (issue 32
§5: the key-split paragraph of RESULTS.md says what the split changed per set, measured here).

  python benchmarks/key_split_diff.py [--datasets chembl2k,broad6k,biogenadme,moltoxcast] [--json OUT]

Per dataset, the default protocol's split (paper_scaffold for these four) and the key-grouped one,
as `chmr-jax finetune` builds them (splits.load_or_make_split over the dataset's rows), and:
  sizes               train / valid / test rows under each split
  moved               rows whose part differs between the two splits, and the part-to-part counts
  largest group       per part, the largest group of the split's own grouping (isomeric Murcko scaffold for
                      paper_scaffold; non-isomeric scaffold joined by connectivity key for key_scaffold)
                      among the part's rows, as a share of the part (the table prints valid's)
  same key as train   valid / test rows whose connectivity key (14-char InChIKey block) is also the key
                      of a train row
  same Morgan as train  valid / test rows whose Morgan fingerprint (the featurizer's: radius 2, 1,024
                      bits) equals that of a train row (stereoisomers always do; so can other molecules)
No training; RDKit only (a few seconds per dataset plus the cached splits).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np

from chmr_jax.data import datasets, featurize, paths, splits

PARTS = ("train", "valid", "test")


def groups_of(smiles, kind):
    """Row -> group id under the grouping the split kind keeps whole (paper: isomeric scaffold)."""
    if kind == "key_scaffold":
        groups = splits.key_scaffold_groups(splits.key_scaffolds_of(smiles, 1))
    else:
        groups = splits.scaffold_groups(splits.scaffolds_of(smiles, 1))
    gid = np.empty(len(smiles), np.int64)
    for g, rows in enumerate(groups):
        gid[rows] = g
    return gid


def scaffold_of_group(smiles, gid, group):
    """The non-isomeric Murcko scaffold of the group's first row ('' = acyclic), to name the group."""
    first = int(np.flatnonzero(gid == group)[0])
    return splits.scaffold_smiles(smiles[first], isomeric=False)


def morgan_digests(smiles):
    out = []
    for s in smiles:
        mol = featurize.parse_smiles(s)
        out.append("" if mol is None else featurize._morgan_bits(mol, 2, 1024).tobytes().hex())
    return np.array(out, dtype=object)


def shared_with_train(values, split, part):
    train = {v for v in values[split["train"]] if v}
    return int(sum(1 for v in values[split[part]] if v and v in train))


def describe(smiles, keys, fps, split, kind):
    gid = groups_of(smiles, kind)
    out = {"sizes": {p: int(len(split[p])) for p in PARTS}}
    for p in PARTS:
        biggest, biggest_n = Counter(gid[split[p]].tolist()).most_common(1)[0]
        out[f"largest_{p}_group"] = {"rows": int(biggest_n), "share_of_part": biggest_n / len(split[p]),
                                     "rows_in_dataset": int((gid == biggest).sum()),
                                     "scaffold": scaffold_of_group(smiles, gid, biggest)}
    for p in ("valid", "test"):
        n = len(split[p])
        k, m = shared_with_train(keys, split, p), shared_with_train(fps, split, p)
        out[f"{p}_same_key_as_train"] = {"rows": k, "share": k / n}
        out[f"{p}_same_morgan_as_train"] = {"rows": m, "share": m / n}
    return out


def compare(name, data_dir, cache_dir):
    ds = datasets.load_benchmark(name, data_dir, cache_dir, n_workers=1)
    smiles = [str(s) for s in ds.smiles]
    keys = np.array([str(k) for k in ds.keys], dtype=object)
    fps = morgan_digests(smiles)
    default = ds.default_split
    split_a = splits.load_or_make_split(smiles, default, cache_dir, ds.name, n_workers=1)
    split_b = splits.load_or_make_split(smiles, "key_scaffold", cache_dir, ds.name, n_workers=1)
    part_a, part_b = np.empty(len(smiles), object), np.empty(len(smiles), object)
    for p in PARTS:
        part_a[split_a[p]] = p
        part_b[split_b[p]] = p
    moves = Counter(f"{a}->{b}" for a, b in zip(part_a, part_b) if a != b)
    return {"rows": len(smiles), "default_split": default,
            "moved": {"rows": int(sum(moves.values())), "by_part": dict(sorted(moves.items()))},
            default: describe(smiles, keys, fps, split_a, default),
            "key_scaffold": describe(smiles, keys, fps, split_b, "key_scaffold")}


def pct(x):
    return f"{100 * x:.1f}%"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="chembl2k,broad6k,biogenadme,moltoxcast")
    p.add_argument("--data_dir")
    p.add_argument("--cache_dir")
    p.add_argument("--json", help="write the measurements here")
    args = p.parse_args()
    data_dir = paths.resolve_data_dir(args.data_dir)
    cache_dir = paths.resolve_cache_dir(args.cache_dir)
    out = {name: compare(name, data_dir, cache_dir) for name in args.datasets.split(",")}
    print("| dataset | split | train / valid / test | rows moved vs default | largest group in valid "
          "| valid rows with a train row's key | test rows with a train row's key "
          "| valid, same Morgan as train | test, same Morgan as train |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        for kind in (r["default_split"], "key_scaffold"):
            d = r[kind]
            moved = "-" if kind == r["default_split"] else (
                f"{r['moved']['rows']} ({', '.join(f'{k} {v}' for k, v in r['moved']['by_part'].items()) or 'none'})")
            g = d["largest_valid_group"]
            cells = [f"{d['sizes']['train']} / {d['sizes']['valid']} / {d['sizes']['test']}", moved,
                     f"{g['rows']} rows = {pct(g['share_of_part'])} (scaffold {g['scaffold'] or 'none'!s}, "
                     f"{g['rows_in_dataset']} rows in all)"]
            for key in ("valid_same_key_as_train", "test_same_key_as_train",
                        "valid_same_morgan_as_train", "test_same_morgan_as_train"):
                cells.append(f"{d[key]['rows']} ({pct(d[key]['share'])})")
            print(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
