"""detectron2 checkpointer that reads RevColV2 (timm-style) checkpoints and saves atomically.

``train.init_checkpoint`` may point at:
- a detectron2 checkpoint of this project (keys already match), or
- a RevColV2 MIM / classification checkpoint (keys ``patch_embed.*``, ``columns.*``, ...):
  they are renamed to the model's RevColV2 module (e.g. ``backbone.bottom_up.net.``),
  the pre-training / classification-only tensors are dropped, and every key is reported.
A tensor whose shape differs from the model's is an error naming it (never skipped), and
so is a checkpoint whose saved recipe (our training tools store it) names another RevColV2
size; the error says which config overrides build the checkpoint's size (for example
``model.backbone.bottom_up.embed_dim=192``).

Files are read without running code from them (``revcolv2.checkpoint.load_file``): ``.pth``
with ``torch.load(weights_only=True)``, ``.pkl`` (detectron2 model zoo) with a restricted
unpickler that builds only numpy arrays and plain containers. The weights taken from a
RevColV2 training checkpoint follow the project's one rule (EMA weights where present,
unless ``ema=False``) and are logged. ``last_checkpoint`` may only name a file in
``save_dir``; a resume falls back past an unreadable newest checkpoint to the newest
readable one.

The checkpoints it writes record the class names of the training dataset (``classes``,
given by the training script) and the RevColV2 preset and size of the backbone
(``config.model``, as our training tools record them), so evaluation can check the classes
(:mod:`revcolv2_d2.classes`) and the model-side tools (``tools/analyze_levels.py``,
``tools/export.py``) rebuild the backbone from the file alone. A checkpoint whose classifier
(or recorded class names) has another class count than the model is an error naming both
numbers.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _group_checkpoint_keys, _group_to_str

from revcolv2.atomic_io import remove_stale_temporaries, save_atomic
from revcolv2.checkpoint import (
    PRETRAIN_ONLY_PREFIXES,
    CheckpointError,
    ShapeMismatchError,
    check_shapes,
    load_file,
    select_weights,
)
from revcolv2.layers import Attention
from revcolv2.model import MODEL_CFGS, RevColV2
from revcolv2.run_checkpoints import (
    LAST_CHECKPOINT_FILE,
    newest_readable_checkpoint,
    read_last_checkpoint,
    write_last_checkpoint,
)

from .classes import ClassMismatchError, checkpoint_num_classes, model_num_classes

logger = logging.getLogger("detectron2").getChild(__name__)  # shown by default_setup

# tensors of a RevColV2 checkpoint that a dense-prediction model does not use
_DROPPED_PREFIXES = PRETRAIN_ONLY_PREFIXES + ("head.", "fc_norm.")


def _revcolv2_prefix(model: torch.nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, RevColV2):
            return name + "." if name else ""
    raise ValueError("the model holds no RevColV2 module to load a RevColV2 checkpoint into")


def is_revcolv2_state_dict(sd: Dict[str, Any]) -> bool:
    return any(k.startswith(("patch_embed.", "columns.")) for k in sd)


def convert_revcolv2_state_dict(sd: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Rename a RevColV2 state dict to ``model``'s names; report what was dropped."""
    prefix = _revcolv2_prefix(model)
    dropped = sorted(k for k in sd if k.startswith(_DROPPED_PREFIXES))
    if dropped:
        logger.info("RevColV2 checkpoint: not used by the dense model (%d):\n%s", len(dropped), _grouped(dropped))
    return {prefix + k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}


# RevColV2 constructor arguments that make a model's size (the presets' fields)
SIZE_ARGS = ("embed_dim", "num_heads", "num_bu_columns", "num_td_columns", "num_levels", "blocks_per_level",
             "patch_size")
_SIZE_DEFAULTS = {k: inspect.signature(RevColV2).parameters[k].default for k in SIZE_ARGS}


def net_size(net: RevColV2) -> Dict[str, Any]:
    """The size arguments a built RevColV2 has."""
    heads = next(m.num_heads for m in net.modules() if isinstance(m, Attention))
    return {"embed_dim": net.embed_dim, "num_heads": heads, "num_bu_columns": net.num_bu_columns,
            "num_td_columns": net.num_td_columns, "num_levels": net.num_levels,
            "blocks_per_level": net.blocks_per_level, "patch_size": net.patch_size}


