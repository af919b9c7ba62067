"""The pretraining step compiled for a TPU topology on a machine without a TPU (deviceless ahead-of-time
compilation): per-chip memory, XLA's cost figures, a roofline estimate of the step time, the largest
global batch that fits. Nothing runs on a TPU: every time, rate and MFU here is an ESTIMATE.

  spec = aot.parse_topology("v5e-16")          # also v5litepod-16, v4-32, v5p-128, v6e-64, v5e:4x4, ...
  row = aot.compile_step(config, spec)          # one dict: ROW_FIELDS and more
  fit = aot.largest_batch(config, spec)         # the largest global batch whose step fits in HBM

How: libtpu describes the topology's chips (`jax.experimental.topologies.get_topology_desc`) without
attaching to any (TPU_SKIP_MDS_QUERY=1, JAX on CPU); the step is `train.make_train_step` over
`train.data_mesh` of those devices, as `pretrain.run` builds it (the config's dtype, remat and InfoNCE
implementation, the padding budget for that chip count), lowered for abstract arguments (shapes and
shardings, no values) and compiled by the TPU compiler.

Shapes: the batch's come from the config's padding budget for the global batch on that many chips,
from the molecule sizes of a sample: the config's own corpus where it can be loaded here, else the
reachable corpus' molecules where it is cached, else enumerated molecules (`shapes_from` says which;
enumerated molecules are smaller than drug-like ones, so their budget is smaller). Cellular inputs have
the config's widths (config.corpus.dims). The context graph's arrays (replicated on every chip, and
they grow with the corpus) are the sample's, scaled uniformly (nodes, edges, target rows) to
`molecules` (default: the config's corpus size, or the paper's 129,592 for a stand-in).

Estimates: XLA's cost analysis of the compiled per-chip program counts each loop body once (a 6-trip
fori_loop of matmuls reports the FLOPs of one; tests/test_aot.py), and this step has several loops
(the GIN remat scan, Tree-VQ's levels, the random walks, the ring). `hlo_cost` therefore walks the
compiled HLO itself: every top-level instruction (a fusion as one) once per execution, times the trip
counts of the loops around it; bytes are the operands read plus the output written, at the arrays'
TPU tile-padded sizes, a slice / gather reading only what it outputs, in-place updates their update;
FLOPs are the dots' and convolutions' (the matrix units' work). `bytes` counts all memories (XLA's
convention), `hbm_bytes` leaves out arrays placed in on-chip memory (S(1) layouts). The roofline step
time is max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) from the chip's published figures (CHIPS),
with all bytes (conservative; the HBM-only time is reported beside it as a lower bound); XLA's own
`optimal_seconds` is used instead where it is valid (positive). MFU = the model's FLOPs per chip
(pretrain.step_flops: dense InfoNCE, no remat) over (estimated step time x peak bf16 FLOP/s).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time

import numpy as np

# Published per-chip figures (Cloud TPU "System architecture" pages, per chip): peak bf16 matrix
# FLOP/s, HBM capacity and HBM bandwidth. v4 and v5p chips have two TensorCores (Cloud's names count
# cores: v4-32 is 16 chips); v5e and v6e chips have one.
@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str
    peak_flops: float        # bf16 FLOP/s per chip
    hbm_bytes: int
    hbm_bytes_per_s: float
    cores_per_chip: int
    source: str


GiB = 2 ** 30
CHIPS = {
    "v4": Chip("v4", 275e12, 32 * GiB, 1200e9, 2, "cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s"),
    "v5e": Chip("v5e", 197e12, 16 * GiB, 819e9, 1, "cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s"),
    "v5p": Chip("v5p", 459e12, 95 * GiB, 2765e9, 2, "cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s"),
    "v6e": Chip("v6e", 918e12, 32 * GiB, 1640e9, 1, "cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "trillium": "v6e"}
# Slice shapes Cloud TPU offers, by chip count: 2-D tori for v5e / v6e, 3-D for v4 / v5p.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
PAPER_MOLECULES = 129_592


class CompileError(ValueError):
    """The step does not compile for that topology, or uses an op the TPU cannot run (one line)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                  # as given
    chip: Chip
    topology_name: str         # libtpu's, e.g. 'v5e:4x4'
    chips: int
    chips_per_host_bounds: tuple
    num_slices: int = 1

    @property
    def hosts(self) -> int:
        return self.num_slices * self.chips // math.prod(self.chips_per_host_bounds)


