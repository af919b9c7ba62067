"""The sample of molecules the compiled step's shapes come from, and the step's abstract arguments.

Shapes: the batch's come from the config's padding budget for the global batch on that many chips, from
the molecule sizes of a sample: the config's own corpus where it is here (config.corpus.saved, the cache
`pretrain` keeps for this config, or what `chmr-jax prepare --corpus <kind>` wrote), else a STAND-IN:
the molecules of the reachable corpus `prepare --corpus reachable` wrote, else enumerated molecules
(smaller than drug-like ones, so their budget is smaller). `Sample.shapes_from` says which; `chmr-jax
compile` prints it first. Cellular inputs have the config's widths (config.corpus.dims). The context
graph's arrays (replicated on every chip, they grow with the corpus) are the sample's, scaled uniformly
(nodes, edges, target rows) to `molecules` (default: the config's corpus size, or the paper's 129,592
for a stand-in)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

PAPER_MOLECULES = 129_592


# Paper coverage of the cellular modalities (benchmarks/pretrain_step.py: cell 35%, gene 6%, expression 8%).
COVERAGE = {"cell": 0.35, "gene": 0.06, "expression": 0.08}


@dataclasses.dataclass
class Sample:
    data: object               # PretrainData of the sample molecules
    molecules: int             # corpus size the context arrays are scaled to
    shapes_from: str


def _stand_in_modalities(corpus, dims: dict, seed: int = 0):
    """The corpus' molecules with random cellular profiles of the config's widths at the paper's coverage
    (shapes and coverage matter to the compiler, values do not)."""
    from chmr_jax.data import corpus as corpus_lib
    rng = np.random.default_rng(seed)
    n = len(corpus)
    corpus.modalities = {}
    for name, dim in dims.items():
        avail = rng.random(n) < COVERAGE.get(name, 0.3)
        avail[:2] = True                     # at least two observed rows: the context graph needs them
        values = np.where(avail[:, None], rng.normal(size=(n, dim)), 0).astype(np.float32)
        corpus.modalities[name] = corpus_lib.Modality(values=values, available=avail, feature_names=[""] * dim,
                                                      sources=["stand-in"])
    return corpus


def prepared_corpus_dir(cache_dir, kind: str, exclude_test_of: str = "") -> Path:
    """Where `chmr-jax prepare --corpus KIND [--exclude_test B]` saves a corpus when no --out is given
    (cli._prepare_corpus: <cache_dir>/corpus-<kind>[-no-<benchmarks>-test])."""
    exclude = str(exclude_test_of or "")
    return Path(cache_dir) / (f"corpus-{kind}" + (f"-no-{exclude.replace(',', '+')}-test" if exclude else ""))


def _usable(path: Path, config) -> str | None:
    """Why the corpus saved at `path` cannot stand for the config's (None: it can): no manifest, or
    another featurizer (its molecule sizes would differ)."""
    from chmr_jax.data import featurize
    manifest = path / "manifest.json"
    if not manifest.exists():
        return "not there"
    want = dataclasses.asdict(featurize.FeaturizerSettings.from_config(config.featurize))
    have = json.loads(manifest.read_text()).get("featurizer", {})
    if have and {k: have.get(k) for k in want} != want:
        return f"built with another featurizer ({have})"
    return None


def find_corpus(config, cache_dir):
    """(corpus directory or None, how it was found, is it the config's own corpus) in the order compile
    takes them: config.corpus.saved; the cache `pretrain` keeps for exactly this config; the folder
    `prepare --corpus <the config's kind>` writes (same leakage guard, same featurizer). Else, for a
    stand-in's molecule sizes only: the folder of `prepare --corpus reachable` with the config's leakage
    guard, then without one. Never the newest of whatever is cached (issue 36)."""
    from chmr_jax.training import pretrain
    cfg = config.corpus
    if cfg.saved:   # (a gs:// folder: load_corpus reads it through its local mirror)
        return cfg.saved, "config.corpus.saved", True
    cached = pretrain.corpus_cache_path(config, cache_dir)
    if (cached / "manifest.json").exists():
        return cached, "the corpus cache of this config", True
    own = prepared_corpus_dir(cache_dir, cfg.kind, cfg.exclude_test_of)
    if cfg.kind != "synthetic" and _usable(own, config) is None:
        return own, f"written by `chmr-jax prepare --corpus {cfg.kind}`", True
    for exclude in dict.fromkeys([cfg.exclude_test_of or "", ""]):
        other = prepared_corpus_dir(cache_dir, "reachable", exclude)
        if cfg.kind != "reachable" and _usable(other, config) is None:
            return other, "written by `chmr-jax prepare --corpus reachable`", False
    return None, "", False


def load_sample(config, n_chips: int, sample: int = 1024, molecules: int | None = None, data_dir=None,
                log=print) -> Sample:
    """PretrainData of up to `sample` molecules on which the step's shapes are based (see the module
    docstring for where they come from); Sample.shapes_from says which, STAND-IN first where they are."""
    import ml_collections

    from chmr_jax.data import corpus as corpus_lib, paths, registry
    from chmr_jax.training import pretrain, pretrain_data

    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    quiet = lambda *a, **k: None
    full, source, stand_in = None, "", False
    where, how, own = find_corpus(config, cache_dir)
    try:
        if own:
            full = corpus_lib.Corpus.load(where) if not config.corpus.saved else \
                pretrain.load_corpus(config, data_dir, cache_dir, config.workers or None, quiet)
            source = f"the config's corpus (kind={config.corpus.kind}): {where} ({how}, {len(full):,} molecules)"
        elif config.corpus.kind == "synthetic":
            full = pretrain.load_corpus(config, data_dir, cache_dir, config.workers or None, quiet)
            source = f"the config's corpus (kind=synthetic, generated: {len(full):,} molecules)"
    except (FileNotFoundError, corpus_lib.CorpusError, registry.DataNotFoundError, pretrain.ConfigError) as e:
        log(f"compile: the config's corpus is not usable here ({str(e).splitlines()[0][:160]}); using a stand-in")
        full, where, own = None, None, False
    if full is not None:        # a config that does not fit its own corpus is the user's error, not a stand-in case
        pretrain.validate(config, full, "the config's corpus")
    else:
        stand_in = True
        dims = {k: int(v) for k, v in config.corpus.dims.items()}
        if not dims:
            raise pretrain.ConfigError("the config's corpus is not available here and config.corpus.dims is empty: "
                                       "set --config.corpus.dims.<modality>=WIDTH for a stand-in of those widths")
        missing = f"the config's corpus (kind={config.corpus.kind}) is not here"
        if where is not None:   # real, drug-like molecules (their sizes set the padding budget)
            full = corpus_lib.Corpus.load(where)
            source = (f"STAND-IN: {missing}; molecules of {where} ({how}, {len(full):,}), random profiles at the "
                      "config's widths")
        else:
            synth = ml_collections.ConfigDict(config.to_dict())
            synth.corpus.kind = "synthetic"
            synth.corpus.synthetic_molecules = sample
            synth.corpus.synthetic_dims = {"CP-Bray": 4, "CP-JUMP": 4, "G-CRISPR": 2, "G-ORF": 2, "GE": 4}
            synth.corpus.dims = {}
            synth.corpus.path = ""
            full = pretrain.load_corpus(synth, data_dir, cache_dir, config.workers or None, quiet)
            source = (f"STAND-IN: {missing} and no prepared reachable corpus in {cache_dir}; {len(full):,} "
                      "enumerated molecules (smaller than drug-like ones: the padding budget and the step come out "
                      "small; run `chmr-jax prepare --corpus reachable` for real sizes), random profiles")
    n_full = len(full)
    if n_full > sample:
        idx = np.sort(np.random.default_rng(0).choice(n_full, size=sample, replace=False))
        full = full.subset(idx)
    if stand_in:
        full = _stand_in_modalities(full, dims)
    else:
        full = full.with_modalities(config.pretrain_data.modalities)
    data = pretrain_data.prepare(full, pretrain.data_config(config, n_chips))
    if "geometry" in pretrain.molecular_names(config):
        # Zeros of the descriptors' width: computing conformers would take minutes and change no shape.
        data.inputs["geometry"] = np.zeros((len(full), geometry_width(config.geometry)), np.float32)
    target = molecules or (PAPER_MOLECULES if stand_in else n_full)
    return Sample(data=data, molecules=int(target), shapes_from=source)


def geometry_width(geometry: str) -> int:
    """Width of the 3D descriptors config.geometry gives: RDKit's descriptor set, or a matrix file's columns."""
    from chmr_jax.data import geometry as geometry_lib
    from chmr_jax.training import pretrain
    if geometry == "rdkit3d":
        return geometry_lib.GEOMETRY_DIM
    from chmr_jax.data import paths
    path = str(paths.local_file(geometry, "config.geometry")) if paths.is_remote(geometry) else os.path.expanduser(geometry)
    if path.endswith(".npz") and os.path.exists(path):
        with np.load(path) as z:
            return int(next(v.shape[1] for v in z.values() if v.ndim == 2))
    if path.endswith(".csv") and os.path.exists(path):
        with open(path) as fh:
            return len(fh.readline().split(",")) - 1
    raise pretrain.ConfigError(f"config.geometry={geometry!r}: compile needs its width; give 'rdkit3d' or an existing "
                               ".npz / .csv matrix")


# ---- abstract arguments ----------------------------------------------------------------------------

NODE_FIELDS = ("nodes", "node_graph", "node_mask")
EDGE_FIELDS = ("edges", "senders", "receivers", "edge_mask")


def budget_for(data, config, batch_size: int, n_chips: int):
    """The padding budget of a global batch of `batch_size` on `n_chips` (pretrain_data.prepare's rule,
    from the sample's molecule sizes; the sample may be smaller than the batch)."""
    from chmr_jax.data import graphs
    from chmr_jax.training import pretrain
    cfg = pretrain.data_config(config, n_chips)
    feats = data.corpus.features
    reps = max(1, math.ceil(batch_size / len(feats.n_atoms)))   # same mean / std, at least B draws
    return graphs.estimate_budget(np.tile(feats.n_atoms, reps), np.tile(feats.n_edges, reps), batch_size,
                                  cfg.pad_multiple, cfg.n_sigma, cfg.graph_multiple,
                                  blocks=cfg.graph_multiple if cfg.device_blocks else 1)


def batch_shapes(data, budget) -> dict:
    """{leaf: (shape, dtype)} of a global batch with `budget`: the leaves of a two-molecule batch, their
    leading axes set to the budget's nodes, edges or graph slots."""
    import dataclasses as dc
    from chmr_jax.data import graphs
    from chmr_jax.training import pretrain_data
    small = graphs.estimate_budget(data.corpus.features.n_atoms[:2], data.corpus.features.n_edges[:2], 2, 8)
    template = pretrain_data.batch_of(dc.replace(data, budget=small), [0, 1])

    def lead(field):
        return budget.n_node if field in NODE_FIELDS else budget.n_edge if field in EDGE_FIELDS else budget.n_graph

    out = {}
    for key, value in template.items():
        if key == "graph":
            out[key] = value._replace(**{f: ((lead(f),) + getattr(value, f).shape[1:], getattr(value, f).dtype)
                                         for f in value._fields if f != "blocks"},
                                      blocks=((budget.shards, budget.blocks), np.int32))
        elif isinstance(value, dict):
            out[key] = {k: ((budget.n_graph,) + v.shape[1:], v.dtype) for k, v in value.items()}
        else:
            out[key] = ((budget.n_graph,) + value.shape[1:], value.dtype)
    return out


def context_shapes(ctx: dict, factor: float, row_multiple: int = 1) -> dict:
    """The context arrays' (shape, dtype), every leading axis scaled by `factor` (indptr: nodes + 1), the
    walk-target tables' rows then padded to a multiple of `row_multiple` (the device count: as
    train.context_on_devices pads them to split them by rows)."""
    import jax
    from chmr_jax.training import train

    def scale(path, x):
        name = jax.tree_util.keystr(path)
        n = x.shape[0]
        if "indptr" in name:
            m = int(round((n - 1) * factor)) + 1
        else:
            m = max(1, int(round(n * factor)))
        if path[0].key in train.CONTEXT_TABLES:
            m = -(-m // row_multiple) * row_multiple
        return ((m,) + tuple(x.shape[1:]), x.dtype)
    arrays = {k: v for k, v in ctx.items() if k != "type_index"}
    return jax.tree_util.tree_map_with_path(scale, arrays)


def abstract(tree_of_shapes, sharding):
    import jax
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s[0], s[1], sharding=sharding),
                                  tree_of_shapes, is_leaf=is_leaf)


