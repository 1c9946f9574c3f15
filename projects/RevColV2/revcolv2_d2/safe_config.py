"""Load a detectron2 LazyConfig without letting a YAML file run code.

detectron2's ``LazyConfig.load`` reads ``.yaml`` with ``yaml.unsafe_load``, which builds
arbitrary Python objects (``!!python/object/apply:os.system [...]`` runs a command). Here
YAML goes through ``yaml.safe_load``: plain data only; a Python tag is an error naming the
file. Python LazyConfigs (``.py``) are code by design and are executed as detectron2 does:
run only ``.py`` configs you trust.
"""
from __future__ import annotations

import os

import yaml
from detectron2.config import LazyConfig
from omegaconf import DictConfig, OmegaConf


def load_lazy_config(path: str) -> DictConfig:
    """``LazyConfig.load`` with a safe YAML loader."""
    if os.path.splitext(path)[1] not in (".yaml", ".yml"):
        return LazyConfig.load(path)
    try:
        with open(path) as f:
            obj = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise ValueError(
            f"refusing to load {path}: a YAML config may hold only plain data, but it asks for a Python "
            f"object ({e.problem.strip() if e.problem else e}). Loading it with detectron2's "
            "yaml.unsafe_load could run arbitrary code"
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a config (a mapping of keys)")
    return OmegaConf.create(obj, flags={"allow_objects": True})