def parse_topology(name: str) -> Topology:
    """'v5e-16', 'v5litepod-16', 'v4-32' (cores: 16 chips), 'v5p-128' (64 chips), 'v6e-64', or libtpu's
    own 'v5e:4x4' / 'v4:2x2x4'. Hosts hold 4 chips (2x2x1), as Cloud TPU's pod hosts do; a v5e / v6e
    slice of at most 8 chips is one host."""
    text = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]*|v5litepod|v6litepod|trillium)(?::(\d+(?:x\d+){1,2})|-(\d+))", text)
    gen = ALIASES.get(m.group(1), m.group(1)) if m else None
    if not m or gen not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: use a Cloud TPU name like v5e-16, v5litepod-16, v4-32, "
                         f"v5p-128, v6e-64 (the number counts cores for v4 / v5p, chips for v5e / v6e) or "
                         f"libtpu's form like v5e:4x4, v4:2x2x4; generations {sorted(CHIPS)}")
    chip = CHIPS[gen]
    three_d = gen in ("v4", "v5p")
    if m.group(2):
        dims = tuple(int(x) for x in m.group(2).split("x"))
        if len(dims) != (3 if three_d else 2):
            raise ValueError(f"{name!r}: {gen} topologies are {'3' if three_d else '2'}-D (e.g. "
                             f"{'v4:2x2x4' if three_d else 'v5e:4x4'})")
        chips = math.prod(dims)
    else:
        count = int(m.group(3))
        if count % chip.cores_per_chip:
            raise ValueError(f"{name!r}: {gen}-N counts TensorCores, {chip.cores_per_chip} per chip; N must be even")
        chips = count // chip.cores_per_chip
        shapes = SHAPES_3D if three_d else SHAPES_2D
        if chips not in shapes:
            raise ValueError(f"{name!r}: no {gen} slice of {chips} chips; Cloud TPU offers "
                             f"{', '.join(f'{gen}-{c * chip.cores_per_chip}' for c in shapes)}")
        dims = shapes[chips]
    topology_name = f"{gen}:{'x'.join(map(str, dims))}"
    if three_d:
        per_host = (min(2, dims[0]), min(2, dims[1]), 1)
    elif chips <= 8:
        per_host = (dims[0], dims[1], 1)
    else:
        per_host = (2, 2, 1)
    return Topology(name, chip, topology_name, chips, per_host)


def tpu_devices(spec: Topology) -> list:
    """The topology's devices as libtpu describes them, with no TPU attached. JAX must run on CPU here
    (jax_platforms=cpu before any backend is initialised): libtpu would otherwise try to claim a TPU."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")    # no GCE metadata server to ask
    # libtpu takes a machine-wide lockfile per process; no TPU is claimed here, so compiles may run side
    # by side (a test beside a benchmark, several topologies at once).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    from jax.experimental import topologies
    try:
        # v4's default chip config describes each TensorCore as a device; Cloud TPU v4 VMs run the two
        # cores of a chip as one device (megacore), as v5p's default does.
        topo = topologies.get_topology_desc(platform="tpu", topology_name=spec.topology_name,
                                            chip_config_name="megacore" if spec.chip.generation == "v4" else "default",
                                            chips_per_host_bounds=spec.chips_per_host_bounds,
                                            num_slices=spec.num_slices)
    except Exception as e:   # no libtpu, or a topology libtpu does not know
        hint = ("install libtpu (pip install 'jax[tpu]' brings the one matching your jax)"
                if "tpu" in str(e).lower() and ("plugin" in str(e).lower() or "not found" in str(e).lower()
                                               or "unknown backend" in str(e).lower()) else "")
        raise CompileError(f"cannot describe TPU topology {spec.topology_name} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}){'; ' + hint if hint else ''}") from None
    devices = list(topo.devices)
    if len(devices) != spec.chips:
        raise CompileError(f"libtpu describes {len(devices)} devices for {spec.topology_name}, expected {spec.chips}")
    del jax
    return devices


# ---- the sample the shapes come from ---------------------------------------------------------------

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


def load_sample(config, n_chips: int, sample: int = 1024, molecules: int | None = None, data_dir=None,
                log=print) -> Sample:
    """PretrainData of up to `sample` molecules on which the step's shapes are based (see the module
    docstring for where they come from)."""
    import ml_collections

    from chmr_jax.data import corpus as corpus_lib, paths, registry
    from chmr_jax.training import pretrain, pretrain_data

    data_dir = paths.resolve_data_dir(data_dir or config.data_dir or None)
    cache_dir = paths.resolve_cache_dir(config.cache_dir or None)
    quiet = lambda *a, **k: None
    full, source = None, ""
    try:
        if config.corpus.saved or config.corpus.kind == "synthetic" or \
                (pretrain.corpus_cache_path(config, cache_dir) / "manifest.json").exists():
            full = pretrain.load_corpus(config, data_dir, cache_dir, config.workers or None, quiet)
            source = f"the config's corpus (kind={config.corpus.kind}, {len(full)} molecules)"
    except (FileNotFoundError, corpus_lib.CorpusError, registry.DataNotFoundError, pretrain.ConfigError) as e:
        log(f"compile: the config's corpus is not usable here ({str(e).splitlines()[0][:160]}); using a stand-in")
        full = None
    if full is not None:        # a config that does not fit its own corpus is the user's error, not a stand-in case
        pretrain.validate(config, full, "the config's corpus")
    stand_in = full is None
    if stand_in:
        dims = {k: int(v) for k, v in config.corpus.dims.items()}
        if not dims:
            raise pretrain.ConfigError("the config's corpus is not available here and config.corpus.dims is empty: "
                                       "set --config.corpus.dims.<modality>=WIDTH for a stand-in of those widths")
        # Real, drug-like molecules where any reachable corpus is cached (their sizes set the padding
        # budget; its profiles are replaced), else enumerated ones.
        cached = sorted((p.parent for p in cache_dir.glob("corpus-reachable-*/manifest.json")),
                        key=lambda p: p.stat().st_mtime)
        if cached:
            full = corpus_lib.Corpus.load(cached[-1])
            source = (f"molecules of the cached reachable corpus {cached[-1].name} ({len(full)}), stand-in "
                      "profiles at the config's widths")
        else:
            synth = ml_collections.ConfigDict(config.to_dict())
            synth.corpus.kind = "synthetic"
            synth.corpus.synthetic_molecules = sample
            synth.corpus.synthetic_dims = {"CP-Bray": 4, "CP-JUMP": 4, "G-CRISPR": 2, "G-ORF": 2, "GE": 4}
            synth.corpus.dims = {}
            synth.corpus.path = ""
            full = pretrain.load_corpus(synth, data_dir, cache_dir, config.workers or None, quiet)
            source = (f"{len(full)} enumerated molecules (smaller than drug-like ones), stand-in profiles at the "
                      "config's widths")
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


def context_shapes(ctx: dict, factor: float) -> dict:
    """The context arrays' (shape, dtype), every leading axis scaled by `factor` (indptr: nodes + 1)."""
    import jax

    def scale(path, x):
        name = jax.tree_util.keystr(path)
        n = x.shape[0]
        if "indptr" in name:
            m = int(round((n - 1) * factor)) + 1
        else:
            m = max(1, int(round(n * factor)))
        return ((m,) + tuple(x.shape[1:]), x.dtype)
    arrays = {k: v for k, v in ctx.items() if k != "type_index"}
    return jax.tree_util.tree_map_with_path(scale, arrays)


