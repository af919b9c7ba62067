"""`chmr-jax report` on the tiny run: every PNG is written and the numbers behind them are right."""
import json

import numpy as np
import pytest

from chmr_jax import cli
from chmr_jax.downstream import report, stress


def test_report_command_writes_its_pngs(tiny_run, data_dir, cache_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main(["report", "--pretrained", str(tiny_run), "--out", str(out), "--benchmark", "bace",
                     "--cache_dir", str(cache_dir)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["files"] == ["loss_curves.png", "collapse.png", "code_usage.png", "embedding_map.png",
                            "enrichment_bace.png"]
    # the last line names the folder written (issue 36: it named the last modality, 'expression')
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {', '.join(rep['files'])} -> {out}"
    assert set(rep["collapse"]) == {"anchor", "fingerprint", "graph"}
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert rep["collapse"]["anchor"]["last_effective_rank"] == rows[-1]["collapse/anchor/effective_rank"]
    assert 1.0 <= rep["collapse"]["graph"]["first_effective_rank"] <= 16      # latent width of configs/test.py
    for name in rep["files"]:
        w, h = stress.read_png_size(out / name)
        assert w > 300 and h > 150, name
    assert rep["loss_terms"] == ["loss", "loss/cpr", "loss/sca", "loss/vq"]
    usage = rep["code_usage"]
    assert [len(usage[f"level_{h}"]["counts"]) for h in (1, 2, 3)] == [2, 4, 8]
    # every sampled molecule (the whole 96-molecule corpus) sits on exactly one code per level
    assert all(sum(usage[f"level_{h}"]["counts"]) == 96 for h in (1, 2, 3))
    assert set(rep["perplexity_over_training"]) == {"fingerprint", "graph", "cell", "gene", "expression"}
    assert len(rep["perplexity_over_training"]["cell"]) == 10            # one row per logged step
    assert rep["embedding_map"]["points"]["fingerprint"] == 96 and "cell" in rep["embedding_map"]["points"]
    assert rep["enrichment"]["level"] == 3 and len(rep["enrichment"]["log2_enrichment"][0]) == 8


def test_enrichment_and_perplexity_closed_forms():
    codes = np.array([[2, 4], [2, 5], [3, 6], [3, 7]])
    labels = np.array([[1.0], [1.0], [0.0], [np.nan]])
    table = report.enrichment(codes, labels, 1)
    # positives all in branch 0 (code 2): 2/2 of positives vs 2/3 of labelled -> log2(1.5); branch 1 has none
    np.testing.assert_allclose(table[0], [np.log2(1.5), np.log2(1e-3)])
    assert [c.tolist() for c in report.code_usage(codes)] == [[2, 2], [1, 1, 1, 1]]
    assert report.perplexity(np.array([5, 5])) == pytest.approx(2.0)
    assert report.perplexity(np.array([7, 0, 0])) == 1.0


def test_report_says_first_that_it_builds_an_uncached_corpus(tiny_run, tmp_path):
    """With a cache that lacks the run's corpus, the first line says what is built, where and why,
    before any plot is written; with the corpus cached, nothing of the kind is said."""
    from chmr_jax.training import pretrain
    empty, lines, seen = tmp_path / "empty_cache", [], []
    log = lambda msg: (lines.append(str(msg)), seen.append(sorted(p.name for p in (tmp_path / "r1").glob("*.png"))))
    report.run(tiny_run, tmp_path / "r1", cache_dir=empty, log=log)
    config = pretrain.load_pretrained(tiny_run)[1]
    path = pretrain.corpus_cache_path(config, empty)
    assert lines[0].startswith("report: building the pretraining corpus") and str(path) in lines[0]
    assert "code_usage.png" in lines[0] and seen[0] == [] and (path / "manifest.json").exists()
    lines.clear()
    report.run(tiny_run, tmp_path / "r2", cache_dir=empty, log=lines.append)
    assert not any("building" in line for line in lines)


def test_plots_read_at_a_glance(tmp_path, monkeypatch):
    """A depth-6 tree's code_usage.png is a grid (not one 2002-px row); enrichment has a readable size;
    every plot numbers codes 0 .. 2^h - 1 (embedding_map too, not by heap index)."""
    import matplotlib.figure

    legends, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (
        legends.append([[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]),
        save(fig, *a, **k))[1])
    rng = np.random.default_rng(0)
    codes = np.stack([2 ** h + rng.integers(0, 2 ** h, 300) for h in range(1, 7)], 1)      # heap indices
    over = {"graph": [[s] + [1.0 + h for h in range(1, 7)] for s in range(5)]}
    report.code_usage_plot(report.code_usage(codes), over, tmp_path / "usage.png")
    w, h = stress.read_png_size(tmp_path / "usage.png")
    assert w <= 1800 and h >= 2 * 300                        # two rows of four panels, not a 2002 x 308 strip
    report.enrichment_plot(rng.normal(size=(1, 8)), ["Class"], 3, "bace", tmp_path / "enr.png")
    w, h = stress.read_png_size(tmp_path / "enr.png")
    assert w >= 600 and h >= 300                             # was 440 x 156
    report.embedding_map(rng.normal(size=(300, 4)), codes, {"graph": rng.normal(size=(300, 4))},
                         tmp_path / "map.png")
    level1, level2 = legends[-1][0], legends[-1][1]
    assert [t.split(" (")[0] for t in level1] == ["code 0", "code 1"]
    assert [t.split(" (")[0] for t in level2] == ["code 0", "code 1", "code 2", "code 3"]


def test_embedding_map_axes_colours_and_a_small_modality(tmp_path, monkeypatch):
    """Issue 36: every panel has axis labels; a colour means one thing across panels (a level-2 code a
    shade of its parent's hue, no modality drawn in a code's colour); 3 cell points are drawn on top."""
    import matplotlib.colors
    import matplotlib.figure

    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    rng = np.random.default_rng(0)
    codes = np.stack([2 ** h + rng.integers(0, 2 ** h, 200) for h in range(1, 4)], 1)
    points = {"fingerprint": rng.normal(size=(200, 4)), "graph": rng.normal(size=(200, 4)), "cell": rng.normal(size=(3, 4))}
    report.embedding_map(rng.normal(size=(200, 4)), codes, points, tmp_path / "map.png")
    axes = figures[-1].axes
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in axes] == [("PC 1", "PC 2")] * 3
    colours = lambda ax: {matplotlib.colors.to_hex(c.get_facecolor()[0]): c.get_label() for c in ax.collections}
    level1, level2, modalities = (colours(ax) for ax in axes)
    assert not set(modalities) & (set(level1) | set(level2))          # no modality in a code's colour
    hue = lambda hex_: matplotlib.colors.rgb_to_hsv(matplotlib.colors.to_rgb(hex_))[0]
    parent = {label.split(" (")[0]: hue(h) for h, label in level1.items()}
    for h, label in level2.items():                                   # codes 0, 1 under 0; 2, 3 under 1
        code = int(label.split()[1])
        assert abs(hue(h) - parent[f"code {code // 2}"]) < 0.05, (label, h)
    cell = next(c for c in axes[2].collections if c.get_label().startswith("cell"))
    others = [c for c in axes[2].collections if c is not cell]
    assert cell.get_zorder() > max(c.get_zorder() for c in others) and cell.get_sizes()[0] > others[0].get_sizes()[0]
    assert [t.get_text() for t in axes[2].get_legend().get_texts()] == ["fingerprint (200)", "graph (200)", "cell (3)"]


def test_enrichment_colour_scale_follows_the_values():
    """A one-task set with +-0.3 values is drawn on a +-0.5 scale, not +-3 (almost white); a branch
    without positives (the 1e-3 floor) does not stretch the scale."""
    small = np.array([[0.3, -0.21, 0.05, np.log2(1e-3), np.nan]])
    assert report.enrichment_limit(small) == 0.5
    assert report.enrichment_limit(np.array([[1.23, -0.4]])) == 1.3
    assert report.enrichment_limit(np.array([[5.0, -7.0]])) == 3.0
