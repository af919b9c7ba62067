"""Tables of pretrained-vs-untrained lift for several `chmr-jax benchmark` workdirs (issue 12):

  python benchmarks/summarize_lift.py NAME=runs/lift/eval_ablation_full1 NAME2=... [--json out.json]

Per workdir and dataset: the paired lift over the untrained encoder on the VALIDATION split (what
settings are chosen on) and on the test split (reported only), x100, mean +- std over seeds,
positive = pretrained better (MAE sign flipped), and the mean validation lift over the datasets.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from chmr_jax.downstream import finetune


def paired(result, part):
    lift = finetune.paired_lift(result["methods"], result["metric"], part=part)
    return 100 * lift["mean"], 100 * lift["std"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="NAME=WORKDIR")
    p.add_argument("--json")
    args = p.parse_args()
    out = {}
    datasets = None
    for item in args.runs:
        name, _, workdir = item.partition("=")
        results = json.loads((Path(workdir) / "results.json").read_text())
        datasets = datasets or [r["dataset"] for r in results]
        entry = {r["dataset"]: {"valid": paired(r, "valid"), "test": paired(r, "test"),
                                "test_pretrained": 100 * r["methods"]["chmr"]["test_mean"],
                                "test_untrained": 100 * r["methods"]["untrained"]["test_mean"]} for r in results}
        entry["mean_valid_lift"] = float(np.mean([entry[d]["valid"][0] for d in datasets if d in entry]))
        out[name] = entry
    print("| run | " + " | ".join(f"{d} valid lift | {d} test lift" for d in datasets) + " | mean valid lift |")
    print("|---|" + "---|---|" * len(datasets) + "---|")
    for name, entry in out.items():
        cells = [f"{entry[d]['valid'][0]:+.1f} +- {entry[d]['valid'][1]:.1f} | {entry[d]['test'][0]:+.1f} +- "
                 f"{entry[d]['test'][1]:.1f}" if d in entry else "- | -" for d in datasets]
        print(f"| {name} | " + " | ".join(cells) + f" | {entry['mean_valid_lift']:+.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
