"""YAML run configs: ``_base_`` merging, ``key.sub=value`` overrides, number checks
(config values and argparse types), and the resolved config written beside a run."""
from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path
from typing import Any, Dict, Sequence

import yaml

from .atomic_io import write_text_atomic
from .distributed import DistInfo


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(path: str, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML config, resolving ``_base_`` files, then apply ``key.sub=value`` overrides."""
    path = Path(path)
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    bases = cfg.pop("_base_", [])
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, load_config(path.parent / b))
    cfg = _merge(merged, cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        if leaf not in node:
            raise KeyError(f"override {key!r} names no existing config entry")
        node[leaf] = _parse_value(value)
    return cfg


def _parse_value(text: str):
    """YAML scalar, plus the numbers YAML 1.1 leaves as strings (``8e-3``, ``1e5``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------- validation
_MISSING = object()


def config_value(cfg: dict, key: str, kind: str = "positive_int"):
    """``cfg[a][b]`` for ``key = "a.b"``, checked; errors name the key.

    ``kind``: ``positive_int`` (an integer >= 1; ``2.0`` is taken as 2, ``1.5`` refused),
    ``nonneg_int``, ``positive_float`` or ``nonneg_float`` (any real number; booleans and
    strings are refused).
    """
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            raise KeyError(f"config key {key!r} is missing")
    return check_number(node, key, kind)


def check_number(value, key: str, kind: str = "positive_int"):
    """``value`` as an int / float of the given ``kind`` (see :func:`config_value`)."""
    want_int = kind.endswith("_int")
    positive = kind.startswith("positive")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a{' whole' if want_int else ''} number, got {value!r}")
    if want_int:
        if value != int(value):
            raise ValueError(f"{key} must be a whole number, got {value!r}")
        value = int(value)
    if positive and value <= 0:
        raise ValueError(f"{key} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise ValueError(f"{key} must be >= 0, got {value!r}")
    return value


def validate_config(cfg: dict, spec: Dict[str, str]) -> dict:
    """Check the numbers ``spec`` names (``{"optim.batch_size": "positive_int", ...}``) and
    store them back normalised (``2.0`` epochs -> 2); the first bad one is a ``ValueError``
    naming its key. Returns ``cfg``."""
    for key, kind in spec.items():
        value = config_value(cfg, key, kind)
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return cfg


def _whole_number_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` for an integer >= 1 (``--batch-per-gpu 0`` is an error, not 'default')."""
    return _whole_number_at_least(text, 1)


def nonneg_int(text: str) -> int:
    """argparse ``type`` for an integer >= 0."""
    return _whole_number_at_least(text, 0)


# --------------------------------------------------------------------------- the run's copy
def write_config(cfg: dict, output_dir: str, info: DistInfo) -> None:
    """Write the resolved ``cfg`` as ``config.yaml`` in ``output_dir`` (on the main process
    only), through a temporary file renamed over it: a symbolic link there is replaced, never
    written through."""
    if info.is_main:
        write_text_atomic(os.path.join(output_dir, "config.yaml"), yaml.safe_dump(cfg, sort_keys=False))
