"""Structure-aware propagation of cellular modalities (spec §2, paper Eq. 1), sharded over a mesh.

1. `tanimoto_knn`: exact Tanimoto top-K over packed fingerprint bits. Query rows are sharded over
   every device of a mesh; each device walks its queries in blocks of `block` rows against the
   database in blocks of `db_block` rows, keeping a running top-K (a per-block top-K merged into it).
   The database is either replicated (packed uint8 bits: N x F/8 bytes per device, 16x less than
   unpacked bf16) or, when it no longer fits a device, sharded by rows and passed round the devices
   in a ring (`jax.lax.ppermute`), one shard per ring step. Bits are unpacked per block on the
   device: 0/1 in bf16 with float32 accumulation is exact (integer counts up to 2^24). No step needs
   an N x N (or block x N) matrix. Self is excluded by index (not by dropping the first hit, the
   release's bug); neighbours with zero similarity carry no weight. `approx_recall` swaps the
   per-block top-K for `jax.lax.approx_max_k` (TPU: approximate; CPU/GPU lower it to an exact sort).
   Ties (equal similarity): the lower molecule index first, whatever the mesh, blocks or layout.
2. `build_graph`: non-negative affinities S from the kNN sims. With `symmetrize` (default),
   A = (S + S^T) / 2, so the iteration below is exactly the Jacobi iteration for the harmonic
   extension minimising the Dirichlet energy sum_ij A_ij ||x_i - x_j||^2 (monotone non-increasing);
   W = D^-1 A is row-normalised (rows sum to 1). `shard_graph` lays W out by row blocks, one per device.
3. `propagate`: X^(0) = observed rows, 0 elsewhere; X^(t) = W X^(t-1), observed rows reset to their
   measurements after every step (the release's restore line is a no-op); T steps. Rows with no
   path to an observed row fall back to the observed mean (or zero) and stay flagged. The energy
   of every iterate is reported. Rows are sharded over the mesh: each step all-gathers one narrow
   column chunk of X ([N, chunk] per device) and multiplies it by the device's own rows of W, so
   the sparse product's temporaries are [nnz / devices, chunk], never [nnz, d].

One code path serves every device count: a PropagationGraph or kNN call without a mesh runs on a
1-device mesh of the default device (the same program with trivial collectives). Results come back
to the host as numpy arrays; on several processes every process receives the whole result.

The sparse format is hidden behind `spmm`; `formats` lists the implementations (compare them with
benchmarks/propagation.py). Wide feature matrices are processed in column chunks.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse
from jax.sharding import NamedSharding, PartitionSpec as P

FORMATS = ("bcsr", "bcoo", "segment_sum", "ell")
DEFAULT_FORMAT = "bcsr"  # fastest on CPU here (benchmarks/RESULTS.md); override per machine
KNN_DATABASES = ("auto", "replicated", "sharded")
# The replicated packed database may take this fraction of a device's memory before 'auto' shards it
# (the rest holds the query blocks, the [block, db_block] similarity tile and the program).
_REPLICATED_DB_FRACTION = 0.25
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.int32)


# ---- meshes and host <-> device ------------------------------------------------------------------

def local_mesh() -> jax.sharding.Mesh:
    """The 1-device mesh of the default device (the unsharded case of every function here)."""
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))


def _rows(mesh) -> P:
    """Dimension 0 split over every axis of the mesh (all its devices), the rest replicated."""
    return P(tuple(mesh.axis_names))


def _put(x: np.ndarray, mesh, rows_sharded: bool = True, n_rows: int | None = None) -> jax.Array:
    """Host array -> global array, rows split over the mesh (or replicated). With `n_rows` > len(x),
    rows past the end are zeros (padding built per shard, so no padded copy of x is made). Every
    process passes the same x and supplies its own devices' pieces (multi-process safe)."""
    if x.ndim == 0:
        return jax.make_array_from_callback((), NamedSharding(mesh, P()), lambda _: x)
    n_rows = len(x) if n_rows is None else n_rows
    shape = (n_rows,) + x.shape[1:]

    def piece(index):
        lo, hi, _ = index[0].indices(n_rows)
        take = x[lo:min(hi, len(x))]
        if hi - lo > len(take):
            take = np.concatenate([take, np.zeros((hi - lo - len(take),) + x.shape[1:], x.dtype)])
        return take[(slice(None),) + tuple(index[1:])]

    sharding = NamedSharding(mesh, _rows(mesh) if rows_sharded else P())
    return jax.make_array_from_callback(shape, sharding, piece)


