"""Atomic file writes: a temporary name in the same directory, then os.replace, so an interrupted
write (SIGKILL, a full disk) never leaves a partial cache, checkpoint sidecar or results file that a
later run would read."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def atomic_savez(path: Path, **arrays) -> None:
    """np.savez to a temporary name then rename, so an interrupted write never leaves a bad cache."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def atomic_write_text(path, text: str) -> None:
    """Writes `text` to a temporary name then renames it: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
