"""The streaming `chmr-jax embed` run: the shard plan, resume from finished shards' records, the run itself (export).
(Moved unchanged from downstream/export.py; the package's docstring describes the export.)"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import jax

from chmr_jax.data import files, paths
from chmr_jax import progress as progress_lib

from chmr_jax.downstream.export.device import DeviceRunner, _embed_block, embed_budget
from chmr_jax.downstream.export.encoder import Encoder
from chmr_jax.downstream.export.inputs import _Featurizer, _shards_of, iter_molecules, scan_input
from chmr_jax.downstream.export.layout import ALIASES, BUDGET_SAMPLE, FILES, FORMATS, PLAN_VERSION, STRINGS
from chmr_jax.downstream.export.writers import _sha256, _shard_files, _tfds_features, _write_numpy, _write_parquet, _write_tfds, _write_tfds_metadata


# Tests only: SIGKILL this process once it has written this many shards (a crash at a shard boundary).
_KILL_AFTER = int(os.environ.get("CHMR_EMBED_KILL_AFTER_SHARDS", "0"))


def _record_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:05d}.json"


def _finished(out: Path, shard: int, plan_sha: str) -> dict | None:
    """The shard's record if it belongs to this plan and every file it lists has its digest; else None."""
    path = _record_path(out, shard)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    if record.get("plan") != plan_sha:
        return None
    for rel, digest in record["files"].items():
        if not (out / rel).exists() or _sha256(out / rel) != digest:
            return None
    return record


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_plan(out: Path, plan: dict, name=None) -> None:
    """Refuses an OUT (named `name`: a gs:// --out is checked in its local mirror) that holds another
    plan's shards (another input, encoder or arguments)."""
    path = out / "plan.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for part in ("input", "encoder", "args", "budget"):
        for key in sorted(set(old.get(part, {})) | set(plan[part])):
            if key == "path":
                continue
            a, b = old.get(part, {}).get(key), plan[part].get(key)
            if a != b:
                what = f"made with other flags (--{key}: {a} -> {b})" if part == "args" else \
                    f"of a different {part} ({key}: {a} -> {b})"
                raise ValueError(f"{name or out} holds an export {what}; resuming "
                                 "needs the same input, encoder and arguments: pass a new --out or delete it")


def export(encoder: Encoder, input_path, out, formats=FORMATS, smiles_column: str = "smiles",
           id_column: str | None = None, batch_size: int = 256, cache_dir=None, log=print,
           shard_size: int = 10_000, n_workers: int | None = None, show_progress: bool = True,
           stop=None) -> dict:
    """The streaming export (module docstring): embeds `input_path` into OUT's shards (this process's
    share; skipping finished ones), then process 0 writes the TFDS metadata and OUT/manifest.json.
    Returns the manifest (on process 0; the plan elsewhere). cache_dir is unused (streamed input is not
    cached; kept for the call signature). A gs:// OUT is written in a fresh local folder that starts as
    a copy of the bucket folder (paths.staged), each finished shard uploaded at once. stop: a callable
    asked before each shard; True raises KeyboardInterrupt there (finished shards stay: a rerun resumes)."""
    kw = dict(formats=formats, smiles_column=smiles_column, id_column=id_column, batch_size=batch_size, log=log,
              shard_size=shard_size, n_workers=n_workers, show_progress=show_progress, stop=stop)
    if paths.is_remote(out):
        url = os.fspath(paths.as_path(out))
        # (the plan and the shard records; each process then fetches the files of its own finished shards)
        with paths.staged(url, "--out", only=lambda rel: rel == "plan.json" or rel.startswith("shards/")) as local:
            return _export(encoder, input_path, local, out_url=url, **kw)
    return _export(encoder, input_path, Path(out), out_url=None, **kw)