def _fetch(x: jax.Array) -> np.ndarray:
    """Global array -> numpy on every process (all-gathered across processes when needed)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---- kNN -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KnnLayout:
    """Static shapes of one sharded kNN program (hashable: it keys the compiled program).

    Queries: `devices * query_rows` rows (padded past n), `query_rows` per device in blocks of `block`.
    Database: replicated, `db_rows` rows (padded past n) on every device, or sharded, `db_rows` per
    device; walked in blocks of `db_block` rows either way."""
    n: int
    k: int
    devices: int
    block: int
    query_rows: int
    db_block: int
    db_rows: int
    sharded_db: bool

    @property
    def n_query(self) -> int:
        return self.devices * self.query_rows

    @property
    def n_db(self) -> int:
        return self.devices * self.db_rows if self.sharded_db else self.db_rows


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def knn_layout(n: int, k: int, devices: int, block: int = 1024, db_block: int = 16384,
               sharded_db: bool = False) -> KnnLayout:
    """The padded shapes for n molecules on `devices` devices (blocks shrink to fit small inputs)."""
    if n < 2:
        raise ValueError("kNN needs at least 2 molecules")
    per_device = -(-n // devices)
    qb = max(1, min(block, per_device))
    db_span = per_device if sharded_db and devices > 1 else n
    dbb = max(1, min(db_block, db_span))
    return KnnLayout(n=n, k=min(k, n - 1), devices=devices, block=qb, query_rows=_ceil_to(per_device, qb),
                     db_block=dbb, db_rows=_ceil_to(db_span, dbb), sharded_db=sharded_db and devices > 1)


def _database_sharded(database: str, n: int, n_bytes: int, mesh) -> bool:
    """'auto': shard the database once its packed bits pass _REPLICATED_DB_FRACTION of the smallest
    device memory the runtime reports (CPU reports none: host memory, replicated)."""
    if database not in KNN_DATABASES:
        raise ValueError(f"knn database must be one of {KNN_DATABASES}, got {database!r}")
    if database != "auto":
        return database == "sharded"
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in mesh.devices.flat
              if d.process_index == jax.process_index() and d.platform != "cpu"]
    limits = [x for x in limits if x]
    return database_sharded(database, n, n_bytes, min(limits) if limits else None)


def database_sharded(database: str, n: int, n_bytes: int, device_bytes: int | None) -> bool:
    """The layout rule itself: 'sharded' / 'replicated' as said; 'auto' shards once n x n_bytes of packed
    bits pass _REPLICATED_DB_FRACTION of `device_bytes` (None: host memory, replicated). `chmr-jax
    compile --inputs` applies it with the TPU chip's memory (aot/inputs.py)."""
    if database not in KNN_DATABASES:
        raise ValueError(f"knn database must be one of {KNN_DATABASES}, got {database!r}")
    if database != "auto":
        return database == "sharded"
    return bool(device_bytes) and n * n_bytes > _REPLICATED_DB_FRACTION * device_bytes


