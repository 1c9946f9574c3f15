"""One rule for classes: a model predicts exactly its dataset's classes, and a checkpoint
is used only with the classes it was trained on.

- :func:`check_model_fits_dataset`: the model's class count (``roi_heads.num_classes``,
  ``sem_seg_head.num_classes``) equals the number of classes of the dataset it trains on or
  is evaluated on (``thing_classes`` / ``stuff_classes`` of its metadata); otherwise an
  error naming both numbers and the config key.
- The checkpointer (:class:`revcolv2_d2.checkpoint.RevColV2Checkpointer`) writes the class
  names of the training dataset into every checkpoint (``classes``) and refuses a
  checkpoint whose recorded names, or whose classifier's size
  (:func:`checkpoint_num_classes`), gives another class count than the model's.
- :func:`check_loaded_classes`: evaluation (``--eval-only``, the evaluation during
  training, ``--resume``) and ``tools/visualize.py`` refuse a detectron2 checkpoint whose
  recorded class names differ from the dataset's, showing both lists; a checkpoint without
  recorded names is accepted with a note. Initialising a new training run from a checkpoint
  of other classes (same count) only warns: its heads are trained anew.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog
from torch import nn

__all__ = ["ClassMismatchError", "model_num_classes", "dataset_name", "dataset_class_names",
           "check_model_fits_dataset", "check_training_classes", "checkpoint_num_classes", "compare_class_names",
           "check_loaded_classes"]

logger = logging.getLogger("detectron2").getChild(__name__)

# classifier tensors of this project's detectron2 models: (name pattern, rows - classes)
CLASSIFIER_TENSORS = (
    (re.compile(r"^roi_heads\.box_predictor(\.\d+)?\.cls_score\.weight$"), 1),  # K + background
    (re.compile(r"^sem_seg_head\.predictor\.weight$"), 0),  # UperNet
    (re.compile(r"^sem_seg_head\.class_predictor\.weight$"), 1),  # Mask2Former: K + no object
)


class ClassMismatchError(ValueError):
    """A model, dataset and checkpoint that disagree on the classes; the message names both
    sides."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) else model


def model_num_classes(model: nn.Module) -> Optional[Tuple[str, int]]:
    """(config key, class count) of a detectron2 model of this project; None for a model
    without ``roi_heads`` / ``sem_seg_head`` class counts."""
    model = _unwrap(model)
    for attr, key in (("roi_heads", "model.roi_heads.num_classes"), ("sem_seg_head", "model.sem_seg_head.num_classes")):
        part = getattr(model, attr, None)
        if part is not None and isinstance(getattr(part, "num_classes", None), int):
            return key, int(part.num_classes)
    return None


def is_semantic(model: nn.Module) -> bool:
    found = model_num_classes(model)
    return found is not None and found[0].startswith("model.sem_seg_head")


def dataset_name(names: Any) -> Optional[str]:
    """The first dataset of a loader's ``dataset.names`` (a name or a list of names)."""
    if isinstance(names, str):
        return names or None
    names = list(names or [])
    return str(names[0]) if names else None


def dataset_class_names(name: str, semantic: bool) -> Optional[List[str]]:
    """``stuff_classes`` (semantic segmentation) or ``thing_classes`` of a registered
    dataset's metadata; None when it holds none (yet: a COCO file registered with
    ``register_coco_instances`` sets them when it is loaded)."""
    names = MetadataCatalog.get(name).get("stuff_classes" if semantic else "thing_classes", None)
    return [str(n) for n in names] if names is not None else None


