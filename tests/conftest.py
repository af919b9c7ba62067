"""Shared fixtures. Tests that need the shared data read $CHMR_DATA_DIR (default ../shared/data)."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CHMR_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "infoalign").is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}: set CHMR_DATA_DIR to the directory "
                    "holding infoalign/, moleculenet/ and profiles/ to run this test")
    return DATA_DIR


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One feature cache per test session, so datasets are featurized once."""
    return tmp_path_factory.mktemp("chmr_cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    # Never touch the user's ~/.cache and never try the network from tests.
    monkeypatch.setenv("CHMR_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path_factory.getbasetemp() / "home"))
