"""Missing-modality stress test: how the downstream score degrades as cellular profiles go missing.

For each level f in `levels` a further fraction f of every modality's observed profiles is hidden
(`Corpus.hide`, one seed), and for each imputation of the main inputs ('propagate' = spec Eq. 1,
'mean', 'zero'; spec §2) CHMR is pretrained on that corpus (a short schedule) and fine-tuned on one
benchmark. Workdir layout (every stage resumes or is reused when re-run with the same settings):

  corpus-missing<f>/                   the corpus with profiles hidden (manifest records the counts)
  <imputation>-missing<f>/pretrain/    a `chmr-jax pretrain` workdir
  <imputation>-missing<f>/finetune/    a `chmr-jax finetune` workdir (results.json)
  structure_only/pretrain, /finetune   the same schedule without any cellular modality (SCA and VICReg
                                       off, context walks over molecule nodes only): what the profiles add
                                       beyond the structure objective; one line, the same at every level
  results.json, results.md, stress.png  the metric per level and imputation (mean +- std over seeds)
"""
from __future__ import annotations

import json
from pathlib import Path

from chmr_jax.data import files, paths
from chmr_jax.downstream import finetune
from chmr_jax.training import pretrain

IMPUTATIONS = ("propagate", "mean", "zero")


def _pretrain_and_finetune(cfg, finetune_config, run_dir, data_dir, log) -> dict:
    """pretrain.run then finetune.run_or_reuse in run_dir/{pretrain,finetune}; never fine-tunes a partial run."""
    summary = pretrain.run(cfg, run_dir / "pretrain", data_dir, log)
    if summary.get("stopped_by") or (cfg.train.steps > 0 and summary.get("steps") != cfg.train.steps):
        # interrupted (SIGTERM/Ctrl-C checkpoint and return): never fine-tune a partial encoder
        raise KeyboardInterrupt(f"pretraining of {run_dir} stopped at step {summary.get('steps')} "
                                f"({summary.get('stopped_by')}); re-run the same command to continue")
    return finetune.run_or_reuse(finetune_config, run_dir / "pretrain", run_dir / "finetune", data_dir, log)