def _abstract(tree_of_shapes, sharding):
    import jax
    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s[0], s[1], sharding=sharding),
                                  tree_of_shapes, is_leaf=is_leaf)


# ---- compiled program analysis ---------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\]")
_SHAPE_LAYOUT = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8e4m3fn|f8e5m2)\[([\d,]*)\](\{[^}]*\})?")


def _padded_dims(dims: list[int], layout: str) -> list[int]:
    """Array dims padded to the layout's first tile: {minor_to_major:T(a,b)} pads the most minor dim to a
    multiple of b and the next one to a multiple of a (TPU's (8, 128) tiles: a [N, 9] int32 array
    occupies N x 128 words)."""
    m = re.match(r"\{([\d,]*)(?::(.*))?\}", layout or "")
    tile = re.search(r"T\(([\d,]+)\)", m.group(2) or "") if m else None
    if not m or not tile or not dims:
        return dims
    order = [int(x) for x in m.group(1).split(",") if x] or list(range(len(dims) - 1, -1, -1))
    sizes = [int(x) for x in tile.group(1).split(",")]
    out = list(dims)
    for k, t in enumerate(reversed(sizes)):       # the tile's last size applies to the most minor dim
        if k < len(order):
            d = order[k]
            out[d] = -(-out[d] // t) * t
    return out


def _bytes_of(shape_text: str, hbm_only: bool = False, padded: bool = True) -> float:
    """Bytes of the arrays in an HLO shape (tuples: the sum), padded to their layout's tiles (what the
    arrays occupy and move on a TPU). hbm_only: leave out arrays that TPU's memory-space assignment
    placed in on-chip memory (layout annotation S(1) and up): they cost no HBM traffic."""
    total = 0.0
    for dtype, dims, layout in _SHAPE_LAYOUT.findall(shape_text):
        if hbm_only and re.search(r"S\([1-9]\)", layout or ""):
            continue
        shape = [int(d) for d in dims.split(",") if d]
        if padded:
            shape = _padded_dims(shape, layout)
        total += math.prod(shape) * _DTYPE_BYTES.get(dtype, 4)
    return total


@dataclasses.dataclass
class HloInstr:
    name: str
    opcode: str
    out_bytes: float
    operand_bytes: float
    flops: float
    calls: list
    trip_count: int
    source: str


def _stack_frames(text: str, ours: str = "chmr_jax") -> dict:
    """{stack frame id: 'file.py:line (function)' of the innermost frame in our package} from the
    FileNames / FunctionNames / FileLocations / StackFrames tables a TPU module's text carries (its
    instructions name a stack_frame_id instead of a source line)."""
    sections, current = {}, None
    for line in text.splitlines():
        if line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line.strip()
            sections[current] = {}
            continue
        if current and not line.strip():
            current = None
            continue
        if current:
            m = re.match(r"\s*(\d+)\s+(.*)$", line)
            if m:
                sections[current][int(m.group(1))] = m.group(2)
    files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}
    locs = {}
    for k, v in sections.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        ln = re.search(r"\bline=(\d+)", v)
        locs[k] = (files.get(int(f.group(1)), "") if f else "", funcs.get(int(fn.group(1)), "") if fn else "",
                   int(ln.group(1)) if ln else 0)
    raw = {}
    for k, v in sections.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        raw[k] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
    out = {}
    for k in raw:
        seen, frame = set(), k
        while frame in raw and frame not in seen:
            seen.add(frame)
            file, func, line = locs.get(raw[frame][0], ("", "", 0))
            if ours in file and "/training/aot.py" not in file:
                out[k] = f"{os.path.basename(file)}:{line} ({func})"
                break
            if raw[frame][1] == frame:
                break
            frame = raw[frame][1]
    return out


