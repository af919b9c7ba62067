"""Shared fixtures. Tests that need the shared data read $CHMR_DATA_DIR (default ../shared/data)."""
import os
from pathlib import Path

import jax
import pytest

# Multi-device code (ring InfoNCE, sharded statistics) is tested on 8 fake CPU devices. This must
# run before JAX initialises its backend, hence here, at conftest import time.
jax.config.update("jax_num_cpu_devices", 8)

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


@pytest.fixture(scope="session")
def mesh8():
    from jax.sharding import AxisType
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices; JAX was initialised before conftest could ask for them")
    return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir):
    """One in-process pretraining run of configs/test.py on the 8 fake devices, via the CLI with
    overrides (10 steps, checkpoints at 4, 8, 10); shared by the pretraining, fine-tuning and export tests."""
    from chmr_jax import cli
    workdir = tmp_path_factory.mktemp("run")
    rc = cli.main(["pretrain", "--config", str(REPO / "configs" / "test.py"), "--workdir", str(workdir),
                   f"--config.cache_dir={cache_dir}", "--config.train.steps=10", "--config.train.checkpoint_every_steps=4"])
    assert rc == 0
    return workdir
