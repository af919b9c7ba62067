"""The pretraining corpus as per-molecule records in ArrayRecord shards, built in shares (one per process).

A directory of records holds:
  records-p{p:05d}-of-{P:05d}.array_record   process p's molecules (P processes built it; P=1: one shard)
  gene_edges.npy                             the corpus' gene-gene edges ([E, 2] str), when it has any (the
                                             manifest's records.gene_edges says)
  manifest.json                              written last, by process 0: the corpus manifest (corpus.assemble's,
                                             format_version aside) plus "records": {version, shards: [{name,
                                             records, sha256, featurized, rejects, seconds}], settings_digest (the
                                             pretraining cache key's), gene_edges (bool), n_input, rejects [[row,
                                             smiles, reason]], processes}

One record per molecule the featurizer accepted, `flax.serialization.msgpack_serialize` of
  index        int   its row in the corpus (the 1-process corpus order: ascending featurizer row)
  row          int   its row in the featurizer's input list (MoleculePlan.smiles)
  key          str   the corpus join key;  inchikey14  str  the featurizer's 14-character key
  smiles       str
  nodes        int16 [atoms, 9]   edge_index int32 [edges, 2]   edge_feats int8 [edges, 3]   (featurize.py)
  morgan, maccs, target   uint8, packed bits (np.packbits) as featurize.MoleculeFeatures holds them
  profiles     {modality: float32 [dim]}  only the modalities OBSERVED for this molecule (no row, not a row
               of zeros, for a missing one)
Why msgpack: it needs no TensorFlow (flax is already a dependency), stores numpy arrays exactly (dtype, shape,
raw bytes) and strings natively, and is deterministic: the same molecule gives the same bytes whichever process
wrote it, so a P-process build's records equal a 1-process build's byte for byte (np.savez is a zip with
timestamps; pickle is unsafe to read).

How the shares are split: the molecule list (corpus.plan_molecules: join keys, de-duplication, exclusions) is
computed whole by every process (it is cheap, and a function of the inputs only), then process p featurizes the
rows i with i % P == p. Strided rather than contiguous: the list is structures of one source after another
(benchmarks, then profile-only molecules), whose sizes and parse costs differ, and a stride gives every process
the same mix. Featurization rejects are the only global decision that featurization makes: the processes
exchange their reject lists (`Share.exchange`, over JAX's collectives), so every one of them knows the corpus
order, aggregates the profile tables whole (cheap, table-level) and writes the records of its own molecules.
Pretraining's RDKit 3D descriptors are split the same way (`geometry`), then gathered whole on every process
(they are not in the records yet).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from chmr_jax.data import corpus as corpus_lib, featurize, files, registry

RECORDS_VERSION = 1
# The manifest's format_version: not corpus.FORMAT_VERSION, so that a chmr_jax older than the records, given a
# records folder, stops with "corpus format records-1 but this chmr_jax reads format 1" (not a missing corpus.npz).
FORMAT_VERSION = f"records-{RECORDS_VERSION}"
MANIFEST = "manifest.json"
GENE_EDGES = "gene_edges.npy"


def shard_name(index: int, count: int) -> str:
    return f"records-p{index:05d}-of-{count:05d}.array_record"


@dataclasses.dataclass(frozen=True)
class Share:
    """This process' part of a build: process `index` of `count`, and how the processes talk (JAX's
    multi-host collectives when count > 1)."""
    index: int = 0
    count: int = 1

    @classmethod
    def of_jax(cls) -> "Share":
        import jax
        return cls(jax.process_index(), jax.process_count())

    def rows(self, n: int) -> np.ndarray:
        """The plan rows this process featurizes: i % count == index."""
        return np.arange(self.index, n, self.count, dtype=np.int64)

    def exchange(self, obj) -> list:
        """Every process' `obj` (JSON-able), in process order (a sync point)."""
        if self.count == 1:
            return [obj]
        from jax.experimental import multihost_utils
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
        padded = np.zeros(int(sizes.max()), np.uint8)
        padded[:len(data)] = data
        every = np.asarray(multihost_utils.process_allgather(padded)).reshape(self.count, -1)
        return [json.loads(bytes(every[p, :sizes[p]]).decode()) for p in range(self.count)]

    def keys_of_smiles(self, smiles, join: str = "inchikey14", n_workers=None, log: Callable = print) -> list[str]:
        """featurize.keys_of_smiles with each process computing the keys of its rows(n), exchanged: every
        process gets all of them (the de-duplication by key is a global decision)."""
        smiles = list(smiles)
        mine = self.rows(len(smiles))
        local = featurize.keys_of_smiles([smiles[i] for i in mine], join, n_workers)
        log(f"corpus: computed {len(mine)} of {len(smiles)} join keys (process {self.index} of {self.count})")
        out = [""] * len(smiles)
        for p, keys in enumerate(self.exchange(local)):
            out[p::self.count] = keys
        return out

    def gather_rows(self, local: np.ndarray, n: int) -> np.ndarray:
        """The whole [n, ...] array from every process' rows(n) part (a sync point)."""
        if self.count == 1:
            return local
        if local.dtype == bool:   # (moved as bytes: not every backend's collectives take booleans)
            return self.gather_rows(local.astype(np.uint8), n).astype(bool)
        from jax.experimental import multihost_utils
        per = -(-n // self.count)
        padded = np.zeros((per,) + local.shape[1:], local.dtype)
        padded[:len(local)] = local
        every = np.asarray(multihost_utils.process_allgather(padded)).reshape((self.count, per) + local.shape[1:])
        out = np.empty((n,) + local.shape[1:], local.dtype)
        for p in range(self.count):
            out[p::self.count] = every[p, :len(range(p, n, self.count))]
        return out

    def barrier(self, name: str) -> None:
        if self.count > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)


