"""Renders RESULTS.md's lift and stress tables (and the verdicts computed from them) from the committed
JSON files and rewrites them in place between generated markers (issue 32 §5: no typed +-).

  python benchmarks/results_tables.py           # rewrites benchmarks/RESULTS.md's generated blocks
  python benchmarks/results_tables.py --check   # exit 1 if any block differs from its JSON (no write)

Each block sits between `<!-- generated:NAME begin -->` and `<!-- generated:NAME end -->`; text
outside the markers is never touched, and a re-run on unchanged JSON reproduces the file exactly.
Every +- is the sample std over seeds (ddof=1): the JSONs store it (lift.json, lift_ablations.json
and lift_vs_epochs.json converted exactly by benchmarks/std_ddof1.py; lift_key_split.json,
lift_vicreg_views.json and stress_planted.json computed with ddof=1 by the code that wrote them,
stress_planted.json's lift std rechecked here against its per-seed values). Values are x100
(MAE x100 for biogenadme; in a lift the MAE sign is flipped, so positive = pretraining helped).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
CELLULAR = ("chembl2k", "broad6k", "biogenadme", "moltoxcast")
MOLECULENET = ("bbbp", "bace", "clintox", "sider", "hiv")
# Paper Table 1 (spec §9), as chmr_jax.downstream.benchmark.PAPER_TABLE holds it; copied so that this
# script reads no code that could change the table under the same JSON.
PAPER = {
    "chembl2k": {"CHMR": (84.7, 0.2), "InfoAlign": (81.3, 0.6), "MLP": (76.8, 2.2), "RF": (54.7, 0.7)},
    "moltoxcast": {"CHMR": (69.3, 0.3), "InfoAlign": (66.4, 1.1), "MLP": (57.6, 1.0), "RF": (52.3, 0.1)},
    "broad6k": {"CHMR": (71.4, 0.2), "InfoAlign": (70.0, 0.1), "MLP": (63.3, 0.3), "RF": (55.5, 0.1)},
    "biogenadme": {"CHMR": (40.9, 0.3), "InfoAlign": (49.4, 0.2), "MLP": (66.2, 2.4), "RF": (52.8, 0.2)},
}


def load(name):
    return json.loads((HERE / name).read_text())


def pm(mean, std, sign=True):
    return f"{mean:+.1f} +- {std:.1f}" if sign else f"{mean:.1f} +- {std:.1f}"


def above(mean, std):
    return mean > std


# ---------------------------------------------------------------- lift_ablations.json, lift_vs_epochs.json

def lift_rows_table(runs: dict, label_col: str, labels: dict | None = None) -> str:
    """summarize_lift.py's table: per run, valid and test lift per dataset and the mean valid lift."""
    lines = [f"| {label_col} | " + " | ".join(f"{d} valid lift | {d} test lift" for d in CELLULAR)
             + " | mean valid lift |", "|---|" + "---|---|" * len(CELLULAR) + "---|"]
    for name, entry in runs.items():
        cells = [f"{pm(*entry[d]['valid'])} | {pm(*entry[d]['test'])}" for d in CELLULAR]
        lines.append(f"| {(labels or {}).get(name, name)} | " + " | ".join(cells)
                     + f" | {entry['mean_valid_lift']:+.2f} |")
    return "\n".join(lines)


def ablations():
    labels = {"chosen w/o CPR (lambda_cpr 0), 1 epoch": "chosen (SCA on observed rows) w/o CPR (lambda_cpr 0), 1 epoch",
              "chosen w/o Tree-VQ (lambda2 0), 1 epoch": "chosen (SCA on observed rows) w/o Tree-VQ (lambda2 0), 1 epoch"}
    return lift_rows_table(load("lift_ablations.json"), "run", labels)


def ablations_control():
    runs = load("lift_ablations.json")
    parts = []
    for d in CELLULAR:
        values = sorted({round(entry[d]["test_untrained"], 6) for entry in runs.values()})
        if len(values) != 1:
            raise SystemExit(f"lift_ablations.json: the untrained control of {d} differs between rows: {values}")
        parts.append(f"{d} {'MAE ' if d == 'biogenadme' else ''}{values[0]:.1f}")
    return ("Absolute test score of the untrained control (x100, mean over seeds 0-2, the same in every row; "
            "`lift_ablations.json` stores means only, so its std is not given here): " + ", ".join(parts) + ".")


def vs_epochs():
    data = load("lift_vs_epochs.json")
    epochs = data[CELLULAR[0]]["epochs"]
    lines = ["| full objective, epochs of the 10-epoch run | " + " | ".join(f"{d} test lift" for d in CELLULAR) + " |",
             "|---|" + "---|" * len(CELLULAR)]
    for i, e in enumerate(epochs):
        cells = ["0 (control)" if e == 0 else pm(data[d]["lift"][i], data[d]["std"][i]) for d in CELLULAR]
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vicreg_views():
    labels = {"heldout": "held out (the row's fold out of the propagation)",
              "clamped": "clamped propagated copy (invariance 0)"}
    return lift_rows_table(load("lift_vicreg_views.json"), "VICReg second view", labels)