def run(config, finetune_config, levels, imputations=IMPUTATIONS, workdir="runs/stress", data_dir=None,
        hide_seed: int = 0, log=print, structure_only: bool = True) -> list[dict]:
    """Runs the grid levels x imputations; returns one row per (level, imputation). structure_only: also
    pretrain (once) without cellular modalities and put its score beside every row."""
    workdir = paths.local_only(workdir, "--workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    levels = [float(f) for f in levels]
    bad = [f for f in levels if not 0.0 <= f < 1.0]
    if bad or not levels:
        raise ValueError(f"missing levels must be fractions in [0, 1), got {bad or levels}")
    unknown = [m for m in imputations if m not in IMPUTATIONS]
    if unknown or not imputations:
        raise ValueError(f"imputations: unknown {unknown}; choose from {list(IMPUTATIONS)}")
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    corpus = None
    rows, row_runs = [], []   # row_runs[i]: rows[i]'s fine-tuning runs (per seed), for the structure-only pairing
    for level in levels:
        hidden_dir = workdir / f"corpus-missing{level:g}"
        if not (hidden_dir / "manifest.json").exists():
            if corpus is None:
                corpus = pretrain.load_corpus(config, data_dir, cache_dir, config.workers or None, log)
            hidden = corpus.hide(level, hide_seed)
            hidden.save(hidden_dir)
            log(f"missing {level:g}: hid {hidden.manifest['hidden']['modalities']} -> {hidden_dir}")
        manifest = json.loads((hidden_dir / "manifest.json").read_text())
        for imputation in imputations:
            run_dir = workdir / f"{imputation}-missing{level:g}"
            cfg = config.copy_and_resolve_references()
            cfg.corpus.saved = str(hidden_dir.resolve())
            cfg.pretrain_data.imputation = imputation
            log(f"== missing {level:g}, imputation {imputation}: pretrain -> {run_dir / 'pretrain'}")
            result = _pretrain_and_finetune(cfg, finetune_config, run_dir, data_dir, log)
            row_runs.append(result["runs"])
            control = result.get("methods", {}).get("untrained")   # the same encoder untrained, same seeds
            rows.append({"missing": level, "imputation": imputation, "dataset": result["dataset"],
                         "metric": result["metric"], "test_mean": result["test_mean"],
                         "test_std": result["test_std"], "seeds": len(result["runs"]),
                         "untrained_mean": control["test_mean"] if control else None,
                         "untrained_std": control["test_std"] if control else None,
                         "lift": result.get("lift"),
                         "observed": {n: v["observed_before"] - v["hidden"]
                                      for n, v in manifest["hidden"]["modalities"].items()}})
    if structure_only:
        # No profile at all, so the hidden fraction does not matter: one run on the full corpus, the same
        # schedule, seeds and fine-tuning. Its own untrained control is another architecture (no cellular
        # encoders): the pretrained rows' lift over it is paired by fine-tuning seed.
        cfg = config.copy_and_resolve_references()
        cfg.pretrain_data.modalities = "none"
        log(f"== structure only (no cellular modality): pretrain -> {workdir / 'structure_only' / 'pretrain'}")
        result = _pretrain_and_finetune(cfg, finetune_config, workdir / "structure_only", data_dir, log)
        by_seed = {r["seed"]: r["test"][result["metric"]] for r in result["runs"]}
        sign = 1.0 if finetune.higher_is_better(result["metric"]) else -1.0
        for row, runs in zip(rows, row_runs):
            row.update(structure_only_mean=result["test_mean"], structure_only_std=result["test_std"])
            diffs = [sign * (r["test"][row["metric"]] - by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]
            if diffs:
                row["lift_over_structure"] = {"mean": sum(diffs) / len(diffs), "std": finetune.sample_std(diffs)}
    files.atomic_write_text(workdir / "results.json", json.dumps(rows, indent=1))
    table = format_table(rows)
    files.atomic_write_text(workdir / "results.md", table + "\n")
    plot(rows, workdir / "stress.png")
    log("\n" + table + f"\n\nwritten to {workdir / 'results.md'}, results.json and stress.png")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per missing level, one column per imputation (test metric x100, mean +- sample
    std over seeds; with the untrained control, the paired lift over it in brackets), then the
    untrained control's column."""
    imputations = list(dict.fromkeys(r["imputation"] for r in rows))
    levels = list(dict.fromkeys(r["missing"] for r in rows))
    cell = {(r["missing"], r["imputation"]): r for r in rows}
    metric = rows[0]["metric"] if rows else ""
    control = any(r.get("untrained_mean") is not None for r in rows)
    structure = any(r.get("structure_only_mean") is not None for r in rows)

    def value(r):
        text = f"{100 * r['test_mean']:.1f} +- {100 * r['test_std']:.1f}"
        if r.get("lift"):
            text += f" ({100 * r['lift']['mean']:+.1f} +- {100 * r['lift']['std']:.1f})"
        return text

    lines = ["| extra missing | observed profiles | " + " | ".join(f"{m} ({metric} x100)" for m in imputations)
             + (" | untrained control" if control else "") + (" | structure-only pretraining" if structure else "")
             + " |",
             "|---|---|" + "---|" * (len(imputations) + control + structure)]
    for level in levels:
        first = cell[(level, imputations[0])]
        obs = ", ".join(f"{n} {v}" for n, v in first["observed"].items())
        vals = [value(cell[(level, m)]) if (level, m) in cell else "-" for m in imputations]
        if control:
            vals.append(f"{100 * first['untrained_mean']:.1f} +- {100 * first['untrained_std']:.1f}"
                        if first.get("untrained_mean") is not None else "-")
        if structure:
            vals.append(f"{100 * first['structure_only_mean']:.1f} +- {100 * first['structure_only_std']:.1f}"
                        if first.get("structure_only_mean") is not None else "-")
        lines.append(f"| {level:g} | {obs} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """The metric against the extra missing fraction, one line (with std error bars) per imputation."""
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt

    import math
    sd = lambda x: 0.0 if x is None or not math.isfinite(x) else x   # one seed: the sample std is NaN
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=120)
    values = []
    for imputation in dict.fromkeys(r["imputation"] for r in rows):
        rs = sorted((r for r in rows if r["imputation"] == imputation), key=lambda r: r["missing"])
        ax.errorbar([r["missing"] for r in rs], [100 * r["test_mean"] for r in rs],
                    yerr=[100 * sd(r["test_std"]) for r in rs], marker="o", capsize=3, label=imputation)
        values += [100 * (r["test_mean"] + sign * sd(r["test_std"])) for r in rs for sign in (-1, 1)]
    control = sorted((r for r in rows if r.get("untrained_mean") is not None and r["imputation"] == rows[0]["imputation"]),
                     key=lambda r: r["missing"])
    if control:   # the untrained encoder does not see the profiles: one level, drawn across the plot
        mean, std = 100 * control[0]["untrained_mean"], 100 * sd(control[0]["untrained_std"])
        ax.axhline(mean, color="black", ls="--", lw=1, label="untrained control")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
        values += [mean - std, mean + std]
    structure = [r for r in rows if r.get("structure_only_mean") is not None]
    if structure:   # no profiles at all: one level too
        mean, std = 100 * structure[0]["structure_only_mean"], 100 * sd(structure[0]["structure_only_std"])
        ax.axhline(mean, color="tab:gray", ls=":", lw=1.5, label="structure-only pretraining")
        values += [mean - std, mean + std]
    if values:
        # At least 2 points of the metric on the axis: matplotlib's autoscale would stretch a 0.02-point
        # spread over the whole height and make it look like a collapse.
        lo, hi = min(values), max(values)
        pad = max(0.0, 2.0 - (hi - lo)) / 2 + 0.1 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)
    if rows:
        ax.set_title(f"{rows[0]['dataset']}: test {rows[0]['metric']} vs hidden cellular profiles")
        ax.set_ylabel(f"test {rows[0]['metric']} x100")
    ax.set_xlabel("extra fraction of observed profiles hidden")
    ax.legend(title="imputation", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside, never over
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG header (for tests and sanity checks, no imaging library needed)."""
    head = Path(path).read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")