def _unpack(packed):
    """uint8 [r, F/8] -> bfloat16 0/1 [r, F]. The bit order within a byte differs from np.unpackbits,
    which changes no inner product (queries and database are unpacked alike)."""
    bits = (packed[:, :, None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return bits.reshape(packed.shape[0], -1).astype(jnp.bfloat16)


def _tanimoto(q_bits, q_counts, q_ids, d_bits, d_counts, d_ids, n_real):
    """float32 [q, d] Tanimoto similarities; -1 for a query's own row and for padding rows (>= n_real).

    The intersection is a 0/1 product accumulated in float32: exact integers, so the similarity is
    the same float32 quotient on every layout (and as before the sharding)."""
    inter = jax.lax.dot_general(q_bits, d_bits, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    union = q_counts[:, None] + d_counts[None, :] - inter
    sim = jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)
    return jnp.where((d_ids[None, :] == q_ids[:, None]) | (d_ids[None, :] >= n_real), -1.0, sim)


def _merge_top_k(best_sim, best_idx, sim, idx, k: int):
    """The k best of two candidate lists [q, *] by (similarity descending, index ascending): the tie
    rule does not depend on the order in which blocks or ring steps arrive."""
    neg, idx = jax.lax.sort((-jnp.concatenate([best_sim, sim], 1), jnp.concatenate([best_idx, idx], 1)),
                            dimension=1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_block(block_bits, block_ids, all_bits, all_counts, n_real, k):
    """One query block against a whole replicated database (float32 bits), top-k by lax.top_k.
    benchmarks/tpu_compile.py compiles this kernel; the pipeline runs `knn_program`."""
    sim = _tanimoto(block_bits, jnp.sum(block_bits, axis=1), block_ids, all_bits, all_counts,
                    jnp.arange(all_bits.shape[0]), n_real)
    return jax.lax.top_k(sim, k)  # ties: lower index first


@functools.lru_cache(maxsize=None)
def knn_program(mesh, layout: KnnLayout, approx_recall: float | None = None):
    """The jitted sharded kNN: (q_packed uint8 [n_query, F/8], q_counts f32 [n_query], q_ids int32
    [n_query], d_packed uint8 [n_db, F/8], d_counts f32 [n_db], d_ids int32 [n_db], n_real int32 [])
    -> (sims f32 [n_query, k], ids int32 [n_query, k]), query rows over every device of `mesh`, the
    database replicated or row-sharded as `layout` says (`knn_arguments` builds the inputs).

    Per device: for each query block, for each database block, a Tanimoto tile [block, db_block],
    its top-k (exact `lax.top_k`, or `lax.approx_max_k` at `approx_recall`) merged into the running
    top-k. A sharded database makes `devices` ring steps: after each, every device hands its shard
    to the next one (ppermute), so each query meets every shard once."""
    axes = tuple(mesh.axis_names)
    rows = P(axes)
    db_spec = rows if layout.sharded_db else P()
    k, qb, dbb = layout.k, layout.block, layout.db_block
    kb = min(k, dbb)

    def block_top(sim):
        if approx_recall:
            return jax.lax.approx_max_k(sim, kb, recall_target=approx_recall)
        return jax.lax.top_k(sim, kb)

    def local(qp, qc, qi, dp, dc, di, n_real):
        nq = qp.shape[0] // qb
        queries = (qp.reshape(nq, qb, -1), qc.reshape(nq, qb), qi.reshape(nq, qb))
        best = (jnp.full((nq, qb, k), -jnp.inf, jnp.float32),                 # empty slots sort last
                jnp.full((nq, qb, k), jnp.iinfo(jnp.int32).max, jnp.int32))
        best = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), best)   # per-device carries

        def visit(best, db):            # every query block against every block of one database shard
            dp, dc, di = db
            nd = dp.shape[0] // dbb
            blocks = (dp.reshape(nd, dbb, -1), dc.reshape(nd, dbb), di.reshape(nd, dbb))

            def query_block(args):
                qpb, qcb, qib, bs, bi = args
                q_bits = _unpack(qpb)

                def db_block(carry, blk):
                    dpb, dcb, dib = blk
                    sim, j = block_top(_tanimoto(q_bits, qcb, qib, _unpack(dpb), dcb, dib, n_real))
                    return _merge_top_k(*carry, sim, dib[j], k), None
                return jax.lax.scan(db_block, (bs, bi), blocks)[0]
            return jax.lax.map(query_block, queries + best)

        best = visit(best, (dp, dc, di))
        if layout.sharded_db:
            perm = [(i, (i + 1) % layout.devices) for i in range(layout.devices)]

            def ring_step(_, carry):
                best, db = carry
                db = tuple(jax.lax.ppermute(a, axes, perm) for a in db)
                return visit(best, db), db
            best, _ = jax.lax.fori_loop(1, layout.devices, ring_step, (best, (dp, dc, di)))
        return best[0].reshape(-1, k), best[1].reshape(-1, k)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, db_spec, db_spec, db_spec, P()),
                                 out_specs=(rows, rows)))