# ---------------------------------------------------------------- lift_key_split.json, key_split_diff.json

def key_split():
    data = load("lift_key_split.json")
    labels = {"paper_scaffold": "paper scaffold (isomeric)",
              "key_scaffold": "key scaffold (no shared connectivity key or plain scaffold)"}
    head = " | ".join(f"{d} test{' MAE' if d == 'biogenadme' else ''} (untrained) | test lift | valid lift"
                      for d in CELLULAR)
    lines = [f"| split | {head} | mean valid lift |", "|---|" + "---|---|---|" * len(CELLULAR) + "---|"]
    for name, entry in data.items():
        cells = [f"{entry[d]['test_pretrained']:.1f} ({entry[d]['test_untrained']:.1f}) | {pm(*entry[d]['test'])} | "
                 f"{pm(*entry[d]['valid'])}" for d in CELLULAR]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + f" | {entry['mean_valid_lift']:+.2f} |")
    return "\n".join(lines)


def key_split_diff():
    data = load("key_split_diff.json")

    def share(x):
        return f"{x['rows']} ({100 * x['share']:.1f}%)"

    lines = ["| dataset | rows | train / valid / test: paper -> key | rows in another part under key | "
             "largest group in valid: paper -> key | valid rows with a train row's connectivity key: paper -> key | "
             "test rows with a train row's connectivity key: paper -> key | test rows with a train row's Morgan "
             "fingerprint: paper -> key |", "|---|---:|---|---|---|---|---|---|"]
    for d, r in data.items():
        a, b = r[r["default_split"]], r["key_scaffold"]
        sizes = " -> ".join(f"{x['sizes']['train']} / {x['sizes']['valid']} / {x['sizes']['test']}" for x in (a, b))
        moved = r["moved"]
        by_part = ", ".join(f"{k} {v}" for k, v in moved["by_part"].items())
        groups = " -> ".join(
            f"{x['largest_valid_group']['rows']} = {100 * x['largest_valid_group']['share_of_part']:.1f}% "
            f"({'scaffold `' + x['largest_valid_group']['scaffold'] + '`' if x['largest_valid_group']['scaffold'] else 'acyclic'}"
            f"{'' if x['largest_valid_group']['rows'] == x['largest_valid_group']['rows_in_dataset'] else ', of ' + str(x['largest_valid_group']['rows_in_dataset']) + ' in all'})"
            for x in (a, b))
        cells = [str(r["rows"]), sizes, f"{moved['rows']} ({100 * moved['rows'] / r['rows']:.1f}%){': ' + by_part if by_part else ''}",
                 groups] + [" -> ".join(share(x[key]) for x in (a, b)) for key in
                            ("valid_same_key_as_train", "test_same_key_as_train", "test_same_morgan_as_train")]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- lift.json (the headline)

def headline():
    data = load("lift.json")
    if "ddof=1" not in data.get("std", ""):
        raise SystemExit("lift.json: its std is not marked as the sample std (run benchmarks/std_ddof1.py)")
    seeds = len(data["seeds"])
    cols = ("CHMR", "InfoAlign", "MLP", "RF")
    lines = ["| dataset | metric | seeds | chmr_jax | untrained encoder | best in-house baseline (of those run) "
             "| lift (paired) | " + " | ".join(f"paper {c}" for c in cols) + " |", "|---|---|---|" + "---|" * (4 + len(cols))]
    for d, r in data["datasets"].items():
        bb = r.get("best_baseline")
        best = (f"{bb['name'].upper()} {pm(100 * bb['mean'], 100 * bb['std'], False)} (of {', '.join(b.upper() for b in r['baselines_run'])})"
                if bb else "-")
        paper = [f"{PAPER[d][c][0]} +- {PAPER[d][c][1]}" if d in PAPER else "-" for c in cols]
        lines.append(f"| {d} | {r['metric']} | {seeds} | {pm(100 * r['pretrained']['mean'], 100 * r['pretrained']['std'], False)} | "
                     f"{pm(100 * r['untrained']['mean'], 100 * r['untrained']['std'], False)} | {best} | "
                     f"{pm(100 * r['lift']['mean'], 100 * r['lift']['std'])} | " + " | ".join(paper) + " |")
    return "\n".join(lines)


def _lift(r):
    return 100 * r["lift"]["mean"], 100 * r["lift"]["std"]