def _parse_hlo(text: str):
    """{computation: [HloInstr]} and the entry computation's name, from an HLO module's text."""
    comps, entry, current = {}, None, None
    shapes = {}     # instruction name -> its output shape text (names are unique within a module)
    frames = _stack_frames(text)
    header = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
    instr = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*?)\)(.*)$")
    for line in text.splitlines():
        h = header.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            if h.group(1):
                entry = current
            continue
        if current is None or line.strip() == "}":
            continue
        m = instr.match(line)
        if not m:
            continue
        name, shape, opcode, operands, rest = m.groups()
        shapes[name] = shape
        calls = re.findall(r"\b(?:calls|body|condition|to_apply)=%?([\w.\-]+)", rest)
        for group in re.findall(r"branch_computations=\{([^}]*)\}", rest):
            calls += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        src = re.search(r'source_file="([^"]+)".*?source_line=(\d+)', rest)
        op = re.search(r'op_name="([^"]+)"', rest)
        frame = re.search(r"stack_frame_id=(\d+)", rest)
        ours = frames.get(int(frame.group(1))) if frame else None
        source = (f"{os.path.basename(src.group(1))}:{src.group(2)}" if src else ours if ours else
                  (op.group(1).split("/")[-1] if op else ""))
        comps[current].append(HloInstr(name, opcode, _bytes_of(shape), 0.0, 0.0, calls,
                                       int(trip.group(1)) if trip else 1, source))
        comps[current][-1].operand_names = re.findall(r"%([\w.\-]+)", operands)
        comps[current][-1].operands_text = operands
        comps[current][-1].shape_text = shape
        comps[current][-1].rest = rest
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode == "while" and not re.search(r'"known_trip_count"', ins.rest):
                ins.trip_count = _trip_count(comps, ins)
            ins.operand_bytes, ins.hbm_bytes = _moved_bytes(ins, shapes, comps)
            if ins.opcode in ("dot", "convolution"):
                ins.flops = _dot_flops(ins, shapes)
    return comps, entry


def _arrays(shape_text: str) -> list[str]:
    """The array shapes ('f32[8,128]{1,0:T(8,128)}') of an HLO shape, tuples flattened."""
    return ["{}[{}]{}".format(*a) for a in _SHAPE_LAYOUT.findall(shape_text)]


# Operand 0 of these is read only where the output says (a slice / the gathered rows), not whole.
_PARTIAL_READS = {"slice", "dynamic-slice", "gather"}


def _moved_bytes(ins, shapes: dict, comps: dict) -> tuple[float, float]:
    """(all bytes, HBM bytes) an instruction moves: operands read plus output written, except that
    - a slice / dynamic-slice / gather reads only what it outputs from its first operand, also when the
      slice or gather sits inside a fusion whose parameter feeds nothing else (a gather of a replicated
      table reads the gathered rows, not the table);
    - a dynamic-update-slice writes its update in place (update read + written);
    - an asynchronous X-start moves its result (a copy / slice prefetched into on-chip memory: read +
      write), its X-done nothing more;
    - the output of an instruction that aliases an operand (in-place fusions) is not counted twice.
    HBM bytes leave out arrays in on-chip memory (S(1) layouts)."""
    op = ins.opcode
    if op == "custom-call" and re.search(r'custom_call_target="(ConcatBitcast|AllocateBuffer)"', ins.rest):
        return 0.0, 0.0     # TPU bookkeeping: a concatenation of adjacent buffers / an allocation, no copy
    out_all, out_hbm = ins.out_bytes, _bytes_of(ins.shape_text, True)
    operands = [shapes.get(o, "") for o in ins.operand_names]
    if op.endswith("-done"):
        return 0.0, 0.0
    if op.endswith("-start"):
        arrays = _arrays(ins.shape_text)
        # (operands...), result(s), context scalars: the result is the array after the operands.
        n_in = max(1, len(_arrays(operands[0])) if operands else 1)
        result = arrays[n_in] if len(arrays) > n_in else (arrays[-1] if arrays else "")
        if op in ("copy-start", "slice-start"):   # reads the result's bytes from its source
            src_hbm = _bytes_of(result) if operands and _bytes_of(operands[0], True) else 0.0
        else:                                      # collectives read their operands
            src_hbm = sum(_bytes_of(o, True) for o in operands)
        return 2 * _bytes_of(result), src_hbm + _bytes_of(result, True)
    if op in _PARTIAL_READS and operands:
        rest_all = sum(_bytes_of(o) for o in operands[1:])
        rest_hbm = sum(_bytes_of(o, True) for o in operands[1:])
        first_hbm = out_all if _bytes_of(operands[0], True) else 0.0
        return out_all + out_all + rest_all, out_hbm + first_hbm + rest_hbm
    if op == "dynamic-update-slice" and len(operands) > 1:
        upd, upd_hbm = _bytes_of(operands[1]), _bytes_of(operands[1], True)
        return 2 * upd, upd_hbm + (upd if out_hbm else 0.0)
    reads_all = [_bytes_of(o) for o in operands]
    reads_hbm = [_bytes_of(o, True) for o in operands]
    if op == "fusion" and ins.calls:
        partial = _fusion_partial_reads(comps.get(ins.calls[0], []))
        for i, limited in partial.items():
            if i < len(reads_all):
                reads_hbm[i] = min(reads_hbm[i], limited) if reads_hbm[i] else 0.0
                reads_all[i] = min(reads_all[i], limited)
    aliased = re.search(r"output_to_operand_aliasing=\{", ins.rest) is not None
    return (sum(reads_all) + (0.0 if aliased else out_all), sum(reads_hbm) + (0.0 if aliased else out_hbm))


