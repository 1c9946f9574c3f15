"""YAML run configs: ``_base_`` merging, ``key.sub=value`` overrides, one schema per tool
(every value's type and range checked up front, :func:`validate_config`), argparse number
types, and the resolved config written beside a run."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

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


# --------------------------------------------------------------------------- schemas
class ConfigError(ValueError):
    """A recipe value of the wrong type or range, or a key the tool's schema does not have;
    the message names the key, the value and what is expected."""


@dataclass(frozen=True)
class Field:
    """What one recipe key may hold. ``kind``: ``int`` (a whole number; ``2.0`` is taken as
    2), ``float`` (any real number), ``bool``, ``str`` (``choices`` when given), ``numbers``
    (a list of ``length`` numbers), ``mapping`` (a dict, e.g. model constructor arguments).
    Numbers are bounded by ``low`` / ``high`` (inclusive) and ``above`` / ``below``
    (exclusive), each element of a ``numbers`` list too. ``optional``: ``null`` is allowed;
    ``default``: the value a recipe that lacks the key gets (else the key is required)."""

    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    choices: Optional[Tuple[str, ...]] = None
    length: Optional[int] = None
    optional: bool = False
    default: Any = _MISSING

    def describe(self) -> str:
        what = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a string",
                "numbers": f"a list of {self.length} numbers", "mapping": "a mapping {key: value, ...}"}[self.kind]
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        bounds = [f">= {self.low:g}" if self.low is not None else "", f"> {self.above:g}" if self.above is not None
                  else "", f"<= {self.high:g}" if self.high is not None else "",
                  f"< {self.below:g}" if self.below is not None else ""]
        bounds = [b for b in bounds if b]
        if bounds:
            what += (", each " if self.kind == "numbers" else " ") + " and ".join(bounds)
        return what + (", or null" if self.optional else "")

    def check(self, value: Any, key: str) -> Any:
        """``value`` normalised (``2.0`` -> 2 for a whole number), or :class:`ConfigError`."""
        if value is None and self.optional:
            return None
        ok, value = self._check(value)
        if not ok:
            raise ConfigError(f"config key {key} must be {self.describe()}, got {value!r} "
                              f"({type(value).__name__})")
        return value

    def _check(self, value: Any) -> Tuple[bool, Any]:
        if self.kind == "bool":
            return isinstance(value, bool), value
        if self.kind == "str":
            return isinstance(value, str) and (not self.choices or value in self.choices), value
        if self.kind == "mapping":
            return isinstance(value, dict), value
        if self.kind == "numbers":
            ok = (isinstance(value, list) and (self.length is None or len(value) == self.length)
                  and all(self._in_range(v) for v in value))
            return ok, value
        if not self._in_range(value):
            return False, value
        if self.kind == "int":
            return value == int(value), int(value) if value == int(value) else value
        return True, value

    def _in_range(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return ((self.low is None or v >= self.low) and (self.high is None or v <= self.high)
                and (self.above is None or v > self.above) and (self.below is None or v < self.below))


def whole(low: int = 1, **kw) -> Field:
    return Field("int", low=low, **kw)


def number(**kw) -> Field:
    return Field("float", **kw)


def flag(**kw) -> Field:
    return Field("bool", **kw)


def text(*choices: str, **kw) -> Field:
    return Field("str", choices=tuple(choices) or None, **kw)


def numbers(length: int, **kw) -> Field:
    return Field("numbers", length=length, **kw)


def mapping(**kw) -> Field:
    return Field("mapping", **kw)


def optional(field: Field) -> Field:
    return dataclasses.replace(field, optional=True)


# the fields every classification tool's recipe shares
AMP = optional(text("bf16", "fp16", "none"))  # autocast dtype on CUDA; none: fp32
SCHEDULE = {"epochs": whole(1), "warmup_epochs": number(low=0), "min_lr": number(low=0)}


def validate_config(cfg: dict, schema: Dict[str, Any], source: str = "the config") -> dict:
    """Check every value of ``cfg`` against the tool's ``schema`` (a nested dict of
    :class:`Field`), in place: a key the schema does not have, a missing key, or a value of
    the wrong type or range is a :class:`ConfigError` naming the key, the value and what is
    expected. Values are stored back normalised (``2.0`` epochs -> 2); keys a recipe may
    leave out get their default. ``_base_`` is resolved before this. Returns ``cfg``."""
    _validate(cfg, schema, "", source)
    return cfg


def _validate(node: Any, schema: Dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '(top level)'} must be a mapping of keys, got "
                          f"{node!r} ({type(node).__name__})")
    for key in node:
        if key not in schema:
            import difflib

            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{source} has the key {prefix}{key}, which this tool does not read{hint} "
                              f"(its keys here: {', '.join(prefix + k for k in schema)})")
    for key, field in schema.items():
        if isinstance(field, dict):
            if key not in node:
                raise ConfigError(f"{source} lacks the section {prefix}{key}")
            _validate(node[key], field, f"{prefix}{key}.", source)
        elif key in node:
            node[key] = field.check(node[key], prefix + key)
        elif field.default is not _MISSING:
            node[key] = copy.deepcopy(field.default)
        else:
            raise ConfigError(f"{source} lacks the key {prefix}{key} ({field.describe()})")


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