PROBE = ".chmr-shared-probe"


def one_folder(directory, share: Share) -> bool:
    """Whether every process of `share` sees one folder at `directory` (a shared file system, not a folder of
    the same name on each host): process 0 writes a fresh token there, every process reads it back, and all
    get the same answer (a sync point; True for one process)."""
    if share.count == 1:
        return True
    import secrets
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = ""
    if share.index == 0:
        token = secrets.token_hex(16)
        files.atomic_write_text(directory / PROBE, token)
    token = share.exchange(token)[0]       # (after process 0 wrote it)
    try:
        seen = (directory / PROBE).read_text() == token
    except OSError:
        seen = False
    every = share.exchange(bool(seen))     # (after every process read it)
    if share.index == 0:
        (directory / PROBE).unlink(missing_ok=True)
    return all(every)


def encode(record: dict) -> bytes:
    from flax import serialization
    return serialization.msgpack_serialize(record)


def decode(data: bytes) -> dict:
    from flax import serialization
    return serialization.msgpack_restore(data)


def plan_digest(plan: corpus_lib.MoleculePlan) -> str:
    """sha256 of the molecule list (corpus order: join keys and structures)."""
    return hashlib.sha256(json.dumps([plan.join, plan.order, plan.smiles]).encode()).hexdigest()


def check_same_plan(plan: corpus_lib.MoleculePlan, share: Share) -> None:
    """Stops every process (one error, the same on each) unless all of them planned the same molecule list:
    a process whose inputs differ (another data mirror or exclusion CSV, a layout read while it was written)
    would otherwise featurize its share of another list, a corpus with molecules twice or missing."""
    mine = {"molecules": len(plan.order), "sha256": plan_digest(plan)}
    every = share.exchange(mine)
    if any(e != every[0] for e in every):
        raise corpus_lib.CorpusError(
            "corpus: the processes planned different molecule lists ("
            + ", ".join(f"process {p}: {e['molecules']} molecules, sha256 {e['sha256'][:12]}" for p, e in enumerate(every))
            + "); their inputs differ (data folder, corpus.exclude CSV, corpus.path): give every process the same")


