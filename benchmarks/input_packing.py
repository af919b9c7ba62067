"""Host-side input packing per step against the compiler's step estimate (issue 31, "the input pipeline
keeps up with the estimated step").

One host of a pod packs, every step, only the rows of the global batch its own chips hold
(pretrain_data.batch_of with train.local_rows): the padded graph blocks of its molecules and, per
molecule, the fingerprint, the cellular inputs, both VICReg views and the masks. This script measures
that on this CPU for configs/paper.py:tpu_pod at the paper's global batch 3072 over a v5e-16 (16 chips,
4 hosts of 4 chips: one host packs 4 of the 16 device blocks, ~768 molecules), per step and per
molecule, split into the graph part (graphs.pack) and the rest, and compares it with the compiled
step's estimate (`step_s_xla` of benchmarks/tpu_compile.json's v5e-16 row, or --step_ms).

  python benchmarks/input_packing.py                       # 8,000 molecules, 30 steps; ~5 min on 2 cores
  python benchmarks/input_packing.py --molecules 2000 --steps 5 --out /tmp/p.json   # a quick check

Corpus: the first --molecules SMILES of the cached reachable corpus (drug-like sizes; needs
CHMR_DATA_DIR and `chmr-jax prepare --corpus reachable`), else enumerated ones (smaller: says so),
written in the paper's layout at its widths and coverage (synthetic.write_synthetic_paper_layout), then
prepared and given the paper's inputs (kNN, propagation, context graph) as `pretrain` does. The packing
cost per molecule does not depend on the corpus size (it reads the molecule's rows), so a small corpus
measures it. Prints a table and writes --out (benchmarks/input_packing.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def host_rows(budget, hosts: int, host: int = 0):
    """graphs.Rows of `host`'s share of a batch whose device blocks are split evenly over `hosts`
    (what train.local_rows gives a process holding blocks/hosts consecutive devices)."""
    from chmr_jax.data import graphs

    def share(n):
        per = n // hosts
        return host * per, (host + 1) * per
    return graphs.Rows(share(budget.n_node), share(budget.n_edge), share(budget.n_graph))


def xla_step_ms(path: Path, topology: str) -> float | None:
    """step_s_xla (ms) of `topology`'s bf16_remat row at batch 3072 in tpu_compile.json, if there."""
    if not path.exists():
        return None
    rows = json.loads(path.read_text()).get("steps", [])
    for r in rows:
        if r.get("name") == topology and r.get("variant") == "bf16_remat" and r.get("step_s_xla"):
            return 1e3 * float(r["step_s_xla"])
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--molecules", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=30, help="packed steps timed (after one warm-up)")
    parser.add_argument("--chips", type=int, default=16, help="devices the global batch is split over")
    parser.add_argument("--hosts", type=int, default=4, help="hosts those devices sit on (v5e-16: 4)")
    parser.add_argument("--topology", default="v5e-16", help="tpu_compile.json row to compare with")
    parser.add_argument("--step_ms", type=float, default=None, help="compare with this step time instead")
    parser.add_argument("--workdir", default=None, help="keep the layout and corpus here (default: a temp dir)")
    parser.add_argument("--out", default=str(HERE / "input_packing.json"))
    args = parser.parse_args(argv)

    import jax
    from chmr_jax import config_util
    from chmr_jax.data import featurize, graphs, paths, prepare, synthetic
    from chmr_jax.training import pretrain, pretrain_data

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    work = Path(args.workdir or tmp.name)
    layout, corpus_dir = work / "layout", work / "corpus"
    config = config_util.load_config(str(config_util.CONFIG_DIR / "paper.py") + ":tpu_pod")
    config.geometry = "none"                    # 3D descriptors: one float32 [n, d] row per molecule more
    config.model.molecular = "fingerprint,graph"
    config.corpus.path = str(layout)

    t0 = time.perf_counter()
    if not (corpus_dir / "manifest.json").exists():
        source = "enumerated (small two-ring molecules: fewer atoms than drug-like ones)"
        smiles = []
        try:
            from chmr_jax.data import corpus as corpus_lib
            from chmr_jax.training.aot import sample
            reach = config_util.load_config(str(config_util.CONFIG_DIR / "default.py"))
            cache = paths.resolve_cache_dir(None)
            for saved in (sample.prepared_corpus_dir(cache, "reachable"), pretrain.corpus_cache_path(reach, cache)):
                if (saved / "manifest.json").exists():   # `chmr-jax prepare --corpus reachable`, or pretrain's cache
                    smiles = list(dict.fromkeys(corpus_lib.Corpus.load(saved).smiles))[:args.molecules]
                    source = f"the reachable corpus in {saved} (real SMILES)"
                    break
        except Exception as e:   # no data directory / cache: enumerated molecules, said in the output
            print(f"reachable corpus not used ({type(e).__name__}: {e}); enumerating molecules")
        if len(smiles) < args.molecules:
            have = set(smiles)
            smiles += [s for s in synthetic.synthetic_smiles(min(5000, args.molecules)) if s not in have][
                :args.molecules - len(smiles)]
        synthetic.write_synthetic_paper_layout(layout, smiles=smiles, seed=0)
        settings = featurize.FeaturizerSettings.from_config(config.featurize)
        prepare.build_corpus(config.corpus, settings, None, paths.resolve_cache_dir(None), None,
                             verbose=False).save(corpus_dir)
        (work / "source.txt").write_text(source)
    source = (work / "source.txt").read_text() if (work / "source.txt").exists() else "?"
    config.corpus.saved = str(corpus_dir)
    corpus, data = pretrain.build_inputs(config, args.chips, log=lambda *a: None)
    build_s = time.perf_counter() - t0
    budget = data.budget
    rows = host_rows(budget, args.hosts)
    plan = pretrain_data.BatchPlan(data, 0)
    groups = [g for _, _, g in plan.iterate(0, args.steps + 1)]

    def timed(fn):
        """Wall and this thread's CPU seconds per call: on a machine shared with other jobs the CPU
        time is the packing's own cost (it is single-threaded numpy), the wall time is not."""
        fn(groups[0])                            # warm-up (allocator, first-touch of the arrays)
        wall, cpu = [], []
        for g in groups[1:]:
            t, c = time.perf_counter(), time.thread_time()
            fn(g)
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
        return wall, cpu

    whole_wall, whole = timed(lambda g: pretrain_data.batch_of(data, g, rows))
    graph_only = timed(lambda g: graphs.pack(data.corpus.features, g, budget, rows))[1]
    mols = [int(np.sum(pretrain_data.batch_of(data, g, rows)["graph"].graph_mask)) for g in groups[1:]]
    per_step = statistics.median(whole) * 1e3
    per_mol_us = 1e6 * sum(whole) / max(sum(mols), 1)
    step_ms = args.step_ms or xla_step_ms(HERE / "tpu_compile.json", args.topology)
    result = {
        "command": "python benchmarks/input_packing.py " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "load_average": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"), "corpus": {"molecules": len(corpus), "source": source},
        "config": "configs/paper.py:tpu_pod (geometry off)", "global_batch": int(config.batch.batch_size),
        "chips": args.chips, "hosts": args.hosts, "budget": budget.__dict__,
        "host_rows": {"nodes": rows.node[1] - rows.node[0], "edges": rows.edge[1] - rows.edge[0],
                      "graph_slots": rows.graph[1] - rows.graph[0]},
        "molecules_per_host_step": statistics.fmean(mols),
        "pack_cpu_ms_per_host_step": {"median": per_step, "min": min(whole) * 1e3, "max": max(whole) * 1e3},
        "pack_wall_ms_per_host_step": {"median": statistics.median(whole_wall) * 1e3},
        "graph_pack_cpu_ms_per_host_step": statistics.median(graph_only) * 1e3,
        "pack_us_per_molecule": per_mol_us,
        "compared_step_ms": step_ms, "compared_with": f"step_s_xla of {args.topology} in tpu_compile.json"
        if args.step_ms is None else "--step_ms",
        "packing_threads_needed": None if not step_ms else max(1, int(np.ceil(per_step / step_ms))),
        "build_s": build_s,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"corpus: {len(corpus)} molecules from {source}; budget {budget}")
    print("| per host step (one of {} hosts, {:.0f} molecules) | |".format(args.hosts, result["molecules_per_host_step"]))
    print("|---|---:|")
    print(f"| batch_of (everything the step reads), CPU ms | {per_step:.1f} |")
    print(f"| of which graphs.pack, CPU ms | {result['graph_pack_cpu_ms_per_host_step']:.1f} |")
    print(f"| batch_of, wall ms (load average {os.getloadavg()[0]:.1f}) | {result['pack_wall_ms_per_host_step']['median']:.1f} |")
    print(f"| per molecule, CPU us | {per_mol_us:.1f} |")
    if step_ms:
        print(f"| compiled step estimate ({result['compared_with']}) | {step_ms:.2f} |")
        print(f"| packing workers needed to keep up | {result['packing_threads_needed']} |")
    print(f"written to {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