def _fusion_partial_reads(body: list) -> dict:
    """{parameter index: bytes actually read} for a fused computation's parameters whose every use is
    the first operand of a slice / dynamic-slice / gather (they read the output's size, not the whole)."""
    params = {i.name: int(re.match(r"\s*(\d+)", i.operands_text).group(1)) for i in body
              if i.opcode == "parameter" and re.match(r"\s*(\d+)", i.operands_text)}
    uses = {name: [] for name in params}
    for i in body:
        for k, o in enumerate(i.operand_names):
            if o in uses:
                uses[o].append((i, k))
    out = {}
    for name, us in uses.items():
        if us and all(u.opcode in _PARTIAL_READS and k == 0 for u, k in us):
            out[params[name]] = sum(u.out_bytes for u, _ in us)
    return out


def _trip_count(comps, ins) -> int:
    """A while loop's trip count from its condition `counter < constant` (JAX's scans and fori_loops count
    from 0); 1 where the condition has another form (the loop is then counted once, as XLA does)."""
    cond = re.search(r"condition=%?([\w.\-]+)", ins.rest)
    body = comps.get(cond.group(1), []) if cond else []
    consts = {i.name: i.operands_text for i in body if i.opcode == "constant"}
    for i in body:
        if i.opcode == "compare" and "direction=LT" in i.rest and len(i.operand_names) == 2:
            bound = consts.get(i.operand_names[1], "")
            if bound.strip().lstrip("-").isdigit():
                return max(1, int(bound))
    return 1


def _dot_flops(ins, shapes) -> float:
    """2 x output elements x contracted size of a dot (convolutions: 2 x output x kernel / output features)."""
    out = _SHAPE.findall(ins.shape_text)
    if not out:
        return 0.0
    out_n = math.prod(int(d) for d in out[0][1].split(",") if d) if out[0][1] else 1
    if ins.opcode == "dot":
        lhs = _SHAPE.findall(shapes.get(ins.operand_names[0], "")) if ins.operand_names else []
        cdims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.rest)
        if not lhs or not cdims:
            return 2.0 * out_n
        ldims = [int(d) for d in lhs[0][1].split(",") if d]
        k = math.prod(ldims[int(i)] for i in cdims.group(1).split(",") if i) if cdims.group(1) else 1
        return 2.0 * out_n * k
    kern = _SHAPE.findall(shapes.get(ins.operand_names[1], "")) if len(ins.operand_names) > 1 else []
    kn = math.prod(int(d) for d in kern[0][1].split(",") if d) if kern and kern[0][1] else 1
    return 2.0 * out_n * kn / max(1, int(out[0][1].split(",")[-1] or 1))


# Instructions that move no HBM bytes of their own (views, bookkeeping) or whose cost is their callee's.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "call", "while", "conditional"}


def hlo_cost(text: str, conditional: str = "max", parsed=None) -> dict:
    """Per-chip bytes accessed and dot FLOPs of a compiled module, every instruction counted once per
    execution: top-level instructions (a fusion counts its operands and output, not its insides; its
    dots' FLOPs) in the entry computation and, through while / call / conditional, in the computations
    they run, times the loops' trip counts. `bytes`: all operands and outputs (XLA's 'bytes accessed'
    convention); `hbm_bytes`: without the arrays placed in on-chip memory (S(1) layouts), the traffic the
    roofline charges to HBM. A conditional runs one branch: `conditional` 'max' charges the heaviest (an
    upper bound), 'min' the lightest. Returns the totals, {source line or op: hbm bytes} and
    {instruction kind: hbm bytes}, and the loops found with their trip counts. `parsed`: _parse_hlo(text)."""
    comps, entry = parsed or _parse_hlo(text)
    by_source, by_kind, loops = {}, {}, []
    totals = {"bytes": 0.0, "hbm_bytes": 0.0, "flops": 0.0}

    def fusion_flops(comp: str, seen=()) -> float:
        f = 0.0
        for ins in comps.get(comp, []):
            f += ins.flops
            for c in ins.calls:
                if c not in seen:
                    f += fusion_flops(c, seen + (c,))
        return f

    def walk(comp: str, times: float, depth=0):
        if depth > 50:
            return
        for ins in comps.get(comp, []):
            if ins.opcode == "while":
                loops.append({"loop": ins.name, "source": ins.source, "trips": ins.trip_count, "times": times})
                for c in ins.calls:
                    walk(c, times * ins.trip_count, depth + 1)
                continue
            if ins.opcode == "call":
                for c in ins.calls:
                    walk(c, times, depth + 1)
                continue
            if ins.opcode == "conditional":
                # One branch runs: the heaviest or the lightest (see the docstring).
                best = None
                for c in ins.calls:
                    saved = (dict(totals), dict(by_source), dict(by_kind), len(loops))
                    walk(c, times, depth + 1)
                    moved = totals["bytes"] - saved[0]["bytes"]
                    if best is None or (moved > best[0] if conditional == "max" else moved < best[0]):
                        best = (moved, dict(totals), dict(by_source), dict(by_kind), loops[saved[3]:])
                    totals.clear(); totals.update(saved[0])
                    by_source.clear(); by_source.update(saved[1])
                    by_kind.clear(); by_kind.update(saved[2])
                    del loops[saved[3]:]
                if best is not None:
                    totals.update(best[1]); by_source.clear(); by_source.update(best[2])
                    by_kind.clear(); by_kind.update(best[3]); loops.extend(best[4])
                continue
            if ins.opcode in _FREE:
                continue
            b, hb = ins.operand_bytes * times, ins.hbm_bytes * times
            flops = (ins.flops + (fusion_flops(ins.calls[0]) if ins.opcode == "fusion" and ins.calls else 0)) * times
            totals["bytes"] += b
            totals["hbm_bytes"] += hb
            totals["flops"] += flops
            key = ins.source or ins.opcode
            by_source[key] = by_source.get(key, 0.0) + hb
            kind = re.sub(r"(\.\d+)+$", "", ins.name)
            by_kind[kind] = by_kind.get(kind, 0.0) + hb
    if entry:
        walk(entry, 1.0)
    return {**totals, "by_source": by_source, "by_kind": by_kind, "loops": loops}


