"""Lift of the pretrained encoder over the untrained one vs pretraining epochs (issue 12), from the
`chmr-jax benchmark` workdirs of benchmarks/lift_experiments.sh:

  python benchmarks/plot_lift.py --out benchmarks/lift_vs_epochs.png runs/lift/eval_full_e1 runs/lift/eval_full_snap2 ...

Each workdir's results.json gives per dataset the paired lift (mean +- std over seeds) and the
epochs of the fine-tuned checkpoint; epoch 0 is the untrained encoder itself (lift 0). Prints the
table and writes the PNG and a JSON beside it.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    series: dict = {}
    for w in args.workdirs:
        for r in json.loads((Path(w) / "results.json").read_text()):
            s = series.setdefault(r["dataset"], {"epochs": [0], "lift": [0.0], "std": [0.0], "metric": r["metric"]})
            s["epochs"].append(r.get("pretrained_epochs"))
            s["lift"].append(100 * r["lift"]["mean"])
            s["std"].append(100 * r["lift"]["std"])
    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=120)
    for name, s in series.items():
        order = sorted(range(len(s["epochs"])), key=lambda i: s["epochs"][i])
        ax.errorbar([s["epochs"][i] for i in order], [s["lift"][i] for i in order],
                    yerr=[s["std"][i] for i in order], marker="o", capsize=3, lw=1, label=f"{name} ({s['metric']})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("pretraining epochs (reachable corpus, 236 steps each)")
    ax.set_ylabel("lift over untrained (x100, paired)")
    ax.set_title("pretrained minus untrained encoder, frozen head", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    Path(args.out).with_suffix(".json").write_text(json.dumps(series, indent=1))
    print("| dataset | " + " | ".join(f"{e} ep" for e in sorted(next(iter(series.values()))["epochs"])) + " |")
    for name, s in series.items():
        order = sorted(range(len(s["epochs"])), key=lambda i: s["epochs"][i])
        print(f"| {name} | " + " | ".join(f"{s['lift'][i]:+.1f} +- {s['std'][i]:.1f}" for i in order) + " |")


if __name__ == "__main__":
    main()