def recipe_size(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The RevColV2 size in the recipe a training checkpoint of ours saved (``config``:
    ``model.name``, a preset, plus ``model.kwargs``), or None when it holds none."""
    model = checkpoint.get("config", {}).get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict) or model.get("name") not in MODEL_CFGS:
        return None
    given = {**MODEL_CFGS[model["name"]], **(model.get("kwargs") or {})}
    return {k: given.get(k, _SIZE_DEFAULTS[k]) for k in SIZE_ARGS}


def tensor_size(sd: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    """What the weights under ``prefix`` show of a RevColV2's size (the number of heads and
    the column split are not in the shapes)."""
    size = {}
    proj = sd.get(prefix + "patch_embed.proj.weight")
    if hasattr(proj, "shape") and len(proj.shape) == 4:
        size.update(embed_dim=int(proj.shape[0]), patch_size=int(proj.shape[-1]))
    found = [re.match(re.escape(prefix) + r"columns\.\d+\.levels\.(\d+)\.blocks\.(\d+)\.", k) for k in sd]
    found = [tuple(int(g) for g in m.groups()) for m in found if m]
    if found:
        size.update(num_levels=max(l for l, _ in found) + 1, blocks_per_level=max(b for _, b in found) + 1)
    return size


def size_overrides(model: torch.nn.Module, size: Dict[str, Any]) -> list:
    """The config overrides (``key=value``) that make ``model``'s RevColV2 the given size. The
    config key of the RevColV2Backbone is its module path under ``model.``, as in the
    project's configs (``model.backbone.bottom_up`` in Mask R-CNN, ``model.backbone`` in the
    ADE20K models)."""
    path = _revcolv2_prefix(model)[:-1]  # the RevColV2 module, e.g. backbone.bottom_up.net
    parent = path.rpartition(".")[0]  # the RevColV2Backbone that holds it, e.g. backbone.bottom_up
    key = f"model.{parent}" if parent else "model"
    own = net_size(model.get_submodule(path) if path else model)
    return [f"{key}.{k}={v}" for k, v in size.items() if own[k] != v]


class SizeMismatchError(ShapeMismatchError):
    """A checkpoint of another RevColV2 size. ``from_recipe``: the config overrides in the
    message come from the recipe saved in the checkpoint, so they build exactly its size."""

    def __init__(self, message: str, source: str, from_recipe: bool):
        super().__init__(message, source)
        self.from_recipe = from_recipe


def _grouped(keys) -> str:
    """One line per module: ``prefix.{a, b}``, as fvcore prints missing/unused keys."""
    groups = _group_checkpoint_keys(list(keys))
    return "\n".join("  " + prefix + _group_to_str(tails) for prefix, tails in sorted(groups.items()))


class RevColV2Checkpointer(DetectionCheckpointer):
    """``classes``: the class names of the training dataset, written into every checkpoint
    it saves. After a load, ``loaded_from`` (the file, None when nothing was loaded),
    ``loaded_detectron2`` (a detectron2 checkpoint, not a converted RevColV2 one) and
    ``loaded_classes`` (its recorded class names, or None) describe what was loaded."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *, ema: bool = True,
                 classes: Optional[Sequence[str]] = None, **kwargs: Any):
        super().__init__(model, save_dir, **kwargs)
        self.ema = ema
        self.classes = list(classes) if classes is not None else None
        self._source = "checkpoint"
        self._recipe_size = None  # the RevColV2 size the loaded checkpoint's recipe names
        self.loaded_from: Optional[str] = None
        self.loaded_detectron2 = False
        self.loaded_classes: Optional[List[str]] = None
        if self.save_dir and self.save_to_disk:  # temporary files of a killed checkpoint write
            remove_stale_temporaries(self.save_dir)

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        self.loaded_from, self.loaded_detectron2, self.loaded_classes = None, False, None
        return super().load(path, checkpointables)

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return load_file(f)  # weights_only: nothing in the file can run code

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._source = self.loaded_from = filename
        self._recipe_size = None
        if filename.endswith(".pkl"):
            loaded = _model_zoo_pickle(load_file(filename), filename)
        elif filename.endswith(".pyth"):  # pycls, as detectron2 reads it
            data = load_file(filename)
            if not isinstance(data, dict) or "model_state" not in data:
                raise CheckpointError(f"{filename}: pycls checkpoints (.pyth) must contain 'model_state'")
            loaded = {"model": {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")},
                      "__author__": "pycls", "matching_heuristics": True}
        else:
            loaded = super()._load_file(filename)
        # a RevColV2 checkpoint, raw (which detectron2 wraps as {'model': ...}) or wrapped
        # ({'model', 'model_ema', 'optimizer', ...} of our training tools, {'state_dict': ...})
        for candidate in (loaded, loaded.get("model") if isinstance(loaded, dict) else None):
            if not isinstance(candidate, dict):
                continue
            try:
                sd, _ = select_weights(candidate, ema=self.ema, source=filename, log=None)
            except CheckpointError:
                continue
            if is_revcolv2_state_dict(sd):
                select_weights(candidate, ema=self.ema, source=filename, log=self.logger.info)
                self._recipe_size = recipe_size(candidate)
                return {"model": convert_revcolv2_state_dict(sd, self.model), "__author__": "revcolv2"}
        self.loaded_detectron2 = True
        classes = loaded.get("classes") if isinstance(loaded, dict) else None
        if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
            self.loaded_classes = list(classes)
        return loaded

    def _load_model(self, checkpoint: Dict[str, Any]):
        own = self.model.state_dict()
        self._check_size(checkpoint["model"], own)
        loaded = [k for k in checkpoint["model"] if k in own]  # fvcore pops "model" below
        incompatible = super()._load_model(checkpoint)
        # fvcore then logs the missing and unused keys by name (_log_incompatible_keys)
        self.logger.info(
            "Loaded %d tensors; %d missing in the checkpoint; %d unused from the checkpoint. Loaded:\n%s",
            len(loaded), len(incompatible.missing_keys), len(incompatible.unexpected_keys),
            _grouped(loaded),
        )
        return incompatible

    def _check_size(self, sd: Dict[str, Any], own: Dict[str, torch.Tensor]) -> None:
        """A checkpoint of another RevColV2 size is an error naming a tensor of another shape,
        or the recipe saved in the checkpoint (another ``num_heads`` changes no shape), and
        the config overrides that build the checkpoint's size."""
        self._check_class_count(sd)
        hint = self._size_hint(sd)
        from_recipe = bool(hint) and self._recipe_size is not None
        try:
            check_shapes(sd, own, self._source)
        except ShapeMismatchError as e:
            raise SizeMismatchError(str(e) + hint, e.source, from_recipe) from None
        if from_recipe:  # e.g. another num_heads: no shape differs
            raise SizeMismatchError(f"{self._source}: the checkpoint is for a different model size{hint}",
                                    self._source, from_recipe)

    def _check_class_count(self, sd: Dict[str, Any]) -> None:
        """A detectron2 checkpoint trained for another number of classes than the model's
        (from its recorded class names, else from its classifier's size) is a
        :class:`~revcolv2_d2.classes.ClassMismatchError` naming both numbers."""
        found = model_num_classes(self.model)
        if found is None or not self.loaded_detectron2:
            return
        key, count = found
        if self.loaded_classes is not None and len(self.loaded_classes) != count:
            raise ClassMismatchError(
                f"{self._source} was trained on {len(self.loaded_classes)} classes "
                f"({', '.join(self.loaded_classes[:12])}{', ...' if len(self.loaded_classes) > 12 else ''}) but "
                f"the model predicts {count} ({key}={count}): use a checkpoint trained on this dataset's classes")
        held = checkpoint_num_classes(sd)
        if held is not None and held[1] != count:
            raise ClassMismatchError(f"{self._source}: its classifier {held[0]} predicts {held[1]} classes but the "
                                     f"model predicts {count} ({key}={count}): the checkpoint was trained on "
                                     "another dataset's classes")

    def _size_hint(self, sd: Dict[str, Any]) -> str:
        """The checkpoint's RevColV2 size and the overrides that build it; '' when the model
        has no RevColV2 or already has that size."""
        if not any(isinstance(m, RevColV2) for m in self.model.modules()):
            return ""
        size = self._recipe_size or tensor_size(sd, _revcolv2_prefix(self.model))
        overrides = size_overrides(self.model, size)
        if not overrides:
            return ""
        shown = ", ".join(f"{k}={v}" for k, v in size.items())
        hint = (f". The checkpoint holds a RevColV2 with {shown} (from "
                f"{'the recipe saved in it' if self._recipe_size is not None else 'its tensors'}); "
                f"to build that size, add the config overrides: {' '.join(overrides)}")
        if self._recipe_size is None:
            hint += " (plus num_heads as in pre-training: the tensors do not show it)"
        return hint

    def get_checkpoint_file(self) -> str:
        """The checkpoint to resume: the one ``last_checkpoint`` names (only a file in
        ``save_dir``), even when a file of a higher iteration is there (the abandoned
        branch of a run rolled back); the readable one of the highest iteration only when
        the named file is missing or unreadable."""
        pointed = read_last_checkpoint(self.save_dir)
        if pointed is None:
            return ""
        others = sorted(os.path.join(self.save_dir, n) for n in os.listdir(self.save_dir)
                        if n.endswith(".pth") and os.path.join(self.save_dir, n) != pointed)
        found = newest_readable_checkpoint([pointed] + others, "iteration", pointed, log=self.logger.warning)
        if found is None:
            raise CheckpointError(f"--resume: no readable checkpoint in {self.save_dir} "
                                  f"({LAST_CHECKPOINT_FILE} names {pointed})")
        return found[0]

    def save(self, name: str, **kwargs: Any) -> None:
        """Like fvcore's save, but written to a temporary file and renamed into place."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.classes is not None:
            data["classes"] = list(self.classes)
        recorded = backbone_record(self.model)
        if recorded is not None:
            data["config"] = {"model": recorded}
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        save_atomic(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_last_checkpoint(self.save_dir, last_filename_basename)


def backbone_record(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    """``{"name": preset, "kwargs": size}`` of the model's RevColV2 backbone, as our
    training tools record a model in a checkpoint's ``config``; None without one."""
    for module in model.modules():
        variant = getattr(module, "variant", None)
        net = getattr(module, "net", None)
        if isinstance(net, RevColV2) and isinstance(variant, str):
            return {"name": variant, "kwargs": net_size(net)}
    return None


def _model_zoo_pickle(data: Any, filename: str) -> Dict[str, Any]:
    """A ``.pkl`` as detectron2 reads it: detectron2 model-zoo format, or Caffe2 blobs."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{filename} holds a {type(data).__name__}, not a dict of weights")
    if "model" in data and "__author__" in data:
        return data
    data = data.get("blobs", data)
    return {"model": {k: v for k, v in data.items() if not k.endswith("_momentum")},
            "__author__": "Caffe2", "matching_heuristics": True}