def _listed(names: Sequence[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_model_fits_dataset(model: nn.Module, name: Optional[str], custom: bool = False) -> Optional[List[str]]:
    """The dataset's class names, after checking that the model predicts as many classes
    (a :class:`ClassMismatchError` naming both numbers otherwise). None, with a note, when
    the model or the dataset tells no class count. ``custom``: the config computes the
    count from the data (then only an override can make it differ)."""
    found = model_num_classes(model)
    if found is None or name is None:
        return None
    key, count = found
    names = dataset_class_names(name, key.startswith("model.sem_seg_head"))
    if names is None:
        logger.info("dataset %s names no classes in its metadata: %s=%d is not checked against it", name, key, count)
        return None
    if len(names) != count:
        how = (f"remove the override of {key} (the config reads it from the data)" if custom
               else f"set {key}={len(names)}")
        raise ClassMismatchError(f"{key} is {count} but dataset {name} has {len(names)} classes "
                                 f"({_listed(names)}): the model must predict exactly the dataset's classes; {how}")
    return names


def check_training_classes(model: nn.Module, train_name: Optional[str], test_name: Optional[str] = None,
                           custom: bool = False) -> Optional[List[str]]:
    """The class names of the training dataset (what checkpoints record), after checking
    that the model predicts them (:func:`check_model_fits_dataset`) and that the evaluation
    dataset ``test_name``, when given and naming its classes, has the same ones."""
    names = check_model_fits_dataset(model, train_name, custom)
    test = check_model_fits_dataset(model, test_name, custom) if test_name else None
    if names is not None and test is not None and names != test:
        raise ClassMismatchError(compare_class_names(names, test, f"the model (on {train_name})", str(test_name))
                                 + ": the evaluation would name its predictions with the wrong classes")
    return names


def checkpoint_num_classes(sd: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """(tensor name, class count) read from the classifier of a detectron2 state dict of
    this project's models; None when it has none of them."""
    for key, value in sd.items():
        for pattern, extra in CLASSIFIER_TENSORS:
            if pattern.match(key) and hasattr(value, "shape") and len(value.shape) >= 1:
                return key, int(value.shape[0]) - extra
    return None


def compare_class_names(recorded: Sequence[str], names: Sequence[str], source: str, name: str) -> str:
    """'' when the lists are equal, else a message showing both lists (for long lists,
    the positions where they differ)."""
    recorded, names = [str(n) for n in recorded], [str(n) for n in names]
    if recorded == names:
        return ""
    head = (f"{source} was trained on {len(recorded)} classes that differ from the {len(names)} classes of "
            f"dataset {name}")
    if max(len(recorded), len(names)) <= 30:
        return f"{head}: checkpoint [{', '.join(recorded)}] vs dataset [{', '.join(names)}]"
    diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(recorded, names)) if a != b]
    extra = (f"; only in the checkpoint: {recorded[len(names):][:10]}" if len(recorded) > len(names) else
             f"; only in the dataset: {names[len(recorded):][:10]}" if len(names) > len(recorded) else "")
    return (f"{head}: {len(diff)} position(s) differ (checkpoint vs dataset) {'; '.join(diff[:10])}"
            f"{' ...' if len(diff) > 10 else ''}{extra}")


def check_loaded_classes(checkpointer: Any, names: Optional[Sequence[str]], name: Optional[str],
                         refuse: bool = True) -> None:
    """After ``checkpointer`` loaded a file: refuse (``refuse``) or warn about a detectron2
    checkpoint whose recorded class names are not the dataset's ``names``; note one without
    recorded names. RevColV2 MIM / classification checkpoints carry no detectron2 head and
    are not checked."""
    source = getattr(checkpointer, "loaded_from", None)
    if source is None or not getattr(checkpointer, "loaded_detectron2", False) or names is None:
        return
    recorded = getattr(checkpointer, "loaded_classes", None)
    if recorded is None:
        logger.warning("%s records no class names (written before they were recorded, or not by this project): "
                       "not checked against the %d classes of %s (%s)", source, len(names), name, _listed(list(names)))
        return
    problem = compare_class_names(recorded, names, source, str(name))
    if not problem:
        logger.info("%s was trained on the classes of %s (%d)", source, name, len(names))
        return
    if refuse:
        raise ClassMismatchError(problem + ": its predictions would be named with the wrong classes")
    logger.warning("%s; this training run starts its heads from them and trains them on %s", problem, name)
