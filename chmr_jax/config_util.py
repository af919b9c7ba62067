"""Loading ml_collections config files by path, as absl's config_flags does: 'path.py[:variant]'."""
from __future__ import annotations

import importlib.util
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.py"


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


def load_sibling(config_file: str, name: str, variant: str | None = None):
    """get_config(variant) of config file `name` in the directory of `config_file` (for configs
    that extend another one: config files are loaded by path, not imported as a package)."""
    return load_config(str(Path(config_file).with_name(name)) + (f":{variant}" if variant else ""))
