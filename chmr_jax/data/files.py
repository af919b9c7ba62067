"""Atomic file writes, so an interrupted write (SIGKILL, a full disk) never leaves a partial cache,
checkpoint sidecar or results file that a later run would read.

Local files: a temporary name in the same directory, then os.replace. Object storage (gs://) has no
rename, but an object write is atomic (a reader sees the old object or the whole new one): a plain
write, then the object is read back and its sha256 compared, so a write that went wrong is an error
now rather than a bad file later.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from chmr_jax.data import paths


class WriteNotVerified(OSError):
    """An object read back after writing it differs from what was written."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes `data` to `path` (local or gs://): readers never see a partial file."""
    path = paths.as_path(path)
    if paths.is_remote(path):
        path.write_bytes(data)
        back = path.read_bytes()
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise WriteNotVerified(f"{path}: read back {len(back)} bytes after writing {len(data)} with another "
                                   "sha256; the object store did not keep the write: check the bucket and run again")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_savez(path, **arrays) -> None:
    """np.savez to a temporary name then rename (locally; written then verified on gs://), so an
    interrupted write never leaves a bad cache."""
    if paths.is_remote(path):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    """Writes `text` (UTF-8) atomically: see atomic_write_bytes."""
    atomic_write_bytes(path, text.encode())
