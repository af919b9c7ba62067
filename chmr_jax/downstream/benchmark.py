"""The benchmark job: `finetune.run` over datasets, the results table beside the paper's numbers
(spec §9) and the lift summary (lift.json: pretrained vs the untrained control per dataset)."""
from __future__ import annotations

from chmr_jax.data import paths
from chmr_jax.downstream import finetune


# Paper Table 1 (spec §9): test mean, std over 5 seeds, x100 (ROC-AUC; MAE for biogenadme).
PAPER_TABLE = {
    "chembl2k": {"CHMR": (84.7, 0.2), "InfoAlign": (81.3, 0.6), "MLP": (76.8, 2.2), "RF": (54.7, 0.7)},
    "moltoxcast": {"CHMR": (69.3, 0.3), "InfoAlign": (66.4, 1.1), "MLP": (57.6, 1.0), "RF": (52.3, 0.1)},
    "broad6k": {"CHMR": (71.4, 0.2), "InfoAlign": (70.0, 0.1), "MLP": (63.3, 0.3), "RF": (55.5, 0.1)},
    "biogenadme": {"CHMR": (40.9, 0.3), "InfoAlign": (49.4, 0.2), "MLP": (66.2, 2.4), "RF": (52.8, 0.2)},
}


METHOD_LABELS = {"chmr": "chmr_jax", "untrained": "untrained encoder", "chmr+rf": "chmr_jax + RF", "mlp": "MLP (ours)", "rf": "RF (ours)",
                 "gnn": "GNN scratch (ours)"}


def benchmark_table(results: list[dict]) -> str:
    """Markdown: dataset, metric, seeds, mean +- sample std (ddof=1, x100) per method run here, then the
    paper's numbers (whose +- is the same sample std)."""
    methods = [m for m in METHOD_LABELS if any(m in r.get("methods", {"chmr": r}) for r in results)]
    paper_cols = ("CHMR", "InfoAlign", "MLP", "RF")
    with_lift = any(r.get("lift") for r in results)
    lines = ["| dataset | metric | seeds | " + " | ".join(METHOD_LABELS[m] for m in methods) + " | "
             + ("lift (paired) | " if with_lift else "")
             + " | ".join(f"paper {c}" for c in paper_cols) + " |",
             "|---|---|---|" + "---|" * (len(methods) + len(paper_cols) + with_lift)]
    for r in results:
        got = r.get("methods", {"chmr": r})
        paper = PAPER_TABLE.get(r["dataset"], {})
        ours = [f"{100 * got[m]['test_mean']:.1f} +- {100 * got[m]['test_std']:.1f}" if m in got else "-"
                for m in methods]
        theirs = [f"{paper[c][0]} +- {paper[c][1]}" if c in paper else "-" for c in paper_cols]
        lift = r.get("lift")
        lift_cell = ([f"{100 * lift['mean']:+.1f} +- {100 * lift['std']:.1f}" if lift else "-"] if with_lift else [])
        lines.append(f"| {r['dataset']} | {r['metric']} | {len(got['chmr']['runs'])} | " + " | ".join(ours + lift_cell)
                     + " | " + " | ".join(theirs) + " |")
    no_paper = [r["dataset"] for r in results if r["dataset"] not in PAPER_TABLE]
    if no_paper:
        # (The MoleculeNet sets appear in the paper only as one average over five, spec §9.)
        lines.append(f"\npaper columns: '-' where the paper reports no number for the dataset ({', '.join(no_paper)}); "
                     f"its Table 1 has {', '.join(PAPER_TABLE)} only.")
    budgets = {(o["encoder_epochs"], o["encoder_patience"], o["lr"]) for r in results if "gnn" in r.get("methods", {})
               for o in [r.get("settings", {}).get("config", {}).get("optim")] if o}
    if budgets:
        lines.append("\nGNN scratch: the encoder architecture from a random initialisation trained end to end, "
                     + "; ".join(f"at most {e} epochs (early stop after {p} without a better validation score), "
                                 f"lr {lr}" for e, p, lr in sorted(budgets)) + ".")
    return "\n".join(lines)


def lift_report(results: list[dict], command: str = "") -> dict:
    """The benchmark's lift summary (issue 12's lift.json): per dataset the pretrained and untrained
    scores, their paired lift (positive = pretrained better) and the best in-house baseline."""
    out = {"pretrain_epochs": None, "pretrain_steps": None, "seeds": None, "command": command,
           "std": "sample std over seeds (ddof=1), as the paper's tables", "datasets": {}}
    for r in results:
        if not r.get("lift"):
            continue
        got, metric = r["methods"], r["metric"]
        pick = max if finetune.higher_is_better(metric) else min
        base = [m for m in finetune.BASELINES if m in got]
        best = pick(base, key=lambda m: got[m]["test_mean"]) if base else None
        stat = lambda m: {"mean": got[m]["test_mean"], "std": got[m]["test_std"]}
        out["seeds"] = [run["seed"] for run in got["chmr"]["runs"]]
        out["pretrain_steps"] = r["pretrained_step"]
        out["pretrain_epochs"] = r.get("pretrained_epochs")
        out["datasets"][r["dataset"]] = {
            "metric": metric, "higher_is_better": finetune.higher_is_better(metric),
            "pretrained": stat("chmr"), "untrained": stat("untrained"),
            "lift": {"mean": r["lift"]["mean"], "std": r["lift"]["std"]},
            "best_baseline": {"name": best, **stat(best)} if best else None, "baselines_run": base}
    return out


def run_benchmark(config, pretrained, workdir, names, data_dir=None, log=print, command: str = "",
                  table_only: bool = False) -> list[dict]:
    """finetune.run_or_reuse for each dataset in `names` (workdir/<dataset>/), then results.md / results.json.

    table_only: compute nothing; tabulate the datasets whose workdir/<dataset>/results.json exists, with
    whatever methods each holds (e.g. to report a benchmark that is still being extended)."""
    import json

    workdir = paths.as_path(workdir)
    results = []
    for name in names:
        if table_only:
            done = workdir / name / "results.json"
            if done.exists():
                results.append(json.loads(done.read_text()))
            else:
                log(f"{name}: no {done} yet; left out of the table")
            continue
        cfg = config.copy_and_resolve_references()
        cfg.dataset = name
        results.append(finetune.run_or_reuse(cfg, pretrained, workdir / name, data_dir, log))
    if not results:
        raise FileNotFoundError(f"{workdir}: no finished dataset (<dataset>/results.json) to tabulate")
    table = benchmark_table(results)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.md").write_text(table + "\n")
    (workdir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    if any(r.get("lift") for r in results):
        (workdir / "lift.json").write_text(json.dumps(lift_report(results, command), indent=1))
    log("\n" + table + f"\n\nwritten to {workdir / 'results.md'} and results.json")
    return results
