"""COCO-format inputs checked up front, so a broken file fails with its name in the error.

detectron2's own loaders fail late and vaguely on bad input (a ``JSONDecodeError`` without
the file, a ``KeyError`` on an unknown category id, a PIL error deep in a dataloader
worker). These helpers wrap them:

- :func:`validate_coco_instances_json`: the annotation file exists, is JSON, has the COCO
  instance keys, its image, category and annotation ids are unique, every annotation's
  ``category_id`` / ``image_id`` is declared, it has a box of four finite numbers with no
  negative size, its ``area`` (when it has one) is a finite number that is not negative,
  and its segmentation (when it has one) is a non-empty list of polygons (lists of
  numbers) or an RLE of its image's size. Zero-width or zero-height boxes and
  zero areas are counted and warned about (detectron2 drops such boxes when mapping; COCO
  evaluation counts an area of 0 as a small object). Category ids need not be 1..N:
  detectron2's ``load_coco_json`` maps them to 0..N-1 in id order and its evaluator maps
  them back.
- :func:`register_checked_coco_instances`: detectron2's ``register_coco_instances`` with
  that validation run when the dataset is first loaded.
- :func:`check_registered_coco_datasets`: the same validation for every COCO-format
  dataset registered by name (``coco_2017_*`` and the rest of detectron2's built-ins), run
  in the main process when the dataset is loaded, before training starts.
- :class:`CheckedDatasetMapper`: detectron2's ``DatasetMapper`` that names a missing or
  unreadable image file.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable, Dict, Optional

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import read_image

__all__ = [
    "CocoInputError",
    "validate_coco_instances_json",
    "register_checked_coco_instances",
    "check_registered_coco_datasets",
    "CheckedDatasetMapper",
]

logger = logging.getLogger(__name__)


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
    for key, what in (("images", "image"), ("categories", "category"), ("annotations", "annotation")):
        _check_unique_ids(json_file, data[key], key, what)
    category_ids = {c.get("id") for c in data["categories"]}
    images = {im.get("id"): im for im in data["images"]}
    image_ids = set(images)
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
        _check_segmentation(json_file, ann, images[ann.get("image_id")])
    degenerate = [ann.get("id") for ann in data["annotations"] if _box_is_degenerate(json_file, ann)]
    _warn_count(json_file, degenerate, "a zero-width or zero-height box", "they are ignored in training")
    no_area = [ann.get("id") for ann in data["annotations"] if _area_is_zero(json_file, ann)]
    _warn_count(json_file, no_area, "area 0", "COCO evaluation counts them as small objects")
    return data


def _warn_count(json_file: str, ids, what: str, consequence: str) -> None:
    if ids:
        logger.warning("COCO annotation file %s: %d annotation(s) with %s (ids %s%s); %s", json_file, len(ids), what,
                       ids[:10], " ..." if len(ids) > 10 else "", consequence)


def _check_unique_ids(json_file: str, entries: Any, key: str, what: str) -> None:
    """``entries`` (the file's ``key`` list) are objects with distinct ``id`` values. Two
    images with one id would make detectron2 (pycocotools) keep one of them and attach the
    other's annotations to it."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CocoInputError(f"COCO annotation file {json_file}: '{key}' must be a list of objects")
    seen, repeated = set(), []
    for entry in entries:
        i = entry.get("id")
        if i in seen and i not in repeated:
            repeated.append(i)
        seen.add(i)
    if repeated:
        raise CocoInputError(
            f"COCO annotation file {json_file}: {what} id {repeated[0]!r} appears more than once in '{key}'"
            + (f" (and {len(repeated) - 1} other id(s): {repeated[1:6]})" if len(repeated) > 1 else "")
            + f"; every {what} needs its own id")


def _area_is_zero(json_file: str, ann: Dict[str, Any]) -> bool:
    """Whether ``ann``'s ``area`` is 0; a non-numeric, non-finite or negative area is a
    :class:`CocoInputError` naming the annotation."""
    if "area" not in ann:
        return False
    area = ann["area"]
    if not isinstance(area, (int, float)) or isinstance(area, bool) or not math.isfinite(area) or area < 0:
        raise CocoInputError(f"COCO annotation file {json_file}: annotation id {ann.get('id')} has area {area!r}; "
                             "expected a number >= 0 (the object's pixel area)")
    return area == 0


def _box_is_degenerate(json_file: str, ann: Dict[str, Any]) -> bool:
    """Whether ``ann``'s box has zero width or height; a missing, malformed, non-finite or
    negative-size box is a :class:`CocoInputError` naming the annotation."""
    if "bbox" not in ann:
        # detectron2 derives no box from the mask: its mapper fails on the first image with
        # such an annotation with a bare KeyError: 'bbox'
        raise CocoInputError(f"COCO annotation file {json_file}: annotation id {ann.get('id')} has no bbox; "
                             "detectron2 needs [x, y, width, height] for every annotation (it does not derive one "
                             "from the segmentation)")
    box = ann["bbox"]
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise CocoInputError(f"COCO annotation file {json_file}: annotation id {ann.get('id')} has bbox {box!r}; "
                             "expected [x, y, width, height], four finite numbers")
    if box[2] < 0 or box[3] < 0:
        raise CocoInputError(f"COCO annotation file {json_file}: annotation id {ann.get('id')} has bbox {box} "
                             "with a negative width or height")
    return box[2] == 0 or box[3] == 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finite_numbers(values: list) -> bool:
    """Whether ``values`` holds only finite numbers (a C-level sum, fast on COCO's millions
    of coordinates: a string or None raises, NaN or infinity sums to a non-finite value)."""
    try:
        return math.isfinite(math.fsum(values))
    except (TypeError, OverflowError):
        return False


def _check_segmentation(json_file: str, ann: Dict[str, Any], image: Dict[str, Any]) -> None:
    """A present segmentation must be one detectron2 can use; each case below otherwise
    fails later, naming neither the file nor the annotation:

    - empty: detectron2 drops it from its annotation, and an image whose first annotation
      has no mask then fails in a loader worker with ``AttributeError: gt_masks``;
    - polygons: a list of polygons, each a list of numbers. One flat list ``[x1, y1, ...]``
      makes detectron2's loader fail with a bare ``TypeError``. (Polygons with fewer than 3
      points or an odd number of coordinates are dropped by detectron2 with a warning; COCO
      itself has a few.)
    - RLE: ``counts`` and ``size``; ``size`` must be [height, width] of its image (the
      mapper asserts it, a bare ``AssertionError``), and uncompressed ``counts`` (a list)
      must cover that many pixels.
    """
    if "segmentation" not in ann:
        return
    segm = ann["segmentation"]
    where = f"COCO annotation file {json_file}: annotation id {ann.get('id')}"
    if not segm:
        raise CocoInputError(f"{where} has an empty segmentation ({segm!r}); give it a polygon or RLE, "
                             "or remove the 'segmentation' key")
    if isinstance(segm, dict):
        _check_rle(where, segm, image)
    elif isinstance(segm, list):
        if all(_is_number(v) for v in segm):
            raise CocoInputError(f"{where} has its polygon as one flat list [x1, y1, ...]; COCO polygons are a list "
                                 "of polygons: write [[x1, y1, x2, y2, ...]]")
        for i, polygon in enumerate(segm):
            if not isinstance(polygon, list) or not _finite_numbers(polygon):
                raise CocoInputError(f"{where} has {str(polygon)[:80]} as polygon {i} of its segmentation; each "
                                     "polygon is a list of finite numbers [x1, y1, x2, y2, ...]")
    else:
        raise CocoInputError(f"{where} has a segmentation of type {type(segm).__name__}; "
                             "expected a list of polygons or an RLE dict")


def _check_rle(where: str, segm: Dict[str, Any], image: Dict[str, Any]) -> None:
    if "counts" not in segm or "size" not in segm:
        raise CocoInputError(f"{where} has an RLE segmentation without 'counts' and 'size'")
    size = segm["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise CocoInputError(f"{where} has an RLE size {size!r}; expected [height, width], two positive integers")
    height, width = image.get("height"), image.get("width")
    if isinstance(height, int) and isinstance(width, int) and size != [height, width]:
        raise CocoInputError(f"{where} has an RLE size {size} but its image id {image.get('id')} is {height} x "
                             f"{width} (height x width): the mask must be the image's size")
    counts = segm["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            raise CocoInputError(f"{where} has uncompressed RLE counts that are not all non-negative integers")
        if sum(counts) != size[0] * size[1]:
            raise CocoInputError(f"{where} has uncompressed RLE counts summing to {sum(counts)} pixels; its size "
                                 f"{size} has {size[0] * size[1]}")
    elif not isinstance(counts, str):
        raise CocoInputError(f"{where} has RLE counts of type {type(counts).__name__}; expected a string "
                             "(compressed) or a list of run lengths")


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
        json_file=json_file, image_root=image_root, evaluator_type="coco", coco_checked=True, **metadata
    )


def check_registered_coco_datasets() -> list:
    """Validate every registered COCO-format dataset (``evaluator_type == "coco"`` with a
    ``json_file``: detectron2's ``coco_2017_*`` and the like) with
    :func:`validate_coco_instances_json` when it is loaded. Idempotent; returns the names
    wrapped by this call."""
    wrapped = []
    for name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        json_file = meta.get("json_file", None)
        if meta.get("evaluator_type", None) != "coco" or not json_file or meta.get("coco_checked", False):
            continue
        original = DatasetCatalog[name]

        def load(original=original, json_file=json_file):
            validate_coco_instances_json(json_file)
            return original()

        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, load)
        meta.set(coco_checked=True)
        wrapped.append(name)
    return wrapped


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
