"""Job configurations from YAML files and layers of settings (preset < file < flags).

A config file is a YAML mapping; keys may use dashes or underscores (``max-iters`` = ``max_iters``), a key the
job does not know is an error, and values given as flags win over the file's.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from flowtame.errors import InputError


def read_config_file(path: str | Path, known: Collection[str]) -> dict[str, Any]:
    """The keys of the YAML mapping at ``path`` (dashes -> underscores); raises InputError for a missing or
    invalid file and for keys not in ``known``."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        raise InputError(f"{path}: not a regular file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config file must be a mapping of keys to values")
    config = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return config


def merge_layers(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Key dicts merged left to right: a later layer's value wins, None values are skipped (flags not given)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if v is not None})
    return merged