def knn_arguments(packed_bits: np.ndarray, layout: KnnLayout, mesh) -> tuple:
    """knn_program's inputs from packed bits uint8 [n, F/8] (host): queries row-sharded, the database
    replicated or row-sharded, both zero-padded (padding rows are never anyone's neighbour)."""
    counts = _POPCOUNT[packed_bits].sum(axis=1).astype(np.float32)
    n = layout.n
    q_ids = np.arange(layout.n_query, dtype=np.int32)
    d_ids = np.arange(layout.n_db, dtype=np.int32)
    db_sharded = layout.sharded_db
    return (_put(packed_bits, mesh, True, layout.n_query), _put(counts, mesh, True, layout.n_query),
            _put(q_ids, mesh, True), _put(packed_bits, mesh, db_sharded, layout.n_db),
            _put(counts, mesh, db_sharded, layout.n_db), _put(d_ids, mesh, db_sharded),
            _put(np.asarray(n, np.int32), mesh, False))


def tanimoto_knn(packed_bits: np.ndarray, k: int = 10, block: int = 1024, n_bits: int | None = None, *,
                 mesh=None, db_block: int = 16384, database: str = "auto", approx_recall: float | None = None):
    """Exact Tanimoto top-k neighbours of every row of packed fingerprints uint8 [N, F/8].

    Returns numpy (indices int32 [N, k], similarities float32 [N, k]) sorted by similarity; ties: the
    lower index first. Self is never its own neighbour; two empty fingerprints have similarity 0.
    mesh: query rows are split over all its devices (default: the 1-device mesh of the default device).
    block / db_block: query / database rows per tile (the tile is [block, db_block] float32 per device).
    database: 'replicated', 'sharded' (a ring over the devices) or 'auto' (sharded once the packed bits
    would take more than a quarter of a device's memory). approx_recall: per-block top-k by
    jax.lax.approx_max_k at this recall target (None: exact).
    """
    packed_bits = np.ascontiguousarray(packed_bits, np.uint8)
    if n_bits is not None and n_bits < 8 * packed_bits.shape[1]:   # bits past n_bits do not count
        packed_bits = np.packbits(np.unpackbits(packed_bits, axis=1, count=n_bits), axis=1)
    mesh = mesh if mesh is not None else local_mesh()
    n = packed_bits.shape[0]
    layout = knn_layout(n, k, mesh.size, block, db_block,
                        _database_sharded(database, n, packed_bits.shape[1], mesh))
    sims, idx = knn_program(mesh, layout, approx_recall)(*knn_arguments(packed_bits, layout, mesh))
    return _fetch(idx)[:n], _fetch(sims)[:n]


# ---- graph -------------------------------------------------------------------------------------

class PropagationGraph(NamedTuple):
    """Row-normalised W = D^-1 A in several layouts (a pytree). Rows may be a block of W's rows (one
    device's share, see shard_graph): the row count is degree's length, column ids are global.

    CSR: indptr [R+1], cols [nnz], weights [nnz] (rows [nnz] for COO / segment_sum).
    ELL: ell_cols [R, Kmax], ell_weights [R, Kmax] (padding: weight 0).
    Energy terms: degree d_i = sum_j A_ij (0 for isolated rows) and diag_i = (row + col sums of A).
    """
    indptr: jax.Array
    rows: jax.Array
    cols: jax.Array
    weights: jax.Array
    ell_cols: jax.Array
    ell_weights: jax.Array
    degree: jax.Array
    energy_diag: jax.Array


