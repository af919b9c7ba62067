"""The planted-signal check: does the CHMR mechanism turn cellular profiles into a better encoder
when the profiles *do* carry downstream signal?

A corpus in the paper's layout is generated over real (or enumerated) molecules:
  hidden factors   h = standardise(tanh(bits W)) [n, k], a fixed nonlinear function of each molecule's
                   Morgan bits (W random, seeded): the "biology" a molecule's structure determines
  profiles         cell (CP-Bray) and expression (GE) = h A_c + noise, observed for `observed` of the
                   molecules (the rest missing, as in real corpora)
  downstream task  `tasks` binary labels y_t = [h v_t + 0.1 * noise > 0] on `labelled` molecules of the
                   corpus, written as a CSV (smiles + task columns) and split at random
Three encoders are compared with the same head, splits and seeds (chmr-jax finetune with the
untrained control): pretrained with the cellular modalities, pretrained on structure only
(pretrain_data.modalities=none), and untrained. If the mechanism works, the first beats both.

`run(workdir, ...)` does it all through the CLI commands and returns the three mean test ROC-AUCs;
benchmarks/planted_signal.py runs the full version, tests/test_planted.py a small one.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from chmr_jax.data import featurize, synthetic

CELL_DIM, EXPRESSION_DIM = 32, 24


def hidden_factors(smiles, k: int = 8, seed: int = 0) -> np.ndarray:
    """[n, k] standardised tanh of a random projection of Morgan r2 1024-bit fingerprints."""
    feats = featurize.featurize_smiles(list(smiles), featurize.FeaturizerSettings(), None, "planted", n_workers=1,
                                       show_progress=False, verbose=False)
    if len(feats) != len(smiles):
        raise ValueError("hidden_factors needs parseable SMILES (filter with featurize.parse_smiles first)")
    bits = feats.fingerprints()[:, :1024].astype(np.float64)
    w = np.random.default_rng([seed, 1]).normal(size=(1024, k))
    z = bits @ w / np.sqrt(np.maximum(bits.sum(1, keepdims=True), 1.0))
    h = np.tanh(z)
    return ((h - h.mean(0)) / np.maximum(h.std(0), 1e-8)).astype(np.float32)


def write(root, smiles, k: int = 8, observed: float = 0.3, noise: float = 0.5, labelled: int = 400,
          tasks: int = 4, seed: int = 0) -> dict:
    """Writes root/layout (the corpus) and root/task.csv; returns their paths and counts."""
    root = Path(root)
    smiles = [s for s in smiles if featurize.parse_smiles(s) is not None]
    h = hidden_factors(smiles, k, seed)
    synthetic.write_synthetic_paper_layout(root / "layout", seed=seed, smiles=smiles, factors=h, noise=noise,
                                           dims={"CP-Bray": CELL_DIM, "GE": EXPRESSION_DIM},
                                           observed={"CP-Bray": observed, "GE": observed}, replicate_fraction=0.0)
    rng = np.random.default_rng([seed, 2])
    rows = rng.choice(len(smiles), size=min(labelled, len(smiles)), replace=False)
    v = rng.normal(size=(k, tasks))
    y = (h[rows] @ v + 0.1 * rng.normal(size=(len(rows), tasks)) > 0).astype(int)
    with open(root / "task.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["smiles"] + [f"t{t}" for t in range(tasks)])
        for r, labels in zip(rows, y):
            w.writerow([smiles[r], *labels.tolist()])
    return {"layout": root / "layout", "task": root / "task.csv", "molecules": len(smiles), "labelled": len(rows)}


def pretrain_config(config: str, layout: Path, steps: int, cache_dir: str, overrides: dict | None = None):
    """The pretraining config for the planted corpus: `config` (e.g. configs/test.py) read as the paper
    layout at `layout` with its two modalities, `steps` steps, then dotted `overrides`."""
    import ml_collections

    from chmr_jax import config_util

    cfg = config_util.load_config(config)
    cfg.cache_dir = cache_dir
    cfg.corpus.kind = "paper"
    cfg.corpus.path = str(layout)
    cfg.corpus.include_benchmarks = False
    cfg.corpus.modalities = ml_collections.ConfigDict(dict(cell="CP-Bray", expression="GE"))
    cfg.corpus.dims = ml_collections.ConfigDict(dict(cell=CELL_DIM, expression=EXPRESSION_DIM))
    cfg.train.steps = steps
    # Only the final checkpoint: these runs are short, and the test config's checkpoint every 4 steps
    # spent ~1 s per save waiting on the previous one (a quarter of a 300-step run's time).
    cfg.train.checkpoint_every_steps = steps
    cfg.train.progress = "log"
    cfg.update_from_flattened_dict(overrides or {})   # dotted keys: 'section.leaf'
    return cfg


def run(workdir, smiles, config: str, steps: int, seeds=(0, 1, 2), cache_dir: str = "", pretrain_overrides=None,
        finetune_overrides=None, log=print, **write_kw) -> dict:
    """Writes the planted corpus and task, pretrains with and without the cellular modalities, fine-tunes
    both with the untrained control. Returns {'cellular', 'structure', 'untrained': mean test ROC-AUC,
    'lift_cellular', 'lift_structure': paired lifts over the untrained encoder, 'results': per run}."""
    from chmr_jax import config_util
    from chmr_jax.downstream import finetune
    from chmr_jax.training import pretrain

    from chmr_jax.data import paths
    workdir = paths.local_only(workdir, "--workdir")
    made = write(workdir, smiles, **write_kw)
    log(f"planted corpus: {made['molecules']} molecules, task on {made['labelled']}")
    cache_dir = cache_dir or str(workdir / "cache")
    results = {}
    for name, extra in (("cellular", {}), ("structure", {"pretrain_data.modalities": "none"})):
        run_dir = workdir / f"pretrain_{name}"
        cfg = pretrain_config(config, made["layout"], steps, cache_dir, {**extra, **(pretrain_overrides or {})})
        pretrain.run(cfg, run_dir, log=log)
        ft = config_util.load_config(str(Path(config).parent / "finetune.py"))
        ft.cache_dir = cache_dir
        ft.csv = str(made["task"])
        ft.split = "random"
        ft.seeds = ",".join(str(s) for s in seeds)
        ft.update_from_flattened_dict(finetune_overrides or {})
        results[name] = finetune.run(ft, run_dir, workdir / f"finetune_{name}", log=log)
    summary = {"cellular": results["cellular"]["methods"]["chmr"]["test_mean"],
               "structure": results["structure"]["methods"]["chmr"]["test_mean"],
               # the two untrained controls are the same molecular encoder (same config and seed)
               "untrained": results["cellular"]["methods"]["untrained"]["test_mean"],
               "lift_cellular": results["cellular"]["lift"], "lift_structure": results["structure"]["lift"],
               "molecules": made["molecules"], "labelled": made["labelled"], "steps": steps, "seeds": list(seeds)}
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return {**summary, "results": results}
