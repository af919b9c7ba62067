"""Featurization throughput on this machine: molecules/s for graph + fingerprints and for 3D.

Usage: python benchmarks/featurize.py [--dataset chembl2k] [--n3d 200] [--out benchmarks/featurize.json]
Runs without the cache (every molecule is featurized), with 1 process and with all cores.
"""
import argparse
import json
import os
import platform
import tempfile
import time

from chmr_jax.data import datasets, featurize, geometry, paths


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="chembl2k")
    parser.add_argument("--n3d", type=int, default=200, help="molecules for the (slow) 3D timing")
    parser.add_argument("--out", default="benchmarks/featurize.json")
    args = parser.parse_args()

    ds = datasets.load_benchmark(args.dataset, paths.resolve_data_dir(), cache_dir=None)
    smiles = list(ds.smiles)
    cores = os.cpu_count() or 1
    rows = []
    for workers in sorted({1, cores}):
        t = time.perf_counter()
        feats = featurize.featurize_smiles(smiles, featurize.FeaturizerSettings(), None, args.dataset,
                                           workers, show_progress=False)
        dt = time.perf_counter() - t
        rows.append({"what": "graph+fingerprint+target", "workers": workers, "molecules": len(feats),
                     "seconds": round(dt, 2), "mol_per_s": round(len(smiles) / dt, 1)})
        sub = smiles[:args.n3d]
        t = time.perf_counter()
        geometry.featurize_geometry(sub, geometry.GeometrySettings(), None, args.dataset, workers,
                                    show_progress=False)
        dt = time.perf_counter() - t
        rows.append({"what": "3D (ETKDG + descriptors)", "workers": workers, "molecules": len(sub),
                     "seconds": round(dt, 2), "mol_per_s": round(len(sub) / dt, 1)})
        print(rows[-2], rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as cache:
        featurize.featurize_smiles(smiles, featurize.FeaturizerSettings(), cache, args.dataset, cores,
                                   show_progress=False)
        t = time.perf_counter()
        featurize.featurize_smiles(smiles, featurize.FeaturizerSettings(), cache, args.dataset, cores,
                                   show_progress=False)
        dt = time.perf_counter() - t
    rows.append({"what": "cached reload", "workers": 1, "molecules": len(smiles),
                 "seconds": round(dt, 3), "mol_per_s": round(len(smiles) / dt, 1)})

    machine = f"{platform.processor() or platform.machine()}, {cores} cores, {platform.python_version()}"
    print(f"\nfeaturization on {args.dataset} ({machine})")
    print(f"{'what':28s} {'workers':>7s} {'molecules':>9s} {'seconds':>8s} {'mol/s':>8s}")
    for r in rows:
        print(f"{r['what']:28s} {r['workers']:7d} {r['molecules']:9d} {r['seconds']:8.2f} {r['mol_per_s']:8.1f}")
    with open(args.out, "w") as fh:
        json.dump({"dataset": args.dataset, "machine": machine, "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