def build_graph(knn_idx: np.ndarray, knn_sim: np.ndarray, symmetrize: bool = True) -> PropagationGraph:
    """Host-side construction of W from kNN lists (see module docstring)."""
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = knn_idx.reshape(-1).astype(np.int64)
    vals = np.clip(knn_sim.reshape(-1).astype(np.float64), 0.0, None)
    keep = (vals > 0) & (rows != cols)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    if symmetrize:
        rows, cols, vals = np.concatenate([rows, cols]), np.concatenate([cols, rows]), np.concatenate([vals, vals]) / 2
    key = rows * n + cols
    uniq, inverse = np.unique(key, return_inverse=True)                  # sorted by (row, col)
    vals = np.bincount(inverse, weights=vals)
    rows, cols = uniq // n, uniq % n
    degree = np.bincount(rows, weights=vals, minlength=n)
    col_sums = np.bincount(cols, weights=vals, minlength=n)
    weights = vals / degree[rows]
    counts = np.bincount(rows, minlength=n)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    k_max = max(int(counts.max()) if n else 0, 1)
    slot = np.arange(len(rows)) - indptr[rows]
    ell_cols = np.tile(np.arange(n)[:, None], (1, k_max))
    ell_w = np.zeros((n, k_max))
    ell_cols[rows, slot] = cols
    ell_w[rows, slot] = weights
    return PropagationGraph(
        indptr=jnp.asarray(indptr, jnp.int32), rows=jnp.asarray(rows, jnp.int32),
        cols=jnp.asarray(cols, jnp.int32), weights=jnp.asarray(weights, jnp.float32),
        ell_cols=jnp.asarray(ell_cols, jnp.int32), ell_weights=jnp.asarray(ell_w, jnp.float32),
        degree=jnp.asarray(degree, jnp.float32), energy_diag=jnp.asarray(degree + col_sums, jnp.float32))


@dataclasses.dataclass(frozen=True)
class ShardedGraph:
    """W laid out by row blocks over a mesh: device s holds rows [s R, (s + 1) R) of the N rows padded
    to n_pad = devices x R (padding rows are empty: never reached, discarded). `graph` is a
    PropagationGraph of global arrays whose leaves concatenate the devices' local layouts along
    dimension 0 (indptr [devices (R + 1)], rows / cols / weights [devices E] with E the largest
    per-device nnz, the others [n_pad, ...]); inside shard_map each device sees a PropagationGraph of
    its R rows with global column ids."""
    graph: PropagationGraph
    n: int
    n_pad: int
    mesh: jax.sharding.Mesh