def _export(encoder: Encoder, input_path, out: Path, out_url: str | None, formats, smiles_column, id_column,
            batch_size, log, shard_size, n_workers, show_progress, stop=None) -> dict:
    formats = [ALIASES.get(f, f) for f in formats]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats: unknown {unknown}; choose from {list(FORMATS)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"--shard_size ({shard_size}) and --batch_size ({batch_size}) must be positive")
    formats = [f for f in FORMATS if f in formats]
    out_name = out_url or out   # (shards are written under temporary names, renamed and hashed: local files)
    input_name = os.fspath(input_path)
    input_path = paths.local_file(input_path, "--input")   # a gs:// input: read from its verified local copy
    t_start = time.perf_counter()
    try:
        info = scan_input(input_path, smiles_column, id_column)
    except (ValueError, FileNotFoundError) as e:   # name a gs:// input by its URL, not this host's copy
        raise type(e)(str(e).replace(str(input_path), input_name)) from None
    if info["rows"] == 0:
        raise ValueError(f"{input_name}: no molecules (no data rows)")
    n_shards = -(-info["rows"] // shard_size)

    featurizer = _Featurizer(encoder.settings, n_workers)
    try:
        head = [s for s, _ in zip((s for s, _ in iter_molecules(input_path, smiles_column, id_column)),
                                  range(BUDGET_SAMPLE))]
        sample = featurizer.submit(head)()
        devices = jax.local_devices()
        budget = embed_budget(encoder, sample, batch_size, len(devices))
        runner = DeviceRunner(encoder, budget, devices)
        spec = {k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)} for k, v in runner.out_spec(sample).items()}
        spec = {**{k: {"shape": [], "dtype": "str"} for k in STRINGS}, **spec}
        plan = {"version": PLAN_VERSION, "input": info,
                "encoder": {"workdir": str(paths.as_path(encoder.workdir)), "checkpoint_step": encoder.step,
                            "params_sha256": encoder.params_digest()},
                "args": {"formats": formats, "smiles_column": smiles_column, "id_column": id_column,
                         "batch_size": batch_size, "shard_size": shard_size, "shards": n_shards},
                "budget": dataclasses.asdict(budget), "arrays": spec}
        # the input's path is left out: a moved (identical) input still resumes
        plan_sha = hashlib.sha256(json.dumps({**plan, "input": {k: v for k, v in info.items() if k != "path"}},
                                             sort_keys=True).encode()).hexdigest()
        _check_plan(out, plan, out_name)
        if out_url:   # every host has its copy of the bucket folder before process 0 replaces plan.json there
            _barrier("chmr_embed_plan_checked")
        if jax.process_index() == 0:
            files.atomic_write_text(out / "plan.json", json.dumps(plan, indent=1))
            paths.push(out, "--out", only={"plan.json"}.__contains__, to=out_url)

        mine = [i for i in range(n_shards) if i % jax.process_count() == jax.process_index()]
        if out_url:   # the files of this process's shards that the bucket has records of (digests checked next)
            wanted = set()
            for i in mine:
                try:
                    r = json.loads(_record_path(out, i).read_text())
                except (OSError, ValueError):
                    continue
                if r.get("plan") == plan_sha:
                    wanted |= set(r["files"])
            if wanted:
                paths.pull(out_url, "--out", only=wanted.__contains__, into=out)
        done = {i for i in mine if _finished(out, i, plan_sha) is not None}
        if done:
            log(f"resuming: {len(done)} of {len(mine)} shards of this process already written (digests "
                f"checked), skipped: {sorted(done)}")
        todo = [i for i in mine if i not in done]
        names = list(spec)
        tfds_features = _tfds_features(spec) if "tfds" in formats else None
        n_todo = sum(min(shard_size, info["rows"] - i * shard_size) for i in todo)
        shards = _shards_of(iter_molecules(input_path, smiles_column, id_column), shard_size, set(todo))
        with progress_lib.Progress(n_todo, "embed", unit="mol", enabled=show_progress) as bar:
            nxt = next(shards, None)
            pending = (nxt, featurizer.submit(nxt[1])) if nxt else None
            while pending is not None:
                if stop is not None and stop():
                    raise KeyboardInterrupt(f"stopped before shard {pending[0][0]}")
                (shard, smiles, ids), get = pending
                feats = get()
                nxt = next(shards, None)           # the next shard featurizes while this one is on the devices
                pending = (nxt, featurizer.submit(nxt[1])) if nxt else None
                arrays, rejects = _embed_block(runner, {k: jax.ShapeDtypeStruct([0] + v["shape"], v["dtype"])
                                                        for k, v in spec.items() if k not in STRINGS},
                                               feats, ids, shard * shard_size)
                del feats
                written = {}
                for fmt in formats:
                    rel = _shard_files(fmt, shard, n_shards, names)
                    if fmt == "numpy":
                        _write_numpy(out, rel, names, arrays)
                    elif fmt == "parquet":
                        _write_parquet(out, rel, arrays)
                    else:
                        _write_tfds(out, rel, arrays, tfds_features)
                    written.update({r: _sha256(out / r) for r in rel})
                record = {"shard": shard, "rows": [shard * shard_size, shard * shard_size + len(smiles)],
                          "molecules": int(len(arrays["id"])), "rejects": rejects, "files": written,
                          "plan": plan_sha}
                files.atomic_write_text(_record_path(out, shard), json.dumps(record))
                if out_url:   # the shard's files, then its record (uploaded oldest first)
                    sent = set(written) | {_record_path(out, shard).relative_to(out).as_posix()}
                    paths.push(out, "--out", only=sent.__contains__, to=out_url)
                bar.update(len(smiles))
                if len(done) + todo.index(shard) + 1 == _KILL_AFTER:    # tests: a crash between shards
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        featurizer.close()
    log(f"process {jax.process_index()} of {jax.process_count()}: wrote shards {todo}; "
        f"featurization wait {featurizer.seconds:.1f}s, model {runner.model_seconds:.1f}s "
        f"({len(jax.local_devices())} local devices, budget {budget})")
    _barrier("chmr_embed_shards_written")
    if jax.process_index() != 0:
        return plan
    in_bucket = None
    if out_url:   # the other hosts' records (their shards stay in the bucket), and what the bucket holds
        if jax.process_count() > 1:
            paths.pull(out_url, "--out", only=lambda rel: rel.startswith("shards/"), into=out)
        in_bucket = paths.listing(out_url)
    records, rejects = [], []
    for i in range(n_shards):
        path = _record_path(out, i)
        if not path.exists():
            raise ValueError(f"{out_name}: shard {i} has no record after every process finished; rerun the same command")
        r = json.loads(path.read_text())
        if r.get("plan") != plan_sha:   # e.g. a concurrent run with other arguments into the same --out
            raise ValueError(f"{out_name}: shard {i} was written by another embed run (its plan differs); use a new --out")
        missing = [rel for rel in r["files"] if in_bucket is not None and rel not in in_bucket]
        if missing:   # (records go up after their files: only a concurrent deletion gets here)
            raise ValueError(f"{out_name}: shard {i}'s files {missing[:3]} are not in the bucket; rerun the same command")
        records.append({k: r[k] for k in ("shard", "rows", "molecules", "files")} | {"n_rejects": len(r["rejects"])})
        rejects += r["rejects"]
    if "tfds" in formats:   # (every listed file is in the bucket: checked above)
        _write_tfds_metadata(out, spec, [r["molecules"] for r in records],
                             n_bytes=None if in_bucket is None else sum(
                                 int(in_bucket[rel]["size"]) for r in records for rel in r["files"] if rel.startswith("tfds/")))
    import chmr_jax
    manifest = {"chmr_jax_version": chmr_jax.__version__, "pretrained": plan["encoder"]["workdir"],
                "checkpoint_step": encoder.step, "params_sha256": plan["encoder"]["params_sha256"],
                "model": encoder.config.get("model", {}), "featurizer": dataclasses.asdict(encoder.settings),
                "input": input_name, "input_sha256": info["sha256"], "rows": info["rows"],
                "molecules": sum(r["molecules"] for r in records), "rejects": rejects, "arrays": spec,
                "formats": {f: FILES[f] for f in formats}, "shard_size": shard_size, "shards": records,
                "budget": plan["budget"], "processes": jax.process_count()}
    files.atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    # (a gs:// --out: the TFDS metadata, then the manifest; every shard went up when it was finished, and
    # this folder holds only this process's copies of them)
    paths.push(out, "--out", to=out_url,
               only=lambda rel: rel == "manifest.json" or (rel.startswith("tfds/") and ".array_record-" not in rel))
    log(f"embedded {manifest['molecules']} of {info['rows']} molecules ({len(rejects)} rejected, listed in "
        f"manifest.json) with {encoder.workdir} step {encoder.step} -> {out_name} "
        f"({n_shards} shards, {time.perf_counter() - t_start:.1f}s)")
    return manifest
