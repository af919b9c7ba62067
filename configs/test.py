"""Tiny configuration for tests and smoke runs: runs on a laptop CPU in seconds."""
import importlib.util
import pathlib

import ml_collections


def _load_default():
    # Config files are loaded by path (config_flags), so load the sibling the same way.
    spec = importlib.util.spec_from_file_location("chmr_configs_default",
                                                  pathlib.Path(__file__).with_name("default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = _load_default().get_config(arg)
    config.workers = 1
    config.featurize.morgan_size = 256
    config.featurize.target_size = 256
    config.featurize.max_atoms = 64
    config.batch.batch_size = 8
    config.batch.pad_multiple = 16
    return config
