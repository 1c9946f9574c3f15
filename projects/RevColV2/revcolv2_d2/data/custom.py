"""Your own data: a COCO-format instance dataset or folders of images and label PNGs,
registered from paths given on the command line, with the class count read from the data.

The configs in ``projects/RevColV2/configs/custom/`` hold a ``dataset`` node, a LazyCall of
:func:`register_coco_format` or :func:`register_sem_seg_folders`, whose path fields are set
by command-line overrides::

    python tools/lazyconfig_train_net.py \\
        --config-file projects/RevColV2/configs/custom/mask_rcnn_revcolv2_b_coco_format.py \\
        dataset.train_json=/data/x/train.json dataset.train_images=/data/x/train \\
        dataset.val_json=/data/x/val.json dataset.val_images=/data/x/val

The entry points (``tools/lazyconfig_train_net.py``, ``tools/visualize.py``,
``tools/export.py``) call :func:`register_config_datasets` before they build anything, which
registers ``<name>_train`` and ``<name>_val`` through detectron2's own functions
(``load_coco_json`` behind ``register_coco_instances``, ``load_sem_seg``); the loaders and
the evaluator of the config name them. The number of classes is a LazyCall too
(:func:`coco_num_classes`, :func:`sem_seg_num_classes`) that reads the categories of the
annotation files or the class list when the model is built, so it follows the data.

Checks (each error names the file): the annotation files (``validate_coco_instances_json``);
the train and val splits have the same categories; every image a split lists exists on
disk; for label PNGs, every image has a label of the same name and vice versa; each label
fits its image and holds class indices or the ignore value (``SemSegDatasetMapper``).
Category ids need not be 1..N: ``load_coco_json`` maps them to 0..N-1 in id order (and the
evaluator maps them back), as detectron2 does for any COCO file.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.utils.file_io import PathManager

from .coco_checks import CocoInputError, register_checked_coco_instances

__all__ = [
    "CustomDatasetError",
    "coco_categories",
    "coco_class_names",
    "coco_num_classes",
    "register_coco_format",
    "read_class_names",
    "sem_seg_num_classes",
    "register_sem_seg_folders",
    "register_config_datasets",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


class CustomDatasetError(ValueError):
    """A custom dataset that cannot be registered or loaded as given; the message names the
    file or the command-line override to set."""


# --------------------------------------------------------------------------- COCO format
_CATEGORIES: Dict[Tuple[str, float, int], List[Dict[str, Any]]] = {}


def coco_categories(json_file: str) -> List[Dict[str, Any]]:
    """The ``categories`` of a COCO annotation file, sorted by id (the order in which
    ``load_coco_json`` numbers them 0..N-1). Read once per file version."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    key = (os.path.abspath(json_file), os.path.getmtime(json_file), os.path.getsize(json_file))
    if key not in _CATEGORIES:
        try:
            with open(json_file, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CocoInputError(f"COCO annotation file {json_file} is not valid JSON: {e}") from e
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not cats or not all(isinstance(c, dict) and "id" in c and "name" in c
                                                             for c in cats):
            raise CocoInputError(f"COCO annotation file {json_file}: 'categories' must be a non-empty list of "
                                 "objects with 'id' and 'name'")
        _CATEGORIES[key] = sorted(cats, key=lambda c: c["id"])
    return _CATEGORIES[key]


def coco_class_names(*json_files: str) -> List[str]:
    """The class names (categories by id) of the given annotation files ("" entries are
    skipped), which must agree: a model trained on one split and evaluated on another
    compares class *indices*."""
    given = [f for f in json_files if f]
    if not given:
        raise CustomDatasetError("no COCO annotation file given: set dataset.train_json=PATH (and "
                                 "dataset.val_json=PATH) on the command line")
    first = [(c["id"], c["name"]) for c in coco_categories(given[0])]
    for other in given[1:]:
        cats = [(c["id"], c["name"]) for c in coco_categories(other)]
        if cats != first:
            raise CustomDatasetError(
                f"the categories of {given[0]} and {other} differ: {_show(first)} vs {_show(cats)}; "
                "both splits need the same category ids and names")
    return [name for _, name in first]


def _show(cats: Sequence[Tuple[int, str]], limit: int = 12) -> str:
    shown = ", ".join(f"{i}:{n}" for i, n in cats[:limit])
    return f"[{shown}{', ...' if len(cats) > limit else ''}] ({len(cats)} categories)"


def coco_num_classes(train_json: str = "", val_json: str = "") -> int:
    """The number of categories of the dataset (the files given must agree): what a config
    sets ``model.roi_heads.num_classes`` to, as a LazyCall."""
    return len(coco_class_names(train_json, val_json))


def _missing_split(name: str, split: str, fields: Sequence[str]) -> None:
    overrides = " ".join(f"dataset.{split}_{f}=..." for f in fields)
    raise CustomDatasetError(f"dataset {name}_{split} has no data: set {overrides} on the command line")


def _checked_pair(split: str, paths: Dict[str, str], what: Dict[str, str]) -> bool:
    """Whether the split is given (every path set); one set without the other is an error
    naming the override that is missing."""
    given = {k: v for k, v in paths.items() if v}
    if given and len(given) < len(paths):
        missing = [f"dataset.{split}_{k}" for k in paths if not paths[k]]
        raise CustomDatasetError(f"{', '.join(missing)} not set, but "
                                 f"{', '.join(f'dataset.{split}_{k}' for k in given)} is: the {split} split "
                                 f"needs {' and '.join(what[k] for k in paths)}")
    for key, path in given.items():
        kind = what[key]
        exists = os.path.isdir(path) if "folder" in kind else os.path.isfile(path)
        if not exists:
            raise CustomDatasetError(f"dataset.{split}_{key}={path}: no such {kind}")
    return bool(given)


def _register_unset(name: str, split: str, fields: Sequence[str]) -> None:
    """Register a split the command line did not give, whose loading says which overrides
    to set (instead of detectron2's 'not registered' and its list of every dataset)."""
    full = f"{name}_{split}"
    if full in DatasetCatalog.list():
        DatasetCatalog.remove(full)
        MetadataCatalog.remove(full)
    DatasetCatalog.register(full, lambda: _missing_split(name, split, fields))


def register_coco_format(name: str = "custom", train_json: str = "", train_images: str = "",
                         val_json: str = "", val_images: str = "") -> Dict[str, str]:
    """Register ``<name>_train`` and ``<name>_val`` from COCO instance annotation files
    and their image folders (detectron2's ``load_coco_json``, via
    :func:`~revcolv2_d2.data.coco_checks.register_checked_coco_instances`).

    The metadata (``thing_classes``, the id mapping, ``evaluator_type`` coco) is set at once,
    so the class names are known before the data is loaded. Loading a split validates its
    annotation file and checks that every image it lists exists (an error counts the
    missing ones and names the first). A split whose paths are not given is registered too:
    loading it is an error naming the overrides to set. Idempotent; returns
    ``{split: dataset name}``.
    """
    files = {"train": (train_json, train_images), "val": (val_json, val_images)}
    given = {}
    for split, (json_file, images) in files.items():
        if _checked_pair(split, {"json": json_file, "images": images},
                         {"json": "COCO annotation file", "images": "image folder"}):
            given[split] = (json_file, images)
    if not given:
        raise CustomDatasetError("no data given: set dataset.train_json=FILE dataset.train_images=FOLDER "
                                 "(training) and/or dataset.val_json=FILE dataset.val_images=FOLDER "
                                 "(evaluation) on the command line")
    names = coco_class_names(*(j for j, _ in given.values()))  # the splits' categories agree
    ids = [c["id"] for c in coco_categories(next(iter(given.values()))[0])]
    for split in SPLITS:
        full = f"{name}_{split}"
        if split not in given:
            _register_unset(name, split, ("json", "images"))
            continue
        json_file, images = given[split]
        register_checked_coco_instances(full, {}, json_file, images)
        _check_images_on_load(full, json_file, images)
        MetadataCatalog.get(full).set(thing_classes=list(names),
                                      thing_dataset_id_to_contiguous_id={i: k for k, i in enumerate(ids)})
    return {split: f"{name}_{split}" for split in SPLITS}


def _check_images_on_load(name: str, json_file: str, image_root: str) -> None:
    """Wrap the registered loader: every image of the loaded records must exist."""
    original = DatasetCatalog[name]

    def load():
        records = original()
        missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
        if missing:
            raise CustomDatasetError(
                f"{len(missing)} of the {len(records)} images listed in {json_file} are missing under "
                f"{image_root}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (each image's "
                "'file_name' is relative to the image folder)")
        return records

    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)


