"""Loading ml_collections config files by path, as absl's config_flags does: 'path.py[:variant]'."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.py"


def load_config(spec: str | None = None):
    """Returns get_config(variant) of the config file `spec` = 'path/to/file.py[:variant]'."""
    spec = spec or str(DEFAULT_CONFIG)
    path, _, variant = spec.partition(":")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found (configs live in the repository's configs/)")
    module_spec = importlib.util.spec_from_file_location(f"chmr_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)
