"""COCO-format inputs checked up front, so a broken file fails with its name in the error.

detectron2's own loaders fail late and vaguely on bad input (a ``JSONDecodeError`` without
the file, a ``KeyError`` on an unknown category id, a PIL error deep in a dataloader
worker). These helpers wrap them:

- :func:`validate_coco_instances_json`: the annotation file exists, is JSON, has the COCO
  instance keys, and every annotation's ``category_id`` / ``image_id`` is declared.
- :func:`register_checked_coco_instances`: detectron2's ``register_coco_instances`` with
  that validation run when the dataset is first loaded.
- :class:`CheckedDatasetMapper`: detectron2's ``DatasetMapper`` that names a missing or
  unreadable image file.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import read_image

__all__ = [
    "CocoInputError",
    "validate_coco_instances_json",
    "register_checked_coco_instances",
    "CheckedDatasetMapper",
]


class CocoInputError(ValueError):
    """A COCO annotation file or image that cannot be used; the message names it."""


def validate_coco_instances_json(json_file: str) -> Dict[str, Any]:
    """Parse and check a COCO instances file; return its content.

    Raises ``FileNotFoundError`` (missing file) or :class:`CocoInputError` (not JSON, not
    COCO instances, an annotation whose category or image id is not declared), each
    naming ``json_file`` and the offending id.
    """
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO annotation file not found: {json_file}")
    try:
        with open(json_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoInputError(f"COCO annotation file {json_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CocoInputError(f"COCO annotation file {json_file} holds a {type(data).__name__}, not an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise CocoInputError(f"COCO annotation file {json_file} lacks the key(s) {missing}")
    category_ids = {c.get("id") for c in data["categories"]}
    image_ids = {im.get("id") for im in data["images"]}
    for ann in data["annotations"]:
        cid = ann.get("category_id")
        if cid not in category_ids:
            raise CocoInputError(
                f"COCO annotation file {json_file}: annotation id {ann.get('id')} has category_id "
                f"{cid}, which is not in the 'categories' list (ids {sorted(category_ids)})"
            )
        if ann.get("image_id") not in image_ids:
            raise CocoInputError(
                f"COCO annotation file {json_file}: annotation id {ann.get('id')} refers to "
                f"image_id {ann.get('image_id')}, which is not in the 'images' list"
            )
    return data


def register_checked_coco_instances(
    name: str,
    metadata: Dict[str, Any],
    json_file: str,
    image_root: str,
    before_load: Optional[Callable[[], None]] = None,
) -> None:
    """Register a COCO instances dataset whose annotation file is validated on first load.

    ``before_load`` runs first (e.g. to generate a built-in dataset that is missing).
    Re-registering a name replaces it, so the call is idempotent.
    """

    def load():
        if before_load is not None:
            before_load()
        validate_coco_instances_json(json_file)
        return load_coco_json(json_file, image_root, name)

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **metadata
    )


class CheckedDatasetMapper(DatasetMapper):
    """``DatasetMapper`` whose errors for a missing or unreadable image name the file."""

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        file_name = dataset_dict.get("file_name")
        if file_name is not None and not os.path.isfile(file_name):
            raise FileNotFoundError(
                f"image file not found: {file_name} (image_id {dataset_dict.get('image_id')})"
            )
        try:
            return super().__call__(dataset_dict)
        except Exception as e:
            # name the file when the image itself is the problem; otherwise keep the error
            if file_name is None or _image_readable(file_name, self.image_format):
                raise
            raise CocoInputError(f"cannot read image file {file_name}: {type(e).__name__}: {e}") from e


def _image_readable(file_name: str, image_format: str) -> bool:
    try:
        read_image(file_name, format=image_format)
        return True
    except Exception:
        return False
