"""Synthetic shapes: a small COCO-format instance-segmentation dataset made on this machine.

COCO itself cannot be downloaded here, so the demo and the tests train on this one. It is
written in COCO's on-disk format (JPEG images + ``instances_*.json``) and read through the
same detectron2 code paths as COCO, with the cases a real dataset has:

- four categories (circle, square, triangle, ring), rotated, of random colour and size;
- images of varied sizes (width and height drawn independently);
- polygon masks (circle, square, triangle) and RLE masks (ring: a shape with a hole);
- some images without any object;
- a few ``iscrowd`` regions (a tight cluster of small circles, one RLE, ignored by COCO
  evaluation like COCO's crowd annotations).

Generation is seeded (identical files on every machine), written to a temporary folder and
renamed into place, and happens once, on first use, under ``$DETECTRON2_DATASETS``:

    synthetic_shapes/
      train/000000.jpg ...        val/...
      annotations/instances_train.json, instances_val.json
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util

from revcolv2.atomic_io import remove_stale_temporaries
from revcolv2.data import make_datasets_folder

from .coco_checks import CocoInputError, register_checked_coco_instances

__all__ = [
    "CATEGORIES",
    "SPLITS",
    "generate_split",
    "ensure_synthetic_shapes",
    "register_synthetic_shapes",
    "synthetic_shapes_paths",
]

GENERATOR_VERSION = 1  # bump when the drawing changes; older folders are regenerated

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ring", "supercategory": "shape"},
]
_CAT = {c["name"]: c["id"] for c in CATEGORIES}

# split -> (number of images, seed)
SPLITS: Dict[str, Tuple[int, int]] = {"train": (800, 0), "val": (100, 1)}

IMAGE_SIDE_RANGE = (192, 320)  # width and height drawn independently (pixels)
OBJECT_SIDE_RANGE = (0.14, 0.38)  # object diameter as a fraction of the shorter image side
MAX_OBJECTS = 4
EMPTY_FRACTION = 0.08  # images without any object
CROWD_FRACTION = 0.06  # images with one iscrowd region


def synthetic_shapes_paths(root: str, split: str) -> Tuple[str, str]:
    """(image folder, annotation file) of a split under ``root``."""
    base = os.path.join(root, "synthetic_shapes")
    return os.path.join(base, split), os.path.join(base, "annotations", f"instances_{split}.json")


# ---------------------------------------------------------------------------- drawing
def _regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> np.ndarray:
    t = angle + np.arange(sides) * 2 * math.pi / sides
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=1)  # (sides, 2)


def _fill(shape_hw: Tuple[int, int], polygon: np.ndarray) -> np.ndarray:
    """Rasterize one polygon (x, y vertices) to a uint8 {0, 1} mask."""
    m = np.zeros(shape_hw, np.uint8)
    cv2.fillPoly(m, [np.round(polygon).astype(np.int32)], 1)
    return m


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth two-colour gradient with mild noise, (H, W, 3) uint8."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xs * math.cos(angle) + ys * math.sin(angle))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255)


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least ~90 (L2 in RGB) away from the mean colour it is drawn over."""
    ref = under.reshape(-1, 3).mean(0)
    for _ in range(50):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - ref) > 90:
            return c
    return 255 - ref


def _encode_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _bbox(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]


def _draw_object(rng, h, w, occupied) -> Optional[Tuple[str, np.ndarray, object]]:
    """Place one non-overlapping shape. Returns (category, mask, segmentation) or None."""
    name = ("circle", "square", "triangle", "ring")[rng.integers(4)]
    short = min(h, w)
    for _ in range(30):
        r = 0.5 * short * rng.uniform(*OBJECT_SIDE_RANGE)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        angle = rng.uniform(0, 2 * math.pi)
        if name == "circle":
            poly = _regular_polygon(cx, cy, r, 32, angle)
        elif name == "square":
            poly = _regular_polygon(cx, cy, r, 4, angle)
        elif name == "triangle":
            poly = _regular_polygon(cx, cy, r, 3, angle)
        else:
            poly = _regular_polygon(cx, cy, r, 48, angle)
        mask = _fill((h, w), poly)
        if name == "ring":  # a hole: not a simple polygon, stored as RLE
            mask &= 1 - _fill((h, w), _regular_polygon(cx, cy, r * rng.uniform(0.45, 0.65), 48, angle))
        grown = cv2.dilate(mask, np.ones((5, 5), np.uint8))
        if (grown & occupied).any() or mask.sum() < 16:
            continue
        segm = _encode_rle(mask) if name == "ring" else [np.round(poly, 2).reshape(-1).tolist()]
        return name, mask, segm
    return None


def _draw_crowd(rng, h, w, occupied) -> Optional[np.ndarray]:
    """A tight cluster of small circles (one iscrowd region), or None if it does not fit."""
    for _ in range(30):
        side = rng.uniform(0.25, 0.35) * min(h, w)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(6, 11))):
            r = rng.uniform(3, 6)
            cx, cy = x0 + rng.uniform(r, side - r), y0 + rng.uniform(r, side - r)
            mask |= _fill((h, w), _regular_polygon(cx, cy, r, 16, 0.0))
        if not (cv2.dilate(mask, np.ones((5, 5), np.uint8)) & occupied).any():
            return mask
    return None