def build(inputs: dict, out, share: Share = Share(), settings_digest: str = "", log: Callable = print,
          publish: Callable[[], object] = lambda: None, show_progress: bool = False,
          shards_meet_here: bool = True) -> dict:
    """Builds this process' share of the corpus records into directory `out`.

    inputs: corpus.assemble's arguments (prepare.corpus_inputs), the same on every process. Every process
    of `share` must call this (it exchanges reject lists and shard digests). publish: called after this
    process' shard is written and, on process 0, after the manifest (a gs:// mirror's push), before the
    final barrier. shards_meet_here: every process writes its shard into one folder `out` (a shared file
    system), which process 0 checks before it writes the manifest (False: they meet elsewhere, a gs:// cache's
    bucket). Returns this process' counts (molecules featurized, records written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if share.index == 0:   # (a rebuild into an earlier corpus' folder: no manifest lists half-written shards,
        (out / MANIFEST).unlink(missing_ok=True)      # and no gene edges of the earlier corpus stay)
        (out / GENE_EDGES).unlink(missing_ok=True)
    name, cache_dir, settings = inputs["name"], inputs["cache_dir"], inputs["settings"]
    plan = corpus_lib.plan_molecules(inputs["structures"], inputs["modality_sources"], inputs["join"],
                                     inputs["exclude_keys"], inputs["n_workers"], inputs.get("keys_of"))
    n = len(plan.smiles)
    check_same_plan(plan, share)
    mine = share.rows(n)
    t0 = time.perf_counter()
    feats = featurize.featurize_smiles(
        [plan.smiles[i] for i in mine], settings, cache_dir,
        name if share.count == 1 else f"{name}-p{share.index:05d}-of-{share.count:05d}",
        inputs["n_workers"], show_progress=show_progress, verbose=False)
    seconds = time.perf_counter() - t0
    log(f"corpus: featurized {len(mine)} of {n} molecules (process {share.index} of {share.count}) "
        f"in {seconds:.2f} s")
    my_rejects = [(int(mine[r]), str(s), str(why)) for r, s, why in feats.rejects]
    rejects = sorted(tuple(r) for part in share.exchange(my_rejects) for r in part)
    rejected = np.array([r for r, _, _ in rejects], np.int64)
    rows = np.setdiff1d(np.arange(n, dtype=np.int64), rejected)    # the corpus order: ascending plan row
    keys, smiles, modalities, manifest = corpus_lib.finish(
        plan, rows, len(rejects), inputs["modality_sources"], inputs["aggregate"], inputs["max_nan_fraction"],
        settings, name, inputs["expected_dims"], inputs["exclusion"])

    shard = out / shard_name(share.index, share.count)
    tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
    from array_record.python.array_record_module import ArrayRecordWriter
    writer = ArrayRecordWriter(str(tmp), "group_size:1")   # group size 1: random access by record
    for i in range(len(feats)):
        row = int(mine[feats.rows[i]])
        index = int(np.searchsorted(rows, row))
        nodes, edge_index, edge_feats = feats.graph(i)
        writer.write(encode({
            "index": index, "row": row, "key": str(keys[index]), "inchikey14": str(feats.keys[i]),
            "smiles": str(smiles[index]), "nodes": nodes, "edge_index": edge_index, "edge_feats": edge_feats,
            "morgan": feats.morgan[i], "maccs": feats.maccs[i], "target": feats.target[i],
            "profiles": {m: mod.values[index] for m, mod in modalities.items() if mod.available[index]}}))
    writer.close()
    os.replace(tmp, shard)
    mine_info = {"name": shard.name, "records": len(feats), "sha256": registry.sha256_of(shard),
                 "featurized": int(len(mine)), "rejects": len(my_rejects), "seconds": round(seconds, 3)}
    publish()
    shards = share.exchange(mine_info)       # (after every shard is written and published)
    unseen = [s["name"] for s in shards if not (out / s["name"]).exists()] if shards_meet_here else []
    unseen = share.exchange(unseen)[0]       # (process 0's view, for all: one decision)
    if unseen:   # (no manifest that lists shards process 0 cannot read)
        raise corpus_lib.CorpusError(
            f"{out}: process 0 does not see the shards {unseen[:3]} that the other processes wrote there, so the "
            "processes do not share this folder; give them one (a shared folder or a gs:// cache)")
    if share.index == 0:
        gene_edges = inputs.get("gene_edges")
        if gene_edges is not None:
            with open(out / (GENE_EDGES + f".tmp{os.getpid()}"), "wb") as fh:
                np.save(fh, np.asarray(gene_edges, dtype=str), allow_pickle=False)
            os.replace(out / (GENE_EDGES + f".tmp{os.getpid()}"), out / GENE_EDGES)
        manifest["format_version"] = FORMAT_VERSION
        manifest["records"] = {"version": RECORDS_VERSION, "shards": shards, "settings_digest": settings_digest,
                               "gene_edges": gene_edges is not None,
                               "n_input": n, "rejects": [list(r) for r in rejects], "processes": share.count}
        # written last: its presence marks a complete set of records
        files.atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        publish()
    share.barrier("chmr_corpus_records")
    return mine_info


def missing(directory) -> list[str]:
    """What a reader of `directory` lacks locally: the manifest, or shards it lists ([] when complete; an
    npz corpus with its manifest counts as complete)."""
    directory = Path(directory)
    if not (directory / MANIFEST).exists():
        return [MANIFEST]
    info = corpus_lib.read_manifest(directory / MANIFEST).get("records")
    if info is None:
        return []
    return [s["name"] for s in info["shards"] if not (directory / s["name"]).exists()]


def read_records(directory) -> list[bytes]:
    """Every record of the directory's shards (the manifest's), in corpus order; each shard checked against
    the manifest's count and sha256."""
    return _read(directory)[0]


