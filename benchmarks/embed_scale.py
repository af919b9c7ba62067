"""`chmr-jax embed` at library scale: peak RSS, molecules/s, featurization vs model time, output sizes.

Usage: python benchmarks/embed_scale.py --pretrained DIR [--sizes 20000,200000,1000000] [--work /tmp/embed_scale]
       [--formats numpy,parquet,tfds] [--shard_size 10000] [--out benchmarks/embed_scale.json]

Inputs: the SMILES of the shared data's benchmarks and corpus ($CHMR_DATA_DIR: every CSV with a 'smiles'
column, deduplicated), then topped up to each size with randomised-atom-order SMILES of the same molecules
(RDKit MolToSmiles(doRandom=True); RDKit's atom order is not seeded), so every row is parsed and featurized afresh. Inputs are
written once to WORK/input-<n>.csv and reused. Each size runs `chmr-jax embed` as a subprocess; its peak
RSS is the largest VmHWM of the embed process and, separately, the sum of its featurization workers'
(polled from /proc every 0.2 s). Afterwards a second subprocess loads the export with
chmr_jax.load_embeddings and reads every 1000th anchor row: its peak RSS (VmHWM) is the loading cost.
"""
import argparse
import csv
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def base_smiles(data_dir: Path) -> list[str]:
    seen, out = set(), []
    for path in sorted(data_dir.rglob("*.csv*")):
        if "profiles" in path.parts:
            continue
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            cols = [i for i, h in enumerate(header) if h.strip().lower() == "smiles"]
            if not cols:
                continue
            for row in reader:
                s = row[cols[0]].strip() if len(row) > cols[0] else ""
                if s and s not in seen:
                    seen.add(s)
                    out.append(s)
    return out


def make_input(path: Path, n: int, base: list[str]) -> None:
    """n rows: the base SMILES, then randomised SMILES of them in rounds until n (the molecules cycle in a
    fixed order; RDKit's atom order randomisation itself is not seeded, which changes no cost measured)."""
    if path.exists():
        return
    from rdkit import Chem, RDLogger
    RDLogger.DisableLog("rdApp.*")
    mols = None
    tmp = path.with_name(path.name + ".tmp")
    t0 = time.perf_counter()
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "smiles"])
        for i in range(n):
            if i < len(base):
                s = base[i]
            else:
                if mols is None:
                    mols = [m for m in (Chem.MolFromSmiles(s) for s in base) if m is not None]
                m = mols[(i - len(base)) % len(mols)]
                s = Chem.MolToSmiles(m, doRandom=True, canonical=False)
            w.writerow([f"r{i}", s])
    os.replace(tmp, path)
    print(f"wrote {path} ({n} rows, {time.perf_counter() - t0:.0f}s)", flush=True)


def _status(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_measured(cmd: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    main_peak = workers_peak = 0
    lines = []
    import threading
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        main_peak = max(main_peak, _status(proc.pid, "VmHWM"))
        workers_peak = max(workers_peak, sum(_status(c, "VmRSS") for c in _children(proc.pid)))
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - t0
    log = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    return {"wall_s": wall, "main_peak_rss": main_peak, "workers_peak_rss": workers_peak, "log": log}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


LOAD = r"""
import re, sys, numpy as np, chmr_jax
arrays, manifest = chmr_jax.load_embeddings(sys.argv[1])
a = arrays["anchor"]
x = a[::1000]
ids = arrays["id"][len(a) - 5:]
print(len(a), x.shape, float(np.abs(x).sum()), list(ids))
# VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec
print("maxrss", int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--sizes", default="20000,200000,1000000")
    parser.add_argument("--work", default="/tmp/embed_scale")
    parser.add_argument("--formats", default="numpy,parquet,tfds")
    parser.add_argument("--shard_size", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--workers", type=int, help="featurization processes (default: embed's, the CPU count)")
    parser.add_argument("--keep", action="store_true", help="keep each size's export (default: deleted after)")
    parser.add_argument("--out", default="benchmarks/embed_scale.json")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(os.environ.get("CHMR_DATA_DIR") or ROOT.parent / "shared" / "data")
    base = base_smiles(data_dir)
    print(f"{len(base)} distinct SMILES from {data_dir}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        src = work / f"input-{n}.csv"
        make_input(src, n, base)
        out = work / f"out-{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "chmr_jax.cli", "embed", "--pretrained", args.pretrained, "--input", str(src),
               "--out", str(out), "--id_column", "id", "--formats", args.formats, "--shard_size",
               str(args.shard_size), "--batch_size", str(args.batch_size), "--no_progress"]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        load_avg = os.getloadavg()[0]
        r = run_measured(cmd, env)
        m = re.search(r"featurization wait ([\d.]+)s, model ([\d.]+)s", r["log"])
        t = re.search(r"embedded (\d+) of (\d+) molecules .* \((\d+) shards, ([\d.]+)s\)", r["log"])
        load = subprocess.run([sys.executable, "-c", LOAD, str(out)], env=env, capture_output=True, text=True,
                              cwd=ROOT, check=True)
        sizes = {f: du(out / ("numpy" if f == "numpy" else f)) for f in args.formats.split(",")}
        row = {"rows": n, "molecules": int(t.group(1)), "shards": int(t.group(3)), "embed_s": float(t.group(4)),
               "wall_s": round(r["wall_s"], 1), "mol_per_s": round(n / float(t.group(4)), 1),
               "featurize_wait_s": float(m.group(1)), "model_s": float(m.group(2)),
               "peak_rss_gib": round(r["main_peak_rss"] / 2**30, 3),
               "workers_peak_rss_gib": round(r["workers_peak_rss"] / 2**30, 3),
               "load_peak_rss_gib": round(int(load.stdout.split("maxrss")[1]) / 2**30, 3),
               "output_mb": {f: round(b / 1e6, 1) for f, b in sizes.items()},
               "load_average_at_start": round(load_avg, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print(f"\n{'rows':>9} {'mol/s':>8} {'embed s':>8} {'feat wait s':>11} {'model s':>8} {'peak RSS GiB':>12} "
          f"{'workers GiB':>11} {'load GiB':>9}  output MB")
    for r in rows:
        print(f"{r['rows']:>9} {r['mol_per_s']:>8} {r['embed_s']:>8} {r['featurize_wait_s']:>11} {r['model_s']:>8} "
              f"{r['peak_rss_gib']:>12} {r['workers_peak_rss_gib']:>11} {r['load_peak_rss_gib']:>9}  {r['output_mb']}")
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "pretrained": args.pretrained, "formats": args.formats,
            "shard_size": args.shard_size, "batch_size": args.batch_size}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