def _make_image(rng: np.random.Generator):
    """One image (H, W, 3) BGR uint8 and its list of (category, mask, segmentation, iscrowd)."""
    w, h = (int(v) for v in rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1] + 1, 2))
    img = _background(rng, h, w)
    occupied = np.zeros((h, w), np.uint8)
    objects = []
    if rng.random() >= EMPTY_FRACTION:
        for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
            drawn = _draw_object(rng, h, w, occupied)
            if drawn is None:
                continue
            name, mask, segm = drawn
            occupied |= mask
            objects.append((name, mask, segm, 0))
        if rng.random() < CROWD_FRACTION:
            crowd = _draw_crowd(rng, h, w, occupied)
            if crowd is not None:
                occupied |= crowd
                objects.append(("circle", crowd, _encode_rle(crowd), 1))
    for name, mask, _, _ in objects:
        img[mask.astype(bool)] = _contrasting_colour(rng, img[mask.astype(bool)])
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_split(image_dir: str, json_file: str, num_images: int, seed: int) -> None:
    """Write ``num_images`` images to ``image_dir`` and their COCO instances to ``json_file``."""
    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, objects = _make_image(rng)
        file_name = f"{image_id:06d}.jpg"
        cv2.imwrite(os.path.join(image_dir, file_name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": image_id, "file_name": file_name, "height": img.shape[0], "width": img.shape[1]})
        for name, mask, segm, iscrowd in objects:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": _CAT[name],
                "segmentation": segm,
                "area": float(mask.sum()),
                "bbox": _bbox(mask),
                "iscrowd": iscrowd,
            })
    content = {
        "info": {"description": DESCRIPTION, "version": GENERATOR_VERSION, "seed": seed},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w") as f:
        json.dump(content, f)


DESCRIPTION = "RevColV2 synthetic shapes"


def _is_current(json_file: str) -> bool:
    return _state(json_file) == "current"


def _state(json_file: str) -> str:
    """``current``, ``old`` (written by an earlier generator version), ``missing``, or
    ``foreign`` (unreadable, not JSON, or not written by this generator)."""
    if not os.path.exists(json_file):
        return "missing"
    try:
        with open(json_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError, AttributeError):
        return "foreign"
    if not isinstance(info, dict) or info.get("description") != DESCRIPTION:
        return "foreign"
    return "current" if info.get("version") == GENERATOR_VERSION else "old"


def ensure_synthetic_shapes(root: str, splits: Dict[str, Tuple[int, int]] = SPLITS) -> str:
    """Generate the dataset under ``root`` unless a current copy is there; return its folder.

    Built in a temporary sibling folder and renamed into place, so an interrupted run or a
    concurrent one never leaves a half-written dataset behind. An existing folder is never
    deleted: one from an older generator version is renamed aside
    (``synthetic_shapes.old``); anything else there (a malformed or foreign annotation
    file, a folder without our files) is reported, naming the file, and left alone.
    """
    base = os.path.join(root, "synthetic_shapes")
    if all(_is_current(synthetic_shapes_paths(root, s)[1]) for s in splits):
        return base
    _refuse_foreign(base, [synthetic_shapes_paths(root, s)[1] for s in splits])
    make_datasets_folder(root)
    remove_stale_temporaries(root, prefix=".synthetic_shapes_")  # what killed generations left behind
    tmp = tempfile.mkdtemp(prefix=f".synthetic_shapes_{os.getpid()}_", dir=root)
    try:
        for split, (n, seed) in splits.items():
            image_dir, json_file = synthetic_shapes_paths(tmp, split)
            generate_split(image_dir, json_file, n, seed)
        built = os.path.join(tmp, "synthetic_shapes")
        if all(_is_current(synthetic_shapes_paths(root, s)[1]) for s in splits):
            return base  # another process finished first
        if os.path.exists(base):
            _refuse_foreign(base, [synthetic_shapes_paths(root, s)[1] for s in splits])
            aside = _free_name(base + ".old")
            os.replace(base, aside)  # an older generator version: kept, not deleted
            print(f"synthetic_shapes: an older version was moved to {aside}; delete it when no longer needed")
        os.replace(built, base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base


def _refuse_foreign(base: str, json_files: List[str]) -> None:
    """Raise :class:`CocoInputError` unless ``base`` is absent or holds only our own files
    (current, older or not yet written annotation files)."""
    if not os.path.exists(base):
        return
    states = {f: _state(f) for f in json_files}
    bad = [f for f, st in states.items() if st == "foreign"]
    if bad:
        raise CocoInputError(
            f"{bad[0]} is not an annotation file of the built-in synthetic_shapes dataset (malformed JSON, "
            f"or written by something else). Nothing was deleted; fix or move {base} to regenerate it there."
        )
    if all(st == "missing" for st in states.values()) and os.listdir(base):
        raise CocoInputError(
            f"{base} exists but holds no synthetic_shapes annotation files ({', '.join(json_files)}). "
            "Nothing was deleted; move it away to have the dataset generated there."
        )


def _free_name(stem: str) -> str:
    name, i = stem, 1
    while os.path.exists(name):
        name, i = f"{stem}{i}", i + 1
    return name


def register_synthetic_shapes(root: str) -> None:
    """Register ``synthetic_shapes_train`` / ``synthetic_shapes_val`` (generated on first load)."""
    metadata = {"thing_classes": [c["name"] for c in CATEGORIES]}
    for split in SPLITS:
        image_dir, json_file = synthetic_shapes_paths(root, split)
        register_checked_coco_instances(
            f"synthetic_shapes_{split}", metadata, json_file, image_dir,
            before_load=lambda: ensure_synthetic_shapes(root),
        )