def shard_graph(graph: PropagationGraph, mesh=None) -> ShardedGraph:
    """Host-side re-layout of W by row blocks over `mesh` (default: the 1-device mesh).

    Each device's CSR block keeps its rows' entries in the original order, so every row of W @ X
    sums the same terms in the same order on any mesh. Blocks are padded to the same nnz E with
    weight-0 entries on the block's last row at columns that row does not use (indices stay sorted
    and unique, as BCSR is told)."""
    mesh = mesh if mesh is not None else local_mesh()
    devices = mesh.size
    indptr, cols = np.asarray(graph.indptr, np.int64), np.asarray(graph.cols, np.int64)
    weights = np.asarray(graph.weights, np.float32)
    ell_cols, ell_w = np.asarray(graph.ell_cols), np.asarray(graph.ell_weights)
    n = len(indptr) - 1
    r = max(1, -(-n // devices))
    n_pad = devices * r
    bounds = np.minimum(np.arange(devices + 1) * r, n)
    nnz = np.diff(indptr[bounds])
    e = max(int(nnz.max()), 1)
    l_indptr = np.zeros((devices, r + 1), np.int32)
    l_rows = np.zeros((devices, e), np.int32)
    l_cols = np.zeros((devices, e), np.int32)
    l_w = np.zeros((devices, e), np.float32)
    for s in range(devices):
        lo, hi = bounds[s], bounds[s + 1]
        a, b = indptr[lo], indptr[hi]
        local = np.concatenate([indptr[lo:hi + 1] - a, np.full(r - (hi - lo), b - a)])   # [r + 1]
        c, w = cols[a:b], weights[a:b]
        pad = e - (b - a)
        if pad:   # the last row gets `pad` zero-weight entries at columns it does not use, merged in order
            last = c[local[r - 1]:]
            free = np.setdiff1d(np.arange(pad + len(last)), last)[:pad]
            merged_c = np.concatenate([last, free])
            order = np.argsort(merged_c, kind="stable")
            c = np.concatenate([c[:local[r - 1]], merged_c[order]])
            w = np.concatenate([w[:local[r - 1]], np.concatenate([w[local[r - 1]:], np.zeros(pad, np.float32)])[order]])
            local[r] = e
        l_indptr[s] = local
        l_cols[s], l_w[s] = c, w
        l_rows[s] = np.repeat(np.arange(r), np.diff(local))
    row_pad = lambda x: np.concatenate([x, np.zeros((n_pad - n,) + x.shape[1:], x.dtype)])
    sharded = PropagationGraph(
        indptr=l_indptr.reshape(-1), rows=l_rows.reshape(-1), cols=l_cols.reshape(-1), weights=l_w.reshape(-1),
        ell_cols=row_pad(ell_cols.astype(np.int32)), ell_weights=row_pad(ell_w.astype(np.float32)),
        degree=row_pad(np.asarray(graph.degree, np.float32)),
        energy_diag=row_pad(np.asarray(graph.energy_diag, np.float32)))
    return ShardedGraph(graph=jax.tree.map(lambda x: _put(x, mesh), sharded), n=n, n_pad=n_pad, mesh=mesh)


def spmm(graph: PropagationGraph, x, fmt: str = DEFAULT_FORMAT):
    """W @ x for x [N, d] in the chosen sparse format (the one place the format is decided).

    The graph may hold a block of W's rows (shard_graph): the result has the graph's row count
    (degree's length), x has every row the column ids refer to."""
    n_rows, n_cols = graph.degree.shape[0], x.shape[0]
    if fmt == "bcsr":
        w = jsparse.BCSR((graph.weights, graph.cols, graph.indptr), shape=(n_rows, n_cols),
                         indices_sorted=True, unique_indices=True)
        return w @ x
    if fmt == "bcoo":
        w = jsparse.BCOO((graph.weights, jnp.stack([graph.rows, graph.cols], axis=1)), shape=(n_rows, n_cols),
                         indices_sorted=True, unique_indices=True)
        return w @ x
    if fmt == "segment_sum":
        return jax.ops.segment_sum(graph.weights[:, None] * x[graph.cols], graph.rows, num_segments=n_rows,
                                   indices_are_sorted=True)
    if fmt == "ell":
        return jnp.einsum("nk,nkd->nd", graph.ell_weights, x[graph.ell_cols])
    raise ValueError(f"unknown sparse format {fmt!r}; choose from {FORMATS}")


def _energy_terms(graph: PropagationGraph, x, wx):
    """sum over the graph's rows of diag_i ||x_i||^2 - 2 d_i x_i . (W x)_i (x, wx: those rows)."""
    return jnp.sum(graph.energy_diag * jnp.sum(x * x, axis=1)) - 2.0 * jnp.sum(graph.degree * jnp.sum(x * wx, axis=1))


def dirichlet_energy(graph: PropagationGraph, x, wx=None, fmt: str = DEFAULT_FORMAT):
    """sum_ij A_ij ||x_i - x_j||^2 = sum_i diag_i ||x_i||^2 - 2 sum_i d_i x_i . (W x)_i (whole W, x [N, d]).

    `wx` = W @ x may be passed when already computed (the iteration computes it anyway).
    """
    if wx is None:
        wx = spmm(graph, x, fmt)
    return _energy_terms(graph, x, wx)


class PropagationResult(NamedTuple):
    x: np.ndarray         # float32 [N, d] propagated features (observed rows unchanged)
    observed: np.ndarray  # bool [N], measured rows
    reached: np.ndarray   # bool [N], observed or reached from an observed row within T steps
    energy: np.ndarray    # float32 [T + 1] Dirichlet energy of X^(0..T) (before the mean fallback)


def default_width_chunk(mesh) -> int:
    """Feature columns per propagation call: 2048 on CPU (host memory; the fastest chunk there,
    benchmarks/RESULTS.md), 256 on accelerators, where each device holds the gathered [N, chunk] and the
    sparse product's [nnz / devices, chunk] temporaries (at 1M molecules: ~1 GiB each, not ~8)."""
    return 2048 if all(d.platform == "cpu" for d in mesh.devices.flat) else 256


@functools.lru_cache(maxsize=None)
def propagation_program(mesh, steps: int, fmt: str = DEFAULT_FORMAT, fallback: str = "mean"):
    """The jitted row-sharded Eq. 1 on one column chunk: (sharded graph (ShardedGraph.graph), x f32
    [n_pad, c], observed bool [n_pad]) -> (x_T f32 [n_pad, c] with the fallback filled in, reached bool
    [n_pad], energy f32 [steps + 1]), rows over every device of `mesh`.

    Per step each device all-gathers the chunk into [n_pad, c] (and the reached indicator [n_pad]) and
    multiplies its own rows of W by them. The indicator is not appended to the chunk as one more column:
    on CPU a 2049-column product took 5-10% longer than a 2048-column one, before the extra copies.
    The energy and the observed mean are sums over rows: psum of each device's part."""
    axes = tuple(mesh.axis_names)
    rows = P(axes)

    def local(graph, x, observed):
        c = x.shape[1]
        obs = observed[:, None]
        x0 = jnp.where(obs, x, 0.0)

        def gather(a):             # every device's rows of a, in row order
            return jax.lax.all_gather(a, axes, tiled=True)

        def step(xt, rt):          # (W x_t, W r_t) for this device's rows, from every device's rows
            return spmm(graph, gather(xt), fmt), spmm(graph, gather(rt)[:, None], fmt)[:, 0]

        def body(carry, _):
            xt, rt = carry
            wx, wr = step(xt, rt)
            energy = jax.lax.psum(_energy_terms(graph, xt, wx), axes)
            return (jnp.where(obs, x0, wx), jnp.where(observed, 1.0, wr)), energy

        (xt, rt), energies = jax.lax.scan(body, (x0, observed.astype(x.dtype)), None, length=steps)
        last = jax.lax.psum(_energy_terms(graph, xt, step(xt, rt)[0]), axes)
        energies = jnp.concatenate([energies, last[None]])
        reached = rt > 0
        if fallback == "mean":
            n_obs = jnp.maximum(jax.lax.psum(jnp.sum(observed), axes), 1)
            fill = jax.lax.psum(jnp.sum(x0, axis=0), axes) / n_obs
        else:
            fill = jnp.zeros(c, x.dtype)
        return jnp.where(reached[:, None], xt, fill[None, :]), reached, energies

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows), out_specs=(rows, rows, P())))


