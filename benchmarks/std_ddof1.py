"""Converts the stored +- of the lift experiments from numpy's std (ddof=0) to the sample std (ddof=1)
that the paper's tables use (issue 21 §7), exactly: std_ddof1 = std_ddof0 * sqrt(n / (n - 1)), n the
number of seeds each std was taken over.

  python benchmarks/std_ddof1.py            # rewrites lift.json, lift_ablations.json, lift_vs_epochs.json

lift.json (5 seeds, from its "seeds"): pretrained / untrained / lift / best_baseline std per dataset;
lift_ablations.json ([mean, std] pairs under valid / test, seeds 0, 1, 2) and lift_vs_epochs.json
("std" per point, seeds 0, 1, 2; the 0-epoch point is the control itself, 0). lift.json then carries
the "std" note that `chmr-jax benchmark` writes, and a second run refuses (no double conversion).
"""
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTE = "sample std over seeds (ddof=1), as the paper's tables"
ABLATION_SEEDS = 3      # RESULTS.md 'Lift by pretraining length and ablation': seeds 0, 1, 2


def factor(n: int) -> float:
    return math.sqrt(n / (n - 1))


def main():
    lift_path = HERE / "lift.json"
    lift = json.loads(lift_path.read_text())
    if lift.get("std") == NOTE:
        raise SystemExit(f"{lift_path}: already the sample std ('std' says so); nothing converted")
    f5 = factor(len(lift["seeds"]))
    for entry in lift["datasets"].values():
        for key in ("pretrained", "untrained", "lift", "best_baseline"):
            if entry.get(key):
                entry[key]["std"] *= f5
    lift["std"] = NOTE
    f3 = factor(ABLATION_SEEDS)
    ablations = json.loads((HERE / "lift_ablations.json").read_text())
    for run in ablations.values():
        for ds in run.values():
            if isinstance(ds, dict):
                for part in ("valid", "test"):
                    ds[part][1] *= f3
    epochs = json.loads((HERE / "lift_vs_epochs.json").read_text())
    for series in epochs.values():
        series["std"] = [s * f3 for s in series["std"]]
    lift_path.write_text(json.dumps(lift, indent=1))
    (HERE / "lift_ablations.json").write_text(json.dumps(ablations, indent=1))
    (HERE / "lift_vs_epochs.json").write_text(json.dumps(epochs, indent=1))
    print(f"converted: lift.json x{f5:.4f} ({len(lift['seeds'])} seeds), lift_ablations.json and "
          f"lift_vs_epochs.json x{f3:.4f} ({ABLATION_SEEDS} seeds)")


if __name__ == "__main__":
    main()
