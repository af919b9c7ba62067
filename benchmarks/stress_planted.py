"""The missing-modality stress test where the profiles carry the downstream signal (issue 21 §6).

The planted-signal corpus (chmr_jax/downstream/planted.py: profiles and task labels are functions of
the same hidden factors of each molecule's structure) goes through `chmr_jax.downstream.stress.run`,
the code behind `chmr-jax stress`: for each extra fraction of observed profiles hidden and each
imputation of the missing rows (Eq. 1 propagation, the release's mean, zero), pretrain, then fine-tune
on the planted task with the untrained encoder as the paired control.

  python benchmarks/stress_planted.py --out runs/stress_planted [--levels 0,0.3,0.6,0.9] [--seeds 0,1,2]

Settings as benchmarks/planted_signal.py (3,000 molecules, 30% observed per modality, configs/test.py's
model at latent 32, batch 64, 300 steps; head on p_fingerprint, p_graph). Writes OUT/stress/results.md,
results.json, stress.png and OUT/stress_planted.json (the rows and the command).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chmr_jax import config_util
from chmr_jax.data import synthetic
from chmr_jax.downstream import planted, stress

ROOT = Path(__file__).resolve().parents[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--levels", default="0,0.3,0.6,0.9", help="extra fractions of observed profiles hidden")
    p.add_argument("--imputations", default="propagate,mean,zero")
    p.add_argument("--molecules", type=int, default=3000)
    p.add_argument("--labelled", type=int, default=1500)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--observed", type=float, default=0.3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (the control is paired on them)")
    p.add_argument("--parts", default="fingerprint,graph", help="head input parts")
    p.add_argument("--table_only", action="store_true",
                   help="rebuild the table, plot and JSON from OUT's finished runs (the sample std of their "
                        "per-seed scores), running nothing")
    args = p.parse_args()
    out = Path(args.out)
    if args.table_only:
        return table_only(out)
    t0 = time.perf_counter()
    made = planted.write(out, synthetic.synthetic_smiles(args.molecules), labelled=args.labelled, tasks=args.tasks,
                         observed=args.observed)
    cache_dir = str(out / "cache")
    cfg = planted.pretrain_config(str(ROOT / "configs" / "test.py"), made["layout"], args.steps, cache_dir,
                                  {"batch.batch_size": 64, "model.latent": 32})
    ft = config_util.load_config(str(ROOT / "configs" / "finetune.py"))
    ft.cache_dir = cache_dir
    ft.csv = str(made["task"])
    ft.split = "random"
    ft.seeds = args.seeds
    ft.update_from_flattened_dict({"head.hidden": 64, "optim.epochs": 60, "head.parts": args.parts})
    rows = stress.run(cfg, ft, [float(v) for v in args.levels.split(",")], args.imputations.split(","),
                      out / "stress", log=lambda *a, **k: print(*a, **k, flush=True))
    record = {"command": "python benchmarks/stress_planted.py " + " ".join(sys.argv[1:]),
              "settings": vars(args), "wall_s": round(time.perf_counter() - t0, 1), "rows": rows}
    (out / "stress_planted.json").write_text(json.dumps(record, indent=1))


def table_only(out: Path) -> None:
    """stress.run's rows from the finished fine-tuning results under OUT/stress, with mean +- sample std
    (ddof=1) recomputed from their per-seed test scores (runs made before the sample std recorded
    numpy's ddof=0 std)."""
    from chmr_jax.downstream import finetune

    record = json.loads((out / "stress_planted.json").read_text())
    rows = []
    for row in record["rows"]:
        res = json.loads((out / "stress" / f"{row['imputation']}-missing{row['missing']:g}" / "finetune"
                          / "results.json").read_text())
        # The fine-tuning job's own summaries, recomputed from the stored per-seed scores.
        ours, control = (finetune._summarise(res["methods"][m]["runs"], res["metric"]) for m in ("chmr", "untrained"))
        rows.append({**row, "test_mean": ours["test_mean"], "test_std": ours["test_std"],
                     "untrained_mean": control["test_mean"], "untrained_std": control["test_std"],
                     "lift": finetune.paired_lift(res["methods"], res["metric"])})
    record.update(rows=rows, std="sample std over seeds (ddof=1), recomputed by --table_only")
    (out / "stress_planted.json").write_text(json.dumps(record, indent=1))
    (out / "stress" / "results.md").write_text(stress.format_table(rows) + "\n")
    stress.plot(rows, out / "stress" / "stress.png")
    print(stress.format_table(rows))


if __name__ == "__main__":
    main()
