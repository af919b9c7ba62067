"""Where data and caches live. The only place that resolves these directories.

Data directory precedence: explicit `--data_dir` flag > `CHMR_DATA_DIR` > `~/.cache/chmr_jax`.
Cache directory precedence: explicit `--cache_dir` flag > `CHMR_CACHE_DIR` > `<home cache>/features`.
The cache is kept apart from the data directory so that a shared, read-only data directory
(e.g. `../shared/data`) is never written to.
"""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "CHMR_DATA_DIR"
CACHE_ENV = "CHMR_CACHE_DIR"
DEFAULT_HOME = Path("~/.cache/chmr_jax")


def resolve_data_dir(flag: str | os.PathLike | None = None) -> Path:
    """Returns the data directory: `flag` if given, else $CHMR_DATA_DIR, else ~/.cache/chmr_jax."""
    if flag:
        return Path(flag).expanduser().resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return DEFAULT_HOME.expanduser()


def resolve_cache_dir(flag: str | os.PathLike | None = None) -> Path:
    """Returns the featurization cache directory (created if missing)."""
    if flag:
        path = Path(flag).expanduser()
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        path = DEFAULT_HOME.expanduser() / "features"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def open_text(path):
    """A text file for reading, gunzipped on the fly when it ends in .gz (newline='' for the csv module)."""
    import gzip
    path = Path(path)
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")
