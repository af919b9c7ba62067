"""Pretraining on the reachable real corpus: `chmr-jax pretrain --config configs/pretrain.py --workdir DIR`.

This is configs/default.py (its variants too: `configs/pretrain.py:rdkit3d`); every field can be
overridden on the command line, e.g. `--config.train.steps=300 --config.optim.lr=3e-4`.
"""
from chmr_jax import config_util


def get_config(arg: str | None = None):
    return config_util.load_sibling(__file__, "default.py", arg)