# --------------------------------------------------------------------------- label PNGs
def read_class_names(classes: Union[str, Sequence[str]]) -> List[str]:
    """A class list: the names themselves, or a text file with one name a line (blank lines
    and lines starting with ``#`` skipped). Label value ``i`` is class ``names[i]``."""
    if isinstance(classes, str):
        if not classes:
            raise CustomDatasetError("no class list given: set dataset.classes=FILE (one class name a line, "
                                     "label value i = line i) or dataset.classes=[name0,name1,...]")
        if not os.path.isfile(classes):
            raise CustomDatasetError(f"dataset.classes={classes}: no such file (a text file with one class "
                                     "name a line, or a list [name0,name1,...])")
        with open(classes, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
        if not names:
            raise CustomDatasetError(f"class list {classes} holds no class name")
        return names
    names = [str(c) for c in classes]
    if not names:
        raise CustomDatasetError("dataset.classes is empty: give the class names, label value i = name i")
    return names


def sem_seg_num_classes(classes: Union[str, Sequence[str]]) -> int:
    """The number of classes of a class list (see :func:`read_class_names`): what a config
    sets ``model.sem_seg_head.num_classes`` and the mappers' ``num_classes`` to."""
    return len(read_class_names(classes))


def _file_ids(folder: str, ext: str) -> Dict[str, str]:
    """{name without extension: path} of the files in ``folder`` ending in ``ext``, as
    ``load_sem_seg`` lists them (not recursive)."""
    return {f[: -len(ext)]: os.path.join(folder, f) for f in PathManager.ls(folder) if f.endswith(ext)}


def _load_sem_seg_checked(images: str, labels: str, image_ext: str, label_ext: str) -> List[dict]:
    """detectron2's ``load_sem_seg``, after checking that images and labels pair up by name.
    (``load_sem_seg`` keeps the names both folders share only when their file counts differ;
    with equal counts it pairs the sorted lists by position.)"""
    image_ids, label_ids = _file_ids(images, image_ext), _file_ids(labels, label_ext)
    if not image_ids:
        raise CustomDatasetError(f"no '*{image_ext}' image in {images} (set dataset.image_ext for other files)")
    no_label = sorted(set(image_ids) - set(label_ids))
    no_image = sorted(set(label_ids) - set(image_ids))
    if no_label or no_image:
        parts = []
        if no_label:
            parts.append(f"{len(no_label)} image(s) without a label '*{label_ext}' in {labels} (e.g. "
                         f"{image_ids[no_label[0]]})")
        if no_image:
            parts.append(f"{len(no_image)} label(s) without an image '*{image_ext}' in {images} (e.g. "
                         f"{label_ids[no_image[0]]})")
        raise CustomDatasetError("; ".join(parts) + ": every image needs a label PNG of the same name")
    return load_sem_seg(labels, images, gt_ext=label_ext, image_ext=image_ext)


def register_sem_seg_folders(name: str = "custom", train_images: str = "", train_labels: str = "",
                             val_images: str = "", val_labels: str = "", classes: Union[str, Sequence[str]] = "",
                             ignore_label: int = 255, image_ext: str = ".jpg", label_ext: str = ".png"
                             ) -> Dict[str, str]:
    """Register ``<name>_train`` and ``<name>_val`` from an image folder and a folder of
    label PNGs each (``load_sem_seg``: files matched by name, not recursive).

    Labels hold class indices 0..K-1 (K = the class list's length) and ``ignore_label``
    for pixels that count nowhere. Metadata: ``stuff_classes``, ``ignore_label``,
    ``evaluator_type`` sem_seg, as detectron2 registers ADE20K. Idempotent; returns
    ``{split: dataset name}``.
    """
    class_names = read_class_names(classes)
    if not 0 <= int(ignore_label) <= 255 or int(ignore_label) < len(class_names):
        raise CustomDatasetError(f"dataset.ignore_label={ignore_label}: must be in {len(class_names)}..255, above "
                                 f"the {len(class_names)} class indices (label PNGs are 8-bit)")
    folders = {"train": (train_images, train_labels), "val": (val_images, val_labels)}
    given = {split: pair for split, pair in folders.items()
             if _checked_pair(split, {"images": pair[0], "labels": pair[1]},
                              {"images": "image folder", "labels": "label folder"})}
    if not given:
        raise CustomDatasetError("no data given: set dataset.train_images=FOLDER dataset.train_labels=FOLDER "
                                 "(training) and/or dataset.val_images=FOLDER dataset.val_labels=FOLDER "
                                 "(evaluation) on the command line")
    for split in SPLITS:
        full = f"{name}_{split}"
        if split not in given:
            _register_unset(name, split, ("images", "labels"))
            continue
        images, labels = given[split]
        if full in DatasetCatalog.list():
            DatasetCatalog.remove(full)
            MetadataCatalog.remove(full)
        DatasetCatalog.register(full, lambda i=images, l=labels: _load_sem_seg_checked(i, l, image_ext, label_ext))
        MetadataCatalog.get(full).set(stuff_classes=list(class_names), ignore_label=int(ignore_label),
                                      evaluator_type="sem_seg", image_root=images, sem_seg_root=labels)
    return {split: f"{name}_{split}" for split in SPLITS}


# --------------------------------------------------------------------------- entry points
def register_config_datasets(cfg) -> Dict[str, str]:
    """Register the datasets of a config's ``dataset`` node (a LazyCall of a ``register_*``
    function of this module), if it has one; returns ``{split: name}`` ({} without one).
    Every entry point calls this before it builds loaders, models or evaluators; do the same
    in a script of your own (``instantiate(cfg.dataset)``)."""
    from detectron2.config import instantiate

    node = cfg.get("dataset", None) if hasattr(cfg, "get") else None
    if node is None or not hasattr(node, "get") or "_target_" not in node:
        return {}
    return dict(instantiate(node))