def hbm_refusal(text: str):
    """(bytes needed or None, bytes the compiler allows or None, what the first figure is) when a TPU
    compile error is an HBM refusal, else None (on-chip vmem / smem exhaustion is a compile error).
    Two messages are known: '... HLO temporaries (54.12G) exceeds available HBM (15.75G)' and
    'Ran out of memory in memory space hbm. Used 21.95G of 15.48G hbm'."""
    unit = lambda u: {"G": GiB, "M": 2 ** 20, "K": 2 ** 10, "": 1}[u]
    m = re.search(r"HLO temporaries \(([\d.]+)([GMK]?)\) exceeds available HBM \(([\d.]+)([GMK]?)\)", text)
    if m:
        return int(float(m.group(1)) * unit(m.group(2))), int(float(m.group(3)) * unit(m.group(4))), "temporaries"
    m = re.search(r"memory space hbm\. Used ([\d.]+)([GMK]?) of ([\d.]+)([GMK]?) hbm", text)
    if m:
        return int(float(m.group(1)) * unit(m.group(2))), int(float(m.group(3)) * unit(m.group(4))), "total"
    if "RESOURCE_EXHAUSTED" in text and re.search(r"\bhbm\b|\bHBM\b", text) and not re.search(r"vmem|smem", text, re.I):
        return None, None, "unknown"
    return None


HOST_TARGETS = ("callback", "host", "python")


def host_calls(text: str) -> list[str]:
    """custom-call targets of a compiled module that run on the host (Python callbacks, host transfers)."""
    targets = re.findall(r'custom_call_target="([^"]+)"', text)
    sends = re.findall(r"\b(send|recv|infeed|outfeed)\(", text)
    return sorted({t for t in targets if any(h in t.lower() for h in HOST_TARGETS)} | set(sends))


# ---- compile -----------------------------------------------------------------------------------------

ROW_FIELDS = ("topology", "chips", "device_kind", "global_batch", "per_chip_bytes", "hbm_bytes", "fits",
              "flops_per_chip", "bytes_accessed_per_chip", "estimated_step_s", "estimate_source",
              "estimated_molecules_per_s", "estimated_mfu")


