"""Load a detectron2 LazyConfig without letting a YAML file run code.

detectron2's ``LazyConfig.load`` reads ``.yaml`` with ``yaml.unsafe_load``, which builds
arbitrary Python objects (``!!python/object/apply:os.system [...]`` runs a command). Here a
YAML config is data, in two checks:

- it is parsed by ``yaml.SafeLoader`` plus the one Python object that ``LazyConfig.save``
  writes into the ``config.yaml`` of our Mask R-CNN configs, detectron2's ``ShapeSpec``
  (four optional integers); any other Python tag is an error naming the file;
- every ``_target_`` (the callables ``instantiate`` will call) must name a class or
  function defined in :data:`ALLOWED_TARGET_MODULES`, the modules our configs build
  from. ``os.system``, ``torch.hub.load`` or ``builtins.exec`` are refused with an error
  naming the key and the target, and so is a name that only reaches such a function
  through an allowed module (``revcolv2_d2.backbone.torch.hub.load``).

Python LazyConfigs (``.py``) are code by design and are executed as detectron2 does: run
only ``.py`` configs you trust. Command-line overrides are not checked: they are yours.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Iterator, Tuple

import yaml
from detectron2.config import LazyConfig
from omegaconf import DictConfig, OmegaConf

# The modules whose classes and functions a YAML config may instantiate: what the saved
# config.yaml of every config in projects/RevColV2/configs uses (models, data, evaluation,
# schedules, optimizers), and the neighbours a variant of them would take. Not whole
# packages: torch.hub.load, torch.load(weights_only=False) and detectron2's LazyConfig.load
# would run code from elsewhere.
ALLOWED_TARGET_MODULES = (
    "detectron2.data", "detectron2.evaluation", "detectron2.layers", "detectron2.modeling", "detectron2.solver",
    "fvcore.common.param_scheduler",
    "revcolv2.model", "revcolv2.layer_decay", "revcolv2.mim", "revcolv2.reversible",
    "revcolv2_d2.backbone", "revcolv2_d2.data", "revcolv2_d2.mask2former", "revcolv2_d2.schedules",
    "revcolv2_d2.upernet",
    "torch.nn", "torch.optim", "torchvision.ops", "torchvision.transforms",
    "transformers.models.mask2former",
)

_SHAPE_SPEC_TAG = "tag:yaml.org,2002:python/object:detectron2.layers.shape_spec.ShapeSpec"


class UnsafeConfigError(ValueError):
    """A YAML config that asks for code or objects a config may not hold; names the file."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also builds detectron2's ``ShapeSpec`` (and nothing else)."""


def _shape_spec(loader: _ConfigLoader, node: yaml.Node):
    from detectron2.layers import ShapeSpec

    fields = loader.construct_mapping(node, deep=True)
    allowed = {"channels", "height", "width", "stride"}
    if set(fields) - allowed or not all(v is None or type(v) is int for v in fields.values()):
        raise yaml.constructor.ConstructorError(None, None, f"a ShapeSpec holds optional integers {sorted(allowed)}, "
                                                f"not {fields!r}", node.start_mark)
    return ShapeSpec(**fields)


_ConfigLoader.add_constructor(_SHAPE_SPEC_TAG, _shape_spec)


def load_lazy_config(path: str) -> DictConfig:
    """``LazyConfig.load``; a YAML file is read as data and its ``_target_`` entries are
    checked against :data:`ALLOWED_TARGET_MODULES` (:class:`UnsafeConfigError` otherwise)."""
    if os.path.splitext(path)[1] not in (".yaml", ".yml"):
        return LazyConfig.load(path)
    try:
        with open(path) as f:
            obj = yaml.load(f, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        raise UnsafeConfigError(
            f"refusing to load {path}: a YAML config may hold only plain data, but it asks for a Python "
            f"object ({e.problem.strip() if e.problem else e}). Loading it with detectron2's "
            "yaml.unsafe_load could run arbitrary code"
        ) from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a config (a mapping of keys)")
    for key, target in _targets(obj):
        check_target(target, key, path)
    return OmegaConf.create(obj, flags={"allow_objects": True})


def _targets(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every ``_target_`` in a parsed YAML document."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}{k}"
        if k == "_target_":
            yield key, v
        yield from _targets(v, key + ".")


def _in_allowed_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in ALLOWED_TARGET_MODULES)


def check_target(target: Any, key: str, path: str) -> None:
    """Raise :class:`UnsafeConfigError` unless ``target`` names a class or function that
    is defined in an allowed module (the name is resolved, so a path through an allowed
    module to something else does not pass)."""
    def refuse(why: str) -> UnsafeConfigError:
        return UnsafeConfigError(
            f"refusing to load {path}: {key} is {target!r}, {why}. A YAML config may instantiate only classes "
            f"and functions of {', '.join(ALLOWED_TARGET_MODULES)}; write a .py config (code you review) for "
            "anything else")

    if not isinstance(target, str):
        raise refuse("not a dotted name")
    if not _in_allowed_module(target):
        raise refuse("outside the allowed modules")
    from detectron2.utils.registry import locate

    try:
        obj = locate(target)  # imports only allowed modules: checked above
    except Exception as e:  # noqa: BLE001 - locate raises ImportError or others for a bad name
        raise refuse(f"which cannot be found ({type(e).__name__}: {e})") from None
    if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _in_allowed_module(obj.__module__ or ""):
        raise refuse(f"which is {getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__name__)}")
