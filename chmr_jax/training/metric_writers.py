"""Metric writers: JSON lines (`metrics.jsonl`, what `chmr-jax report` and the tests read) and
TensorBoard event files through tensorboardX (a maintained event writer that needs no TensorFlow;
clu's writers import TensorFlow).

A gs:// workdir has no append: metrics.jsonl is kept in memory and the whole object rewritten, and
so are the event files (tensorboardX writes them into memory through a writer factory of ours, never to
a local staging folder that a SIGKILL would leave behind), at most every UPLOAD_EVERY_S at `flush` and
always at `sync` (the loop calls it before each checkpoint, so the rows a resumed run keeps are in the
bucket) and `close`.
"""
from __future__ import annotations

import itertools
import json
import math
import threading
import time

import numpy as np

from chmr_jax.data import files, paths

UPLOAD_EVERY_S = 30.0


def scalars_of(metrics: dict) -> dict:
    """Flattens metrics to {tag: float}: scalars as is, small vectors as tag/0, tag/1, ..."""
    out = {}
    for tag, value in metrics.items():
        arr = np.asarray(value, dtype=np.float64)
        if arr.ndim == 0:
            out[tag] = float(arr)
        else:
            for i, v in enumerate(arr.reshape(-1)):
                out[f"{tag}/{i}"] = float(v)
    return out


class _MemoryFile:
    """An event file tensorboardX writes into memory (its record writer: write / flush / close, no fileno)."""

    def __init__(self):
        self._data, self._lock = bytearray(), threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._data += data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._data)


class _MemoryFiles:
    """tensorboardX's writer factory for `chmrmem://<n>/...` paths: {path: _MemoryFile} (a gs:// logdir's
    event files, uploaded whole by TensorBoardWriter.sync)."""
    PREFIX = "chmrmem"

    def __init__(self):
        self.files: dict[str, _MemoryFile] = {}
        self.folders = itertools.count()

    def open(self, path: str) -> _MemoryFile:
        self.files[path] = _MemoryFile()
        return self.files[path]

    def directory_check(self, path: str) -> None:
        pass


_MEMORY = _MemoryFiles()


class TensorBoardWriter:
    """Scalars under `logdir` as TensorBoard events (tensorboardX.SummaryWriter).

    resume_step: the checkpoint step a resumed run restarts from. The first step it writes,
    resume_step + 1, is tensorboardX's purge_step: a SessionLog START there makes TensorBoard discard
    the killed run's events from that step on, so the resumed curve replaces the killed run's tail
    instead of overlapping it.
    """

    def __init__(self, logdir, resume_step: int | None = None):
        from tensorboardX import SummaryWriter   # imported here: only the writing process needs it
        from tensorboardX import record_writer
        self.logdir = paths.as_path(logdir)
        # On gs://: written into memory, uploaded by sync() (tensorboardX appends to its file).
        self._memory = None
        if paths.is_remote(self.logdir):
            record_writer.register_writer_factory(_MemoryFiles.PREFIX, _MEMORY)
            self._memory = f"{_MemoryFiles.PREFIX}://{next(_MEMORY.folders)}"
        else:
            self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(self._memory or str(self.logdir),
                                     purge_step=None if resume_step is None else resume_step + 1)
        self._uploaded = time.monotonic()

    def write(self, step: int, metrics: dict, walltime: float | None = None) -> None:
        now = time.time() if walltime is None else walltime
        for tag, value in scalars_of(metrics).items():
            self._writer.add_scalar(tag, value, int(step), walltime=now)

    def flush(self) -> None:
        self._writer.flush()
        if self._memory is not None and time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Uploads the event files written so far (gs://: each object rewritten whole); nothing to do locally."""
        self._writer.flush()
        if self._memory is None:
            return
        for path, f in sorted(_MEMORY.files.items()):
            if path.startswith(self._memory + "/"):
                files.atomic_write_bytes(self.logdir / path.rsplit("/", 1)[1], f.getvalue())
        self._uploaded = time.monotonic()

    def close(self) -> None:
        self._writer.close()
        if self._memory is not None:
            self.sync()
            for path in [p for p in _MEMORY.files if p.startswith(self._memory + "/")]:
                del _MEMORY.files[path]


class JsonlWriter:
    """One JSON object per line: {"step": s, "time": unix seconds, metric: value, ...}.

    resume_step: rows with step > resume_step (written after the checkpoint a resumed run
    restarts from) are dropped first, so the file is the curve of the run that survived.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = paths.as_path(path)
        self.remote = paths.is_remote(self.path)
        if not self.remote:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _complete_row(line) and json.loads(line)["step"] <= resume_step]
            files.atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        # gs://: every row of the file in memory, the object rewritten by sync(); locally: appended.
        self._lines = kept if self.remote else None
        self._fh = None if self.remote else open(self.path, "a")
        self._dirty, self._uploaded = False, time.monotonic()

    def write(self, step: int, metrics: dict, walltime: float | None = None) -> None:
        """walltime: the row's unix time (default now); the trainer passes the instant it timed the row at."""
        row = {"step": int(step), "time": round(time.time() if walltime is None else walltime, 3)}
        for k, v in scalars_of(metrics).items():
            row[k] = v if math.isfinite(v) else str(v)   # JSON has no NaN / inf
        if self.remote:
            self._lines.append(json.dumps(row))
            self._dirty = True
        else:
            self._fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        if not self.remote:
            self._fh.flush()
        elif time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
            self.sync()

    def sync(self) -> None:
        """Every row written so far is in the file (gs://: the object is rewritten if rows were added)."""
        if not self.remote:
            self._fh.flush()
        elif self._dirty:
            files.atomic_write_text(self.path, "".join(line + "\n" for line in self._lines))
            self._dirty, self._uploaded = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.sync()
        else:
            self._fh.close()


def _complete_row(line: str) -> bool:
    # A SIGKILL can cut the last line short; such a line is dropped, not fatal.
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in paths.as_path(path).read_text().splitlines()
            if line.strip() and _complete_row(line)]


class MetricWriters:
    """Writes the same metrics to JSONL (`metrics.jsonl`) and TensorBoard (`tensorboard/`)."""

    def __init__(self, workdir, resume_step: int | None = None, tensorboard: bool = True):
        workdir = paths.as_path(workdir)
        self.writers = [JsonlWriter(workdir / "metrics.jsonl", resume_step)]
        if tensorboard:
            self.writers.append(TensorBoardWriter(workdir / "tensorboard", resume_step))

    def write(self, step: int, metrics: dict, walltime: float | None = None) -> None:
        for w in self.writers:
            w.write(step, metrics, walltime)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def sync(self) -> None:
        """Everything written so far is in the workdir (uploaded now on gs://)."""
        for w in self.writers:
            w.sync()

    def close(self) -> None:
        for w in self.writers:
            w.close()