def compile_step(config, spec: Topology, batch_size: int | None = None, sample: Sample | None = None,
                 devices=None, hlo_dump: str | None = None, log=print) -> dict:
    """Compiles config's pretraining step for `spec` at global `batch_size` (default config's) and
    returns the row (ROW_FIELDS, plus compile seconds, the budget, XLA's own figures, host calls,
    donation, the shapes' provenance, the biggest byte movers)."""
    import jax
    from flax import nnx

    from chmr_jax.mechanisms import objective as objective_lib
    from chmr_jax.training import pretrain, train

    devices = devices or tpu_devices(spec)
    n = len(devices)
    batch_size = int(batch_size or config.batch.batch_size)
    sample = sample or load_sample(config, n, log=log)
    data = sample.data
    budget = budget_for(data, config, batch_size, n)
    names = pretrain.molecular_names(config)
    dims = pretrain.model_dims(config, data, names)
    mesh = train.data_mesh(devices)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    tx = train.make_optimizer(**config.optim, total_steps=1000)
    model = nnx.eval_shape(lambda: pretrain.build_model(config, dims))
    model.train()
    graphdef = nnx.split(model, nnx.Param, ...)[0]
    state_shapes = jax.eval_shape(lambda: train.init_state(pretrain.build_model(config, dims), tx)[1])
    a_state = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                     state_shapes)
    a_batch = _abstract(batch_shapes(data, budget), sharded)
    ctx = objective_lib.context_arrays(data.context)
    a_ctx = _abstract(context_shapes(ctx, sample.molecules / len(data)), replicated)
    key = jax.eval_shape(lambda: train.step_base_key(0))
    a_key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    schedule = train.lr_schedule(config.optim.lr, 1000, config.optim.schedule)
    step = train.make_train_step(graphdef, tx, pretrain.objective_config(config), ctx, mesh, schedule=schedule)
    t0 = time.perf_counter()
    try:
        compiled = step.lower(a_state, a_batch, a_key, a_ctx).compile()
    except Exception as e:   # XLA's compile errors (an op TPU cannot run, out of memory at compile time)
        text = str(e)
        refused = hbm_refusal(text)
        if refused is not None:
            # The TPU compiler refuses a program that does not fit its HBM: that is the answer, not an error.
            need, avail, what = refused
            return {**{f: None for f in ROW_FIELDS}, "topology": spec.topology_name, "name": spec.name, "chips": n,
                    "device_kind": devices[0].device_kind, "global_batch": batch_size, "fits": False,
                    "per_chip_bytes": need, "per_chip_bytes_is": what, "hbm_bytes": spec.chip.hbm_bytes,
                    "hbm_available_bytes": avail or spec.chip.hbm_bytes,
                    "budget": dataclasses.asdict(budget), "dtype": config.model.dtype, "remat": bool(config.model.remat),
                    "compile_s": round(time.perf_counter() - t0, 1),
                    "note": "the TPU compiler refused the program for HBM; per_chip_bytes is what its message "
                            "names (per_chip_bytes_is), at least that much"}
        first = next((ln for ln in text.splitlines() if ln.strip()), type(e).__name__)
        raise CompileError(f"the step does not compile for {spec.topology_name} at global batch {batch_size}: "
                           f"{type(e).__name__}: {first[:300]}") from None
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    per_chip = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                   - mem.alias_size_in_bytes)
    xla = compiled.cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) and xla else xla) or {}
    text = compiled.as_text()
    if hlo_dump:
        with open(hlo_dump, "w") as fh:
            fh.write(text)
    parsed = _parse_hlo(text)
    heavy, light = hlo_cost(text, "max", parsed), hlo_cost(text, "min", parsed)
    # The step's conditional is the collapse diagnostics (objective.collapse_every = k): the heavy branch
    # runs on one step in k. Amortised over k steps:
    k = pretrain.collapse_every(config) if config.objective.get("collapse_stats", True) else 1
    cost = {key: light[key] + (heavy[key] - light[key]) / max(k, 1) for key in ("bytes", "hbm_bytes", "flops")}
    cost.update(by_source=heavy["by_source"], by_kind=heavy["by_kind"])
    hosts = host_calls(text)
    model_flops = pretrain.step_flops(config, dims, tx, ctx, mesh, step, a_state, a_batch, a_key, a_ctx)
    chip = spec.chip
    optimal = float(xla.get("optimal_seconds", -1.0) or -1.0)
    roofline = max(cost["flops"] / chip.peak_flops, cost["bytes"] / chip.hbm_bytes_per_s)
    est, source = (optimal, "xla") if optimal > 0 else (roofline, "roofline")
    molecules = budget.batch_size
    top = sorted(cost["by_source"].items(), key=lambda kv: -kv[1])[:12]
    kinds = sorted(cost["by_kind"].items(), key=lambda kv: -kv[1])[:12]
    return {
        "topology": spec.topology_name, "name": spec.name, "chips": n, "hosts": spec.hosts,
        "device_kind": devices[0].device_kind, "global_batch": batch_size, "per_chip_batch": batch_size / n,
        "dtype": config.model.dtype, "remat": bool(config.model.remat), "infonce_impl": config.objective.infonce_impl,
        "budget": dataclasses.asdict(budget), "per_chip_bytes": per_chip, "per_chip_gib": round(per_chip / GiB, 3),
        "memory": {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                   "temporaries": int(mem.temp_size_in_bytes), "aliased": int(mem.alias_size_in_bytes)},
        "hbm_bytes": chip.hbm_bytes, "fits": per_chip <= chip.hbm_bytes,
        "flops_per_chip": cost["flops"], "bytes_accessed_per_chip": cost["bytes"],
        "bytes_per_molecule": cost["bytes"] * n / molecules,
        "bytes_accessed_per_chip_every_branch_heavy": heavy["bytes"], "conditional_amortised_over_steps": k,
        # Without the arrays XLA placed in on-chip memory: the HBM traffic alone (a lower bound of the time).
        "hbm_bytes_accessed_per_chip": cost["hbm_bytes"], "hbm_bytes_per_molecule": cost["hbm_bytes"] * n / molecules,
        "estimated_step_s_hbm_only": max(cost["flops"] / chip.peak_flops, cost["hbm_bytes"] / chip.hbm_bytes_per_s),
        "model_flops_per_chip": model_flops,
        "xla_cost_analysis": {"flops": xla.get("flops"), "bytes_accessed": xla.get("bytes accessed"),
                              "optimal_seconds": optimal, "note": "XLA's count: each loop body once"},
        "estimated_step_s": est, "estimate_source": source,
        "roofline": {"compute_s": cost["flops"] / chip.peak_flops, "memory_s": cost["bytes"] / chip.hbm_bytes_per_s,
                     "chip": dataclasses.asdict(chip)},
        "estimated_molecules_per_s": molecules / est if est > 0 else None,
        "estimated_mfu": (model_flops / (est * chip.peak_flops)) if model_flops and est > 0 else None,
        "compile_s": round(seconds, 1), "host_calls": hosts, "donated": mem.alias_size_in_bytes > 0,
        "shapes_from": sample.shapes_from, "context_molecules": sample.molecules, "sample_molecules": len(data),
        "top_hbm_bytes_by_source": [{"where": k, "bytes": v} for k, v in top],
        "top_hbm_bytes_by_kind": [{"kind": k, "bytes": v} for k, v in kinds],
        "note": "estimates from a deviceless compile: nothing ran on a TPU",
    }


