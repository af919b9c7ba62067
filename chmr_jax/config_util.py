"""Loading ml_collections config files by path, as absl's config_flags does: 'path.py[:variant]'."""
from __future__ import annotations

import importlib.util
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.py"


class ConfigError(ValueError):
    """A config that cannot run on this data; the message says which field and what to do."""


def load_config(spec: str | None = None):
    """Returns get_config(variant) of the config file `spec` = 'path/to/file.py[:variant]'."""
    spec = spec or str(DEFAULT_CONFIG)
    path, _, variant = spec.partition(":")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} not found; {_config_hint(path)}")
    module_spec = importlib.util.spec_from_file_location(f"chmr_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def _config_hint(path: Path) -> str:
    """What to give instead of a missing config file: the closest file in CONFIG_DIR, by absolute path
    (a relative configs/... path only works from the checkout)."""
    import difflib
    names = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
    close = difflib.get_close_matches(path.name, names, n=1)
    if close:
        return f"did you mean {CONFIG_DIR / close[0]}?"
    return f"the config files are in {CONFIG_DIR}: {', '.join(names)}"


def check_override(config, dotted: str) -> str | None:
    """None if `dotted` ('train.steps') names a field of `config`, else one line naming the override
    flag and the closest field (or the field's new name when it was renamed)."""
    import difflib
    if dotted in RENAMED:
        return f"--config.{dotted} was renamed: use --config.{RENAMED[dotted]}"
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        where = "config" + "".join(f".{p}" for p in parts[:i])
        if not hasattr(node, "keys"):
            return f"--config.{dotted}: {where} is a value, not a group of fields"
        if part not in node:
            close = difflib.get_close_matches(part, list(node.keys()), n=1)
            hint = (f"; did you mean --config.{'.'.join(parts[:i] + [close[0]])}?" if close else
                    f"; its fields are {sorted(node.keys())}")
            return f"--config.{dotted}: {where} has no field {part!r}{hint}"
        node = node[part]
    return None


def load_sibling(config_file: str, name: str, variant: str | None = None):
    """get_config(variant) of config file `name` in the directory of `config_file` (for configs
    that extend another one: config files are loaded by path, not imported as a package)."""
    return load_config(str(Path(config_file).with_name(name)) + (f":{variant}" if variant else ""))


# Config fields that were renamed, old dotted name -> new: an override of the old name is answered with
# the new one (step counts now carry their unit).
RENAMED = {"train.log_every": "train.log_every_steps", "train.checkpoint_every": "train.checkpoint_every_steps"}


def parse_list(text, cast=str, name: str | None = None) -> list:
    """The one comma-list parser (flags and config fields such as seeds, baselines, formats, epochs):
    items whitespace-stripped, empty items dropped, each passed through `cast`. None or '' -> [].

    A cast failure is a ValueError naming the item and the list (and `name`, the flag or config
    field, when given), so the CLI reports it as a one-line user error.

    >>> parse_list(" 1, 3,,10 ", int)
    [1, 3, 10]
    """
    if text is None:
        return []
    out = []
    for item in (s.strip() for s in str(text).split(",")):
        if not item:
            continue
        try:
            out.append(cast(item))
        except (TypeError, ValueError):
            kind = getattr(cast, "__name__", repr(cast))
            raise ValueError(f"{name or 'comma list'}={str(text)!r}: item {item!r} is not a valid {kind}") from None
    return out


def parse_arg(arg: str | None, **defaults):
    """The one parser of every config file's `get_config(arg)` argument (as big_vision's parse_arg):
    'key=value' pairs separated by commas, each value cast to its default's type; a bare word first is
    the variant (needs a `variant` default), and bare words after a 'key=value' continue that key's
    comma list (`dataset=bace,seeds=0,1,2` -> seeds='0,1,2'). Returns a ConfigDict of `defaults` updated.

    >>> parse_arg("paper", variant="default").variant
    'paper'
    """
    import ml_collections

    out = dict(defaults)
    key = None
    for item in [s.strip() for s in (arg or "").split(",") if s.strip()]:
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key not in defaults:
                raise ValueError(f"config argument {arg!r}: unknown key {key!r}; known: {sorted(defaults)}")
            out[key] = _cast(value, defaults[key], arg)
        elif key is not None and isinstance(defaults[key], str):
            out[key] = f"{out[key]},{item}"
        elif key is None and "variant" in defaults and out["variant"] == defaults["variant"]:
            out["variant"] = item
        else:
            raise ValueError(f"config argument {arg!r}: {item!r} is not key=value (known keys: {sorted(defaults)})")
    return ml_collections.ConfigDict(out)


def _cast(value: str, default, arg):
    if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"config argument {arg!r}: {value!r} is not a boolean")
        return value.lower() in ("true", "1")
    if isinstance(default, (int, float)):
        try:
            return type(default)(value)
        except ValueError:
            raise ValueError(f"config argument {arg!r}: {value!r} is not a {type(default).__name__}") from None
    return value


def parse_variant(arg: str | None, variants: tuple) -> str:
    """The variant named by a config file's argument (parse_arg; the first of `variants` by default),
    checked against `variants`."""
    variant = parse_arg(arg, variant=variants[0]).variant
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}; choose from {variants}")
    return variant