def _read(directory) -> tuple[list[bytes], list[dict]]:
    from array_record.python.array_record_module import ArrayRecordReader
    directory = Path(directory)
    info = corpus_lib.read_manifest(directory / MANIFEST)["records"]
    raw = []
    for shard in info["shards"]:
        path = directory / shard["name"]
        if not path.exists():
            raise corpus_lib.CorpusError(
                f"{directory}: the shard {shard['name']} that its manifest lists is missing; the corpus is "
                "incomplete: delete the folder (and its copy in the bucket for a gs:// cache) and build it again")
        if registry.sha256_of(path) != shard["sha256"]:
            raise corpus_lib.CorpusError(f"{path}: its sha256 differs from the manifest's; the records are "
                                         "corrupt or from another build: delete the directory and build again")
        reader = ArrayRecordReader(str(path))
        try:
            got = reader.read_all() if reader.num_records() else []
        finally:
            reader.close()
        if len(got) != shard["records"]:
            raise corpus_lib.CorpusError(f"{path}: {len(got)} records but the manifest lists {shard['records']}")
        raw += got
    decoded = [decode(r) for r in raw]
    index = np.array([d["index"] for d in decoded], np.int64)
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(len(raw))):
        raise corpus_lib.CorpusError(f"{directory}: the shards' record indices are not 0..{len(raw) - 1} once each")
    return [raw[i] for i in order], [decoded[i] for i in order]


