"""Paper scale end to end (issue 13 §4): time and peak memory of each stage at the paper's corpus size.

  python benchmarks/paper_scale.py --out runs/paper_scale                      # 129,592 molecules
  python benchmarks/paper_scale.py --out /tmp/ps --molecules 3000 --batch 64 --steps 2   # a quick check

Stages, each timed with the process's peak resident memory during it (sampled every 0.2 s from
/proc/self/statm, so a stage's peak is its own, not the process maximum so far):
  1. smiles    real SMILES (the reachable corpus: ChEMBL / Broad / L1000 compounds and the 9
               benchmarks; needs CHMR_DATA_DIR) topped up to --molecules by enumeration;
  2. layout    the paper's corpus layout (structure.csv.gz, CP-Bray / CP-JUMP / G-CRISPR / G-ORF / GE
               tables at the paper's widths 1783 / 966 / 1111 / 862 / 978 and coverage 35 / 50 / 6 / 5 / 8%)
               with values that depend on structure (synthetic.write_synthetic_paper_layout);
  3. prepare   reading the layout, featurizing every molecule, joining the profiles (= `chmr-jax
               prepare --corpus paper`);
  4. inputs    kNN graph, propagation (Eq. 1), context graph and batch budget (pretrain.build_inputs);
  5. steps     `--steps` pretraining steps of configs/paper.py's model at `--batch` on one device,
               after one compiling step (reported separately).
Prints a table and writes OUT/paper_scale.json; the layout and corpus stay under OUT for reruns
(stages 1-3 are skipped when OUT already holds them, unless --fresh).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")


class Stage:
    """Wall time and peak RSS (GiB) of a `with` block."""

    def __init__(self, name: str, rows: list):
        self.name, self.rows = name, rows

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * PAGE

    def _sample(self):
        while not self._done.wait(0.2):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        self.peak, self._done = self._rss(), threading.Event()
        self.rss_start = self.peak
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        print(f"== {self.name}", flush=True)
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.rows.append({"stage": self.name, "seconds": round(self.seconds, 1),
                          "rss_start_GiB": round(self.rss_start / 2 ** 30, 2),
                          "peak_rss_GiB": round(self.peak / 2 ** 30, 2), **getattr(self, "info", {})})
        print(f"   {self.rows[-1]}", flush=True)


class StageLog(list):
    """The stage rows, written to `path` after every stage (an out-of-memory kill leaves the stages that
    finished). Stages skipped because OUT already holds their output keep the rows of the run that
    made them (marked "reused")."""

    def __init__(self, path: Path, meta: dict):
        super().__init__()
        self.path, self.meta = path, meta
        self.earlier = json.loads(path.read_text()).get("stages", []) if path.exists() else []

    def append(self, row) -> None:
        super().append(row)
        self.write()

    def write(self, finished: bool = False) -> None:
        names = {r["stage"] for r in self}
        reused = [{**r, "reused": True} for r in self.earlier if r["stage"] not in names and r["stage"] in
                  ("smiles", "layout", "prepare")]
        self.path.write_text(json.dumps({**self.meta, "finished": finished, "stages": reused + list(self)},
                                        indent=1))


def enumerated_smiles(n: int, exclude: set) -> list[str]:
    """n more distinct valid SMILES (fragment products: head, ring, linker, ring, tail), canonical,
    not in `exclude`."""
    import itertools

    from chmr_jax.data import synthetic
    heads = ["", "C", "CC", "CCC", "CC(C)", "OCC", "NCC", "FC", "ClCC", "N#CC"]
    rings = ["c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCNCC1", "c1ccoc1", "c1ccsc1", "C1CCOC1", "c1cnccn1",
             "C1CC1", "c1cc[nH]c1", "C1CCN(C)CC1", "c1ccc2ccccc2c1"]
    links = ["", "C", "CC", "C(=O)N", "OC", "NC(=O)", "S(=O)(=O)N", "C=C"]
    tails = ["O", "N", "Cl", "F", "C(=O)O", "C#N", "S", "OC", "C(F)(F)F", "Br"]
    products = itertools.product(tails, rings, links, rings, heads)
    return synthetic.enumerate_smiles((f"{h}{r}{link}{r2}{t}" for t, r2, link, r, h in products), n, exclude)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--molecules", type=int, default=129_592)
    p.add_argument("--batch", type=int, default=3072)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--fresh", action="store_true", help="rebuild the layout and the corpus")
    p.add_argument("--remat", action="store_true",
                   help="config.model.remat: recompute each GIN layer in the backward pass (at batch 3072 the "
                        "stored activations do not fit beside the paper-scale inputs in 24 GiB)")
    args = p.parse_args()

    import jax

    from chmr_jax import config_util
    from chmr_jax.data import featurize, paths, prepare, synthetic
    from chmr_jax.mechanisms import objective
    from chmr_jax.training import pretrain, pretrain_data, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = StageLog(out / "paper_scale.json", {"molecules": args.molecules, "batch": args.batch,
                                                "steps": args.steps, "remat": args.remat})
    layout, corpus_dir = out / "layout", out / "corpus"
    config = config_util.load_config(str(config_util.CONFIG_DIR / "paper.py"))
    config.geometry = "none"                      # 3D conformers are their own cost (benchmarks/featurize.py)
    config.model.molecular = "fingerprint,graph"
    config.batch.batch_size = args.batch
    config.corpus.path = str(layout)
    config.workers = args.workers or 0
    config.model.remat = args.remat

    if args.fresh or not (layout / "L1k_idmaps.csv").exists():
        with Stage("smiles", rows) as st:
            reach = config_util.load_config(str(config_util.CONFIG_DIR / "default.py"))
            real = pretrain.load_corpus(reach, paths.resolve_data_dir(None), paths.resolve_cache_dir(None),
                                        args.workers, log=lambda *a: None)
            smiles = list(dict.fromkeys(real.smiles))[:args.molecules]
            extra = enumerated_smiles(args.molecules - len(smiles), set(smiles)) if len(smiles) < args.molecules else []
            smiles += extra
            st.info = {"molecules": len(smiles), "real": len(smiles) - len(extra), "enumerated": len(extra)}
        with Stage("layout", rows) as st:
            synthetic.write_synthetic_paper_layout(layout, smiles=smiles, seed=0)
            st.info = {"bytes_on_disk": sum(f.stat().st_size for f in layout.iterdir())}
    if args.fresh or not (corpus_dir / "manifest.json").exists():
        with Stage("prepare", rows) as st:
            settings = featurize.FeaturizerSettings.from_config(config.featurize)
            corpus = prepare.build_corpus(config.corpus, settings, None, paths.resolve_cache_dir(None),
                                          args.workers, verbose=False)
            corpus.save(corpus_dir)
            st.info = {"molecules": len(corpus), "observed": {n: int(m.available.sum())
                                                              for n, m in corpus.modalities.items()}}
    config.corpus.saved = str(corpus_dir)
    with Stage("inputs", rows) as st:
        corpus, data = pretrain.build_inputs(config, 1, log=lambda *a: None)
        st.info = {"molecules": len(corpus), "context_nodes": int(data.context.n_nodes),
                   "context_edges": int(len(data.context.indices)), "budget": data.budget.__dict__}
    del corpus
    with Stage("compile + first step", rows) as st:
        mesh = train.data_mesh(jax.devices()[:1])
        tx = train.make_optimizer(config.optim.lr, config.optim.weight_decay, 1000, config.optim.schedule)
        dims = pretrain.model_dims(config, data, pretrain.molecular_names(config))
        graphdef, state = train.init_state(pretrain.build_model(config, dims), tx)
        # Placed as pretrain.run places it: the step's outputs carry this sharding, so the first
        # step's compilation is the only one.
        state = train.place(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        ctx = objective.context_arrays(data.context)
        step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx, mesh)
        ctx_device = train.context_on_devices(ctx, mesh)
        plan = pretrain_data.BatchPlan(data, 0)
        rows_local = train.local_rows(data.budget, mesh)
        batches = (train.assemble_batch(pretrain_data.batch_of(data, g, rows_local), mesh)
                   for _, _, g in plan.iterate(0, args.steps + 1))
        state, metrics = step(state, next(batches), jax.random.key(0), ctx_device)
        jax.block_until_ready(metrics["loss"])
    with Stage(f"{args.steps} steps", rows) as st:
        n_mol = 0
        for i, batch in enumerate(batches):
            state, metrics = step(state, batch, jax.random.key(0), ctx_device)
            n_mol += int(np.asarray(batch["graph"].graph_mask).sum())
        jax.block_until_ready(metrics["loss"])
        st.info = {"loss": float(metrics["loss"]), "molecules": n_mol, "compilations": step._cache_size()}
    rows[-1]["step_s"] = round(rows[-1]["seconds"] / max(args.steps, 1), 2)
    rows[-1]["molecules_per_s"] = round(n_mol / rows[-1]["seconds"], 1)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "jax": jax.__version__, "device": jax.devices()[0].device_kind}
    rows.meta["machine"] = machine
    rows.write(finished=True)
    print("\n| stage | seconds | peak RSS GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r['peak_rss_GiB']} |")
    print(f"\nwritten to {out / 'paper_scale.json'}")


if __name__ == "__main__":
    main()
