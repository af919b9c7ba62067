"""Interpretability plots of a pretraining workdir (PNG, matplotlib), for `chmr-jax report`.

  loss_curves.png       total loss and each term (cpr, sca, vq) against the step (metrics.jsonl)
  collapse.png          effective rank and per-dimension std of p_fingerprint, p_graph and the anchor
                        during training (collapse/<name>/... in metrics.jsonl): a falling rank is a
                        representation collapsing while it trains
  code_usage.png        per tree level: a histogram of how many corpus molecules each code holds (the
                        final encoder's anchors), and the per-level perplexity over training
  embedding_map.png     2-D PCA (or t-SNE) of the anchors coloured by level-1 and level-2 code (a level-2
                        code a shade of its parent's colour), and of every modality's projections
                        (other hues, one marker each; a modality with few points drawn on top, outlined)
  enrichment_<ds>.png   with a benchmark: log2 enrichment of each task's positives per level-2/3 branch
  report.json           the numbers behind the plots (usage counts, perplexities, enrichment table)

Every plot numbers a level-h code 0 .. 2^h - 1 (`tree_codes` hold heap indices, 2^h + code).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from chmr_jax.downstream import export
from chmr_jax.training import metric_writers


def _plt():
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def loss_curves(rows: list[dict], path) -> list[str]:
    plt = _plt()
    terms = [k for k in ("loss", "loss/cpr", "loss/sca", "loss/vq") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3), dpi=110, squeeze=False)
    for ax, term in zip(axes[0], terms):
        pts = [(r["step"], r[term]) for r in rows if term in r and np.isfinite(r[term])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(term)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return terms


def collapse_over_training(rows: list[dict]) -> dict:
    """{projection: {'step': [...], 'effective_rank': [...], 'std': [...]}} from collapse/<name>/<stat>."""
    out: dict = {}
    for r in rows:
        names = {k.split("/")[1] for k in r if k.startswith("collapse/") and k.endswith("/effective_rank")}
        for name in sorted(names):
            series = out.setdefault(name, {"step": [], "effective_rank": [], "std": []})
            series["step"].append(r["step"])
            series["effective_rank"].append(r[f"collapse/{name}/effective_rank"])
            series["std"].append(r.get(f"collapse/{name}/std", float("nan")))
    return out


def collapse_plot(series: dict, path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), dpi=110)
    for name, s in series.items():
        axes[0].plot(s["step"], s["effective_rank"], lw=1, label=name)
        axes[1].plot(s["step"], s["std"], lw=1, label=name)
    for ax, title in zip(axes, ("effective rank (batch)", "mean per-dimension std")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def perplexity_over_training(rows: list[dict]) -> dict:
    """{modality: [[step, perplexity level 1, ..., level H], ...]} from the vq/<m>/perplexity/<h> scalars."""
    out: dict = {}
    for r in rows:
        for key, value in r.items():
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "vq" and parts[2] == "perplexity":
                out.setdefault(parts[1], {}).setdefault(r["step"], {})[int(parts[3])] = value
    return {m: [[s] + [v[h] for h in sorted(v)] for s, v in sorted(steps.items())] for m, steps in out.items()}


def level_codes(codes: np.ndarray) -> np.ndarray:
    """[N, H] within-level codes 0 .. 2^h - 1 from the heap indices [N, H] of `tree_codes` (heap index
    = 2^h + code): the one numbering every plot uses."""
    return np.asarray(codes) - 2 ** np.arange(1, codes.shape[1] + 1)


def code_usage(codes: np.ndarray) -> list[np.ndarray]:
    """Per level h (1..H): counts [2^h] of molecules whose path passes through each code."""
    within = level_codes(codes)
    return [np.bincount(within[:, h - 1], minlength=2 ** h) for h in range(1, codes.shape[1] + 1)]


def perplexity(counts: np.ndarray) -> float:
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(np.exp(-(p * np.log(p)).sum())) if p.size else 0.0


def code_usage_plot(usage: list[np.ndarray], over_training: dict, path) -> None:
    """A grid (at most 4 panels a row): molecules per code at each level, then perplexity over training."""
    plt = _plt()
    depth = len(usage)
    ncols = min(4, depth + 1)
    nrows = -(-(depth + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 3.3 * nrows), dpi=110, squeeze=False,
                             layout="constrained")
    axes = axes.ravel()
    for h, (ax, counts) in enumerate(zip(axes[:depth], usage), start=1):
        ax.bar(np.arange(len(counts)), counts, width=0.9)
        ax.set_title(f"level {h}: perplexity {perplexity(counts):.1f} of {2 ** h}", fontsize=10)
        ax.set_xlabel(f"level-{h} code (0..{2 ** h - 1})", fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=8)
        if (h - 1) % ncols == 0:
            ax.set_ylabel("molecules", fontsize=9)
    ax = axes[depth]
    if over_training:
        # mean over the quantised modalities: one line per level keeps the panel readable
        arr = np.mean([np.asarray(series, float) for series in over_training.values()], axis=0)
        for h in range(1, arr.shape[1]):
            ax.plot(arr[:, 0], arr[:, h], lw=1.2, label=f"level {h} (max {2 ** h})")
        # inside the panel (where the lines leave room): below it, the legend fell off the figure
        ax.legend(fontsize=8, loc="best", framealpha=0.85, title="level (codes)", title_fontsize=8)
        # log2 axis from 1 (one code used) to the deepest level's 2^H codes: each line reads against its maximum
        ax.set_yscale("log", base=2)
        ax.set_ylim(0.9, 2 ** (arr.shape[1] - 1) * 1.15)
        ax.set_yticks([2 ** h for h in range(arr.shape[1])], [str(2 ** h) for h in range(arr.shape[1])])
        ax.minorticks_off()
        ax.grid(axis="y", alpha=0.3)
    ax.set_title("perplexity during training\n(mean over modalities)", fontsize=10)
    ax.set_ylabel("perplexity (codes in use)", fontsize=9)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    for a in axes[depth + 1:]:
        a.set_visible(False)
    fig.savefig(path)
    plt.close(fig)


def project_2d(x: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if method == "tsne":
        from sklearn.manifold import TSNE
        return TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, len(x) - 1)).fit_transform(x)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


# Colours: tree branches in blues and oranges (a level-2 code a shade of its level-1 parent's colour, so a
# colour means one branch in both code panels); modalities in other hues with their own markers, so no
# colour in the modality panel reads as a code.
_BRANCH_SHADES = ("#08306b", "#4292c6", "#7f2704", "#fd8d3c")   # level-2 codes 0, 1 (under 0); 2, 3 (under 1)
_LEVEL1 = ("#2171b5", "#e6550d")
# (no blue, orange or brown here: those are the codes' colours)
_MODALITY_STYLES = (("#2ca02c", "o"), ("#9467bd", "s"), ("#e377c2", "^"), ("#7f7f7f", "D"), ("#bcbd22", "v"),
                    ("#000000", "P"), ("#d62728", "X"), ("#17becf", "*"))


def _code_colour(level: int, code: int) -> str:
    if level == 1:
        return _LEVEL1[code % 2]
    if level == 2:
        return _BRANCH_SHADES[code % 4]
    import matplotlib.pyplot as plt
    return plt.get_cmap("tab20")(code % 20)


def embedding_map(anchor: np.ndarray, codes: np.ndarray, modality_points: dict, path, method="pca") -> None:
    plt = _plt()
    xy = project_2d(anchor, method)
    axis = "PC" if method == "pca" else "t-SNE"
    within = level_codes(codes)          # codes 0 .. 2^h - 1, as in code_usage.png
    panels = [(1, within[:, 0])]
    if codes.shape[1] > 1:
        panels.append((2, within[:, 1]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.8 * (len(panels) + 1), 4.6), dpi=110)
    for ax, (level, colour) in zip(axes, panels):
        for code in np.unique(colour):            # categorical: one colour and legend entry per code
            sel = colour == code
            ax.scatter(xy[sel, 0], xy[sel, 1], s=7, color=_code_colour(level, int(code)),
                       label=f"code {code} ({sel.sum()})")
        parent = "" if level == 1 else "\n(shades of the level-1 parent's colour)"
        ax.set_title(f"anchors by level-{level} code ({method}){parent}", fontsize=10)
        ax.legend(fontsize=8, markerscale=2, title="code (molecules)", title_fontsize=8)
    ax = axes[-1]
    names = list(modality_points)
    stacked = np.concatenate([modality_points[n] for n in names])
    xy_m = project_2d(stacked, method)
    starts = np.cumsum([0] + [len(modality_points[n]) for n in names])
    # Larger groups first: a modality with few points (e.g. 3 molecules with a cell profile) is drawn on top,
    # bigger and outlined, so it is seen and not buried under the others.
    for i in sorted(range(len(names)), key=lambda i: -len(modality_points[names[i]])):
        n, k = names[i], len(modality_points[names[i]])
        colour, marker = _MODALITY_STYLES[i % len(_MODALITY_STYLES)]
        few = k < 30
        ax.scatter(xy_m[starts[i]:starts[i + 1], 0], xy_m[starts[i]:starts[i + 1], 1], s=40 if few else 7,
                   color=colour, marker=marker, edgecolors="black" if few else "none", linewidths=0.6,
                   zorder=3 if few else 2, label=f"{n} ({k})")
    ax.set_title(f"projections by modality ({method})", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda j: names.index(labels[j].rsplit(" (", 1)[0]))
    ax.legend([handles[j] for j in order], [labels[j] for j in order], fontsize=8, title="modality (points)",
              title_fontsize=8)
    for a in axes:
        a.set_xlabel(f"{axis} 1", fontsize=9)
        a.set_ylabel(f"{axis} 2", fontsize=9)
        a.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def enrichment(codes: np.ndarray, labels: np.ndarray, level: int) -> np.ndarray:
    """log2((positives in branch / positives) / (labelled in branch / labelled)) per task and level-`level`
    code: [tasks, 2^level]; NaN where a task has no positive or a branch no labelled molecule."""
    branch = level_codes(codes)[:, level - 1]
    out = np.full((labels.shape[1], 2 ** level), np.nan)
    for t in range(labels.shape[1]):
        lab = ~np.isnan(labels[:, t])
        pos = lab & (labels[:, t] > 0.5)
        if pos.sum() == 0:
            continue
        n_lab = np.bincount(branch[lab], minlength=2 ** level).astype(float)
        n_pos = np.bincount(branch[pos], minlength=2 ** level).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = (n_pos / pos.sum()) / (n_lab / lab.sum())
            out[t] = np.where(n_lab > 0, np.log2(np.maximum(ratio, 1e-3)), np.nan)
    return out


def enrichment_limit(table: np.ndarray) -> float:
    """The heatmap's symmetric colour limit: the largest |value| rounded up to a tenth, between 0.5 and 3;
    a branch without positives (the 1e-3 floor, log2 = -10) is left out of it and drawn saturated."""
    finite = np.abs(table[np.isfinite(table) & (table > np.log2(1e-3) + 1e-6)])
    return float(np.clip(np.ceil((finite.max() if finite.size else 0.5) * 10) / 10, 0.5, 3.0))


def enrichment_plot(table: np.ndarray, task_names, level: int, dataset: str, path) -> None:
    """Heatmap of `table` [tasks, 2^level] (the first 40 tasks); cells annotated when few, grey = no value."""
    plt = _plt()
    shown = np.ma.masked_invalid(table[:40])
    rows, cols = shown.shape
    fig, ax = plt.subplots(figsize=(max(6.5, 2.8 + 0.55 * cols), max(3.2, 1.9 + 0.3 * rows)), dpi=110,
                           layout="constrained")
    cmap = plt.get_cmap("RdBu_r").copy()
    cmap.set_bad("0.85")                  # no labelled molecule in the branch / no positive in the task
    lim = enrichment_limit(table[:40])   # the data's own range: +-0.3 is not drawn almost white on a +-3 scale
    im = ax.imshow(shown, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(rows), [str(t)[:28] for t in task_names[:rows]], fontsize=8)
    ax.set_xticks(range(cols), [str(i) for i in range(cols)], fontsize=8)
    ax.set_xlabel(f"level-{level} code (0..{cols - 1}, as in code_usage.png)", fontsize=9)
    if rows * cols <= 160:                # numbers stay legible up to ~20 tasks at level 3
        for (t, c), v in np.ndenumerate(table[:40]):
            if np.isfinite(v):
                ax.text(c, t, "no pos." if v <= np.log2(1e-3) + 1e-6 else f"{v:+.1f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(v) > 0.6 * lim else "black")
    more = f" (first {rows} of {len(table)} tasks)" if len(table) > rows else ""
    ax.set_title(f"{dataset}: log2 enrichment of positives per branch{more}\n"
                 "(share of positives / share of labelled molecules; grey: no labelled molecule or positive)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, extend="both" if np.nanmax(np.abs(table[:40]), initial=0) > lim
                 else "neither").set_label(f"log2 enrichment (scale +-{lim:g})", fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def run(pretrained, out=None, benchmark: str | None = None, method: str = "pca", max_molecules: int = 2000,
        data_dir=None, cache_dir=None, seed: int = 0, log=print) -> dict:
    """Writes the PNGs and report.json into `out` (default <pretrained>/report; a gs:// folder too: written
    in a fresh local folder, then uploaded); returns report.json."""
    from chmr_jax.data import paths
    target = os.fspath(out) if out else os.fspath(paths.as_path(pretrained) / "report")
    kw = dict(benchmark=benchmark, method=method, max_molecules=max_molecules, data_dir=data_dir,
              cache_dir=cache_dir, seed=seed, log=log)
    if not paths.is_remote(target):
        return _run(pretrained, Path(target), **kw)
    with paths.staged(target, "--out") as local:
        report = _run(pretrained, local, name=target, **kw)
        paths.push(local, "--out", to=target)
    return report


def _run(pretrained, out: Path, benchmark, method, max_molecules, data_dir, cache_dir, seed, log, name=None) -> dict:
    import jax

    from chmr_jax.data import paths
    from chmr_jax.training import pretrain

    from chmr_jax.data import datasets
    if benchmark and benchmark not in datasets.BENCHMARKS:   # checked before any work
        raise ValueError(f"--benchmark {benchmark!r}: unknown benchmark; choose from {list(datasets.ALL_BENCHMARKS)}")
    pretrained = paths.as_path(pretrained)
    model, config, meta = pretrain.load_pretrained(pretrained)   # restored once, for the encoder and the projectors
    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(cache_dir or config.cache_dir or None)
    corpus_path = pretrain.corpus_cache_path(config, cache_dir)
    if not config.corpus.saved and not (corpus_path / "manifest.json").exists():
        # Said before any work: on the real corpus this build takes minutes and GBs of cache.
        log(f"report: building the pretraining corpus (corpus.kind={config.corpus.kind}) first: code_usage.png and "
            f"embedding_map.png embed up to {max_molecules} of its molecules and {cache_dir} does not hold it "
            f"(built once, then cached in {corpus_path}; --cache_dir=<the pretraining run's cache> skips this)")
    out.mkdir(parents=True, exist_ok=True)   # (after the workdir proved readable: no empty folder on failure)
    encoder = export.encoder_of(model, config, meta, pretrained)
    report: dict = {"pretrained": str(pretrained), "step": meta["step"], "files": []}

    metrics_path = pretrained / "metrics.jsonl"
    rows = metric_writers.read_jsonl(metrics_path) if metrics_path.exists() else []
    if rows:
        report["loss_terms"] = loss_curves(rows, out / "loss_curves.png")
        report["files"].append("loss_curves.png")
        collapse = collapse_over_training(rows)
        if collapse:
            collapse_plot(collapse, out / "collapse.png")
            report["collapse"] = {n: {"first_effective_rank": v["effective_rank"][0],
                                      "last_effective_rank": v["effective_rank"][-1],
                                      "first_std": v["std"][0], "last_std": v["std"][-1]} for n, v in collapse.items()}
            report["files"].append("collapse.png")
    else:
        log(f"no {metrics_path} (a converted checkpoint?): skipping loss curves")

    corpus = pretrain.load_corpus(config, data_dir, cache_dir, config.workers or None, log=lambda *a, **k: None)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(corpus), size=min(max_molecules, len(corpus)), replace=False))
    sample = corpus.subset(pick)
    emb = export.embed_features(encoder, sample.features, show_progress=False)
    usage = code_usage(emb["tree_codes"])
    over_training = perplexity_over_training(rows)
    code_usage_plot(usage, over_training, out / "code_usage.png")
    report["code_usage"] = {f"level_{h}": {"counts": c.tolist(), "perplexity": perplexity(c)}
                            for h, c in enumerate(usage, start=1)}
    report["perplexity_over_training"] = over_training
    report["files"].append("code_usage.png")

    points = {n: emb[n] for n in encoder.mol_names}
    for modality_name, modality in sample.modalities.items():   # (not `name`: the folder's name for the last line)
        if modality_name in model.projectors and modality.available.any():
            x = modality.values[modality.available].astype(np.float32)
            projector = model.projectors[modality_name]
            points[modality_name] = np.asarray(jax.jit(lambda v: projector(v))(x))
    embedding_map(emb["anchor"], emb["tree_codes"], points, out / "embedding_map.png", method)
    report["embedding_map"] = {"method": method, "molecules": int(len(pick)),
                               "points": {n: int(len(v)) for n, v in points.items()}}
    report["files"].append("embedding_map.png")

    if benchmark:
        from chmr_jax.data import datasets, prepare
        ds = datasets.load_benchmark(benchmark, data_dir, cache_dir)
        prepared = prepare.prepare(ds, encoder.settings, cache_dir)
        codes = export.embed_features(encoder, prepared.features, show_progress=False)["tree_codes"]
        labels = ds.labels[prepared.features.rows]
        if ds.task_type != "classification":
            log(f"{benchmark} is a regression benchmark: enrichment uses values above each task's median")
            med = np.nanmedian(labels, axis=0)
            labels = np.where(np.isnan(labels), np.nan, (labels > med).astype(float))
        level = min(3, codes.shape[1])
        table = enrichment(codes, labels, level)
        enrichment_plot(table, ds.task_names, level, benchmark, out / f"enrichment_{benchmark}.png")
        report["enrichment"] = {"dataset": benchmark, "level": level, "tasks": list(ds.task_names),
                                "log2_enrichment": np.where(np.isnan(table), None, table).tolist()}
        report["files"].append(f"enrichment_{benchmark}.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(f"report: {', '.join(report['files'])} -> {name or out}")   # (the folder written: `name` is never reused)
    return report