def read_corpus(directory) -> corpus_lib.Corpus:
    """The in-memory Corpus the records stand for (equal, array for array, to corpus.assemble's)."""
    directory = Path(directory)
    manifest = corpus_lib.read_manifest(directory / MANIFEST)
    info = manifest.pop("records")
    manifest["format_version"] = corpus_lib.FORMAT_VERSION    # (the in-memory corpus: as corpus.assemble's)
    if info.get("version") != RECORDS_VERSION:
        raise corpus_lib.CorpusError(f"{directory}: records version {info.get('version')} but this chmr_jax "
                                     f"reads version {RECORDS_VERSION}; rebuild the corpus")
    records = _read(directory)[1]
    n = len(records)
    settings = featurize.FeaturizerSettings(**manifest["featurizer"])

    def cat(field, width, dtype):
        return np.concatenate([r[field] for r in records]) if records else np.zeros((0, width), dtype)

    def stacked(field, width):
        return np.stack([r[field] for r in records]) if records else np.zeros((0, width), np.uint8)

    offsets = lambda field: np.concatenate([[0], np.cumsum([len(r[field]) for r in records])]).astype(np.int64)
    feats = featurize.MoleculeFeatures(
        smiles=np.array([r["smiles"] for r in records], dtype=str), rows=np.array([r["row"] for r in records], np.int64),
        keys=np.array([r["inchikey14"] for r in records], dtype="<U14"), nodes=cat("nodes", 9, np.int16),
        edge_index=cat("edge_index", 2, np.int32), edge_feats=cat("edge_feats", 3, np.int8),
        node_offsets=offsets("nodes"), edge_offsets=offsets("edge_index"),
        morgan=stacked("morgan", -(-settings.morgan_size // 8)), maccs=stacked("maccs", 21),
        target=stacked("target", -(-settings.target_size // 8)), n_input=int(info["n_input"]),
        rejects=[(int(r), s, why) for r, s, why in info["rejects"]], settings=settings)
    modalities = {}
    for name, m in manifest["modalities"].items():
        values, available = np.zeros((n, int(m["dim"])), np.float32), np.zeros(n, bool)
        for i, r in enumerate(records):
            if name in r["profiles"]:
                values[i], available[i] = r["profiles"][name], True
        modalities[name] = corpus_lib.Modality(values=values, available=available, feature_names=m["feature_names"],
                                               sources=m["sources"])
    gene_edges = np.load(directory / GENE_EDGES, allow_pickle=False) if info.get("gene_edges") else None
    return corpus_lib.Corpus(keys=np.array([r["key"] for r in records], dtype=str),
                             smiles=np.array([r["smiles"] for r in records], dtype=str), features=feats,
                             modalities=modalities, manifest=manifest, gene_edges=gene_edges)


def geometry(smiles, settings, cache_dir, name: str, n_workers=None, share: Share = Share(), log: Callable = print):
    """geometry.featurize_geometry of `smiles` (RDKit 3D descriptors) with each process embedding its share
    (rows i % P == p), gathered so that every process holds all rows; the same GeometryFeatures as one process
    computes (each molecule's embedding is seeded on its own). Process 0 caches the whole under the name one
    process would use, so later runs of any size load it."""
    from chmr_jax.data import geometry as geometry_lib
    smiles = [str(s) for s in smiles]
    whole = None if cache_dir is None else Path(cache_dir) / (
        f"{name}-geometry-{featurize.cache_key(smiles, dataclasses.asdict(settings), 'geometry')}.npz")
    cached = [bool(c) for c in share.exchange(whole is not None and whole.exists())]
    if share.count == 1 or all(cached):    # (one decision for all processes)
        return geometry_lib.featurize_geometry(smiles, settings, cache_dir, name, n_workers)
    n, mine = len(smiles), share.rows(len(smiles))
    t0 = time.perf_counter()
    part = geometry_lib.featurize_geometry([smiles[i] for i in mine], settings, cache_dir,
                                           f"{name}-p{share.index:05d}-of-{share.count:05d}", n_workers,
                                           show_progress=False)
    log(f"geometry: embedded {len(mine)} of {n} molecules (process {share.index} of {share.count}) "
        f"in {time.perf_counter() - t0:.2f} s")
    reasons = sorted((int(i), str(why)) for got in share.exchange([(int(mine[i]), why) for i, why in part.reasons])
                     for i, why in got)
    out = geometry_lib.GeometryFeatures(values=share.gather_rows(part.values, n), ok=share.gather_rows(part.ok, n),
                                        reasons=reasons, names=part.names)
    if share.index == 0 and whole is not None:   # (the file featurize_geometry writes and reads)
        files.atomic_savez(whole, values=out.values, ok=out.ok, reasons=np.array(json.dumps(reasons)))
    return out