def propagate(graph: PropagationGraph | ShardedGraph, x, observed, steps: int = 5, fmt: str = DEFAULT_FORMAT,
              fallback: str = "mean", width_chunk: int | None = 2048) -> PropagationResult:
    """Eq. 1 for x [N, d] (values of unobserved rows are ignored) with observed [N] bool.

    graph: a ShardedGraph (rows over its mesh) or a PropagationGraph (run on the 1-device mesh).
    fallback: 'mean' (observed mean) or 'zero' for rows never reached. The columns are processed
    `width_chunk` at a time (they are independent): a device holds [N, width_chunk] of X gathered and
    the sparse product's [nnz / devices, width_chunk] temporaries, whatever d. Returns numpy arrays.
    """
    if fallback not in ("mean", "zero"):
        raise ValueError(f"fallback must be 'mean' or 'zero', got {fallback!r}")
    if not isinstance(graph, ShardedGraph):
        graph = shard_graph(graph)
    x = np.asarray(x, np.float32)
    observed = np.asarray(observed, bool)
    n, d = x.shape
    if n != graph.n:
        raise ValueError(f"x has {n} rows, the graph {graph.n}")
    chunk = max(1, d if not width_chunk else min(width_chunk, d))
    program = propagation_program(graph.mesh, steps, fmt, fallback)
    obs_dev = _put(observed, graph.mesh, True, graph.n_pad)
    out = np.empty((n, d), np.float32)
    energy, reached = np.zeros(steps + 1, np.float32), observed.copy()
    for start in range(0, d, chunk):
        xt, r, e = program(graph.graph, _put(x[:, start:start + chunk], graph.mesh, True, graph.n_pad), obs_dev)
        out[:, start:start + chunk] = _fetch(xt)[:n]
        reached = _fetch(r)[:n]
        energy += _fetch(e)
    return PropagationResult(x=out, observed=observed, reached=reached, energy=energy)