def headline_verdict():
    data = load("lift.json")["datasets"]
    cellular = [(d, *_lift(data[d])) for d in CELLULAR]
    n_above = sum(above(m, s) for _, m, s in cellular)
    order = sorted(cellular, key=lambda x: -(x[1] - x[2]))
    lifts = ", ".join(f"{d} {m:+.2f} +- {s:.2f}{'' if above(m, s) else ' (not above)'}" for d, m, s in order)
    beaten, not_beaten = [], []
    for d, r in data.items():
        bb = r.get("best_baseline")
        ours, theirs = 100 * r["pretrained"]["mean"], 100 * bb["mean"]
        better = ours > theirs if r["higher_is_better"] else ours < theirs
        text = f"{d} ({ours:.1f} vs {bb['name'].upper()} {theirs:.1f}{' MAE' if not r['higher_is_better'] else ''})"
        (beaten if better else not_beaten).append(text)
    mn = [(d, *_lift(data[d])) for d in MOLECULENET]
    mn_text = ", ".join(f"{d} {m:+.2f} +- {s:.2f}" for d, m, s in mn)
    mn_above = [d for d, m, s in mn if above(m, s)]
    return "\n".join([
        f"- **Lift above the paired std on {n_above} of the 4 cellular datasets: "
        f"{'met' if n_above >= 3 else 'not met'}** (issue 12's bar: 3 of 4). {lifts}.",
        f"- **Best in-house baseline (of those run) beaten on {len(beaten)} of {len(data)}: "
        f"{'met' if len(beaten) >= 7 else 'not met'}** (bar: 7 of 9). Beaten on {', '.join(beaten)}; "
        f"not on {', '.join(not_beaten)}.",
        f"- MoleculeNet sets: {mn_text}; above the paired std on "
        f"{len(mn_above)} of {len(mn)}{' (' + ', '.join(mn_above) + ')' if mn_above else ''}.",
    ])


# ---------------------------------------------------------------- stress_planted.json

def _stress_rows():
    data = load("stress_planted.json")
    if "ddof=1" not in data.get("std", ""):
        raise SystemExit("stress_planted.json: its std is not marked as the sample std")
    for r in data["rows"]:
        per_seed = np.array(list(r["lift"]["per_seed"].values()), np.float64)
        if not math.isclose(per_seed.std(ddof=1), r["lift"]["std"], rel_tol=1e-9):
            raise SystemExit(f"stress_planted.json: lift std of {r['missing']}/{r['imputation']} is not ddof=1")
    return data["rows"]


def stress():
    rows = _stress_rows()
    imputations = list(dict.fromkeys(r["imputation"] for r in rows))
    levels = list(dict.fromkeys(r["missing"] for r in rows))
    metric = rows[0]["metric"]
    lines = ["| extra missing | observed profiles | " + " | ".join(f"{i} ({metric} x100)" for i in imputations)
             + " | untrained control |", "|---|---|" + "---|" * (len(imputations) + 1)]
    for level in levels:
        at = {r["imputation"]: r for r in rows if r["missing"] == level}
        first = at[imputations[0]]
        observed = ", ".join(f"{k} {v}" for k, v in first["observed"].items())
        cells = [f"{pm(100 * at[i]['test_mean'], 100 * at[i]['test_std'], False)} "
                 f"({pm(100 * at[i]['lift']['mean'], 100 * at[i]['lift']['std'])})" for i in imputations]
        control = pm(100 * first["untrained_mean"], 100 * first["untrained_std"], False)
        lines.append(f"| {level:g} | {observed} | " + " | ".join(cells) + f" | {control} |")
    return "\n".join(lines)


def stress_checks():
    rows = _stress_rows()
    n = len(rows)
    n_above = sum(above(r["lift"]["mean"], r["lift"]["std"]) for r in rows)
    controls = {(round(r["untrained_mean"], 12), round(r["untrained_std"], 12)) for r in rows}
    top = {}
    for r in rows:
        seed = max(r["lift"]["per_seed"], key=r["lift"]["per_seed"].get)
        top[seed] = top.get(seed, 0) + 1
    top_seed, top_n = max(top.items(), key=lambda kv: kv[1])
    return (f"Computed from `stress_planted.json`: the lift is above its paired std in {n_above} of {n} cells; "
            f"the {n} cells share {len(controls)} untrained control{'s' if len(controls) != 1 else ''} (one "
            f"encoder initialisation, seeds 0-2 of its head); fine-tuning seed {top_seed} gives the largest "
            f"lift in {top_n} of {n} cells.")


BLOCKS = {"ablations": ablations, "ablations_control": ablations_control, "vs_epochs": vs_epochs,
          "vicreg_views": vicreg_views, "key_split": key_split, "key_split_diff": key_split_diff,
          "headline": headline, "headline_verdict": headline_verdict, "stress": stress,
          "stress_checks": stress_checks}


def rewrite(text: str) -> tuple[str, list[str]]:
    """`text` with every generated block re-rendered, and the names of the blocks that changed."""
    changed = []
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated:{re.escape(name)} begin -->\n)(.*?)(<!-- generated:{re.escape(name)} end -->)",
                             re.S)
        found = pattern.findall(text)
        if len(found) != 1:
            raise SystemExit(f"{RESULTS}: expected one generated:{name} block, found {len(found)}")
        body = fn() + "\n"
        if found[0][1] != body:
            changed.append(name)
        text = pattern.sub(lambda m: m.group(1) + body + m.group(3), text)
    return text, changed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a block differs from its JSON; write nothing")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    path = Path(args.results)
    old = path.read_text()
    new, changed = rewrite(old)
    if args.check:
        print("up to date" if not changed else "differs: " + ", ".join(changed))
        sys.exit(1 if changed else 0)
    if new != old:
        path.write_text(new)
    print(f"{path}: {len(BLOCKS)} generated blocks, rewritten: {', '.join(changed) or 'none'}")


if __name__ == "__main__":
    main()