def largest_batch(config, spec: Topology, sample: Sample | None = None, devices=None, log=print,
                  probes: tuple = (1, 2), first: dict | None = None, max_probes: int = 8) -> dict:
    """The largest global batch (a multiple of 8 x chips) whose compiled step fits the chip's HBM: a
    line through two compiles (the config's batch x `probes`; `first`: an already compiled row at the
    config's batch) predicts where the footprint reaches the HBM limit; each further compile moves the
    fitting / refused bracket (the line through its two ends, or halfway) until it is within 2% (or one
    unit), at most `max_probes` more compiles. Returns the largest fitting row, the smallest refused
    batch and every probe."""
    devices = devices or tpu_devices(spec)
    n = len(devices)
    sample = sample or load_sample(config, n, log=log)
    unit = 8 * n
    limit = spec.chip.hbm_bytes
    tried = []

    def probe(b):
        row = first if first is not None and first["global_batch"] == b else \
            compile_step(config, spec, b, sample, devices, log=log)
        tried.append({"global_batch": b, "per_chip_bytes": row["per_chip_bytes"], "fits": row["fits"],
                      "compile_s": row["compile_s"]})
        size = f"{row['per_chip_bytes'] / GiB:.2f} GiB" if row["per_chip_bytes"] else "? GiB"
        log(f"  {spec.topology_name} batch {b}: {'' if row['fits'] else '>= '}{size} per chip "
            f"({'fits' if row['fits'] else 'refused by the compiler for'} {limit / GiB:.0f} GiB)")
        return row

    base = max(unit, int(config.batch.batch_size) // unit * unit)
    if first is not None and first["global_batch"] != base:
        first = None
    r1, r2 = probe(base * probes[0]), probe(base * probes[1])
    # The compiler's own limit where a refused probe named it (v5e: 15.75 of 16 GiB).
    limit = min([limit] + [r["hbm_available_bytes"] for r in (r1, r2) if r.get("hbm_available_bytes")])
    fits = lambda r: bool(r["fits"])
    lo = max((r for r in (r1, r2) if fits(r)), key=lambda r: r["global_batch"], default=None)
    hi = min((r for r in (r1, r2) if not fits(r)), key=lambda r: r["global_batch"], default=None)
    line = None
    if r1["per_chip_bytes"] and r2["per_chip_bytes"] and r2["per_chip_bytes"] > r1["per_chip_bytes"]:
        line = (r1, r2)
    for _ in range(max_probes):
        # The next guess: where the line through the two nearest probes (one fitting, one not, when there are
        # both) reaches the limit; halfway when a probe has no size; never a batch already bracketed.
        a, b = (lo, hi) if lo is not None and hi is not None and lo["per_chip_bytes"] and hi["per_chip_bytes"] \
            else (line if line else (None, None))
        if lo is not None and hi is not None and hi["global_batch"] - lo["global_batch"] <= max(unit, 0.02 * lo["global_batch"]):
            break
        if a is not None:
            slope = (b["per_chip_bytes"] - a["per_chip_bytes"]) / (b["global_batch"] - a["global_batch"])
            guess = a["global_batch"] + (limit - a["per_chip_bytes"]) / slope if slope > 0 else None
        else:
            guess = None
        if guess is None:
            guess = (lo["global_batch"] + hi["global_batch"]) / 2 if lo and hi else \
                (hi["global_batch"] / 2 if hi else 2 * lo["global_batch"])
        low = lo["global_batch"] + unit if lo else unit
        high = hi["global_batch"] - unit if hi else float("inf")
        guess = int(min(max(guess, low), high) // unit * unit)
        if guess < low or guess > high:
            break
        row = probe(guess)
        if fits(row):
            lo = row
        else:
            hi = row
    return {**(lo or {}), "largest_batch": lo["global_batch"] if lo else 0,
            "smallest_refused_batch": hi["global_batch"] if hi else None, "probes": tried}


def format_rows(rows: list[dict]) -> str:
    """A table of compile rows; every time, rate and MFU is an estimate (est.)."""
    cols = ["topology", "chips", "global batch", "dtype", "remat", "per-chip GiB", "HBM GiB", "fits",
            "GFLOP/chip", "GB accessed/chip", "MB/molecule (HBM only)", "est. step ms", "est. source",
            "est. molecules/s", "est. MFU", "compile s"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        est = r.get("estimated_step_s")
        if est is None:     # refused by the compiler: does not fit
            need = r.get("per_chip_bytes")
            lines.append(" | ".join(str(v) for v in [r["topology"], r["chips"], f"{r['global_batch']:,}", r.get("dtype", ""),
                                                      r.get("remat", ""), f"> {need / GiB:.2f}" if need else "-",
                                                      f"{r['hbm_bytes'] / GiB:.0f}", "NO"] + ["-"] * 7 + [r["compile_s"]]))
            continue
        vals = [r["topology"], r["chips"], f"{r['global_batch']:,}", r.get("dtype", ""), r.get("remat", ""),
                f"{r['per_chip_bytes'] / GiB:.2f}", f"{r['hbm_bytes'] / GiB:.0f}", "yes" if r["fits"] else "NO",
                f"{r['flops_per_chip'] / 1e9:.1f}", f"{r['bytes_accessed_per_chip'] / 1e9:.2f}",
                f"{r['bytes_per_molecule'] / 1e6:.1f} ({r['hbm_bytes_per_molecule'] / 1e6:.1f})",
                f"{est * 1e3:.2f}" if est else "-", r["estimate_source"],
                f"{r['estimated_molecules_per_s']:,.0f}" if r.get("estimated_molecules_per_s") else "-",
                f"{r['estimated_mfu']:.1%}" if r.get("estimated_mfu") is not None else "-", r["compile_s"]]
        lines.append(" | ".join(str(v) for v in vals))
    return "\n".join(lines)
