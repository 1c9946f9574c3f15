"""``synthetic_ade_train`` / ``synthetic_ade_val``: a built-in semantic segmentation dataset
in ADE20K's on-disk layout, read by the same detectron2 code as ADE20K.

ADE20K itself (``ade20k_sem_seg_train`` / ``_val``) is registered by detectron2 from
``$DETECTRON2_DATASETS/ADEChallengeData2016``. It cannot be downloaded here, so demos and
tests use scenes generated on this machine:

    $DETECTRON2_DATASETS/synthetic_ade/
      images/training/000000.jpg ...              images/validation/...
      annotations_detectron2/training/000000.png  annotations_detectron2/validation/...

Each scene (96-208 px a side) has sky above a wavy horizon, textured ground below, and one
to three objects (disc, box, triangle, bar; 40-72% of the shorter side across), each class
with its own colour family (distinct hues, jittered saturation and brightness), so a small
model trained from scratch for a few CPU minutes can learn them.
Label PNGs hold class indices 0..5; 255 (ignored in loss and metrics, like ADE20K's
"other") marks a one-pixel band along every object outline and grey clutter blobs.
Generation is seeded and happens once, on first load, in a temporary folder renamed
into place.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from typing import Dict, Tuple

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from PIL import Image

from revcolv2.atomic_io import remove_stale_temporaries
from revcolv2.data import make_datasets_folder

from .ade20k import IGNORE_LABEL

__all__ = ["SYNTHETIC_ADE_CLASSES", "ensure_synthetic_ade", "make_scene", "register_synthetic_ade"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "3"  # bump when the drawing changes; older folders are regenerated
SYNTHETIC_ADE_CLASSES = ["sky", "ground", "disc", "box", "triangle", "bar"]
SYNTHETIC_ADE_COLORS = [[135, 190, 235], [140, 110, 70], [220, 40, 60], [170, 60, 200], [170, 220, 40], [40, 190, 200]]
# split -> (ADE20K folder name, number of images, seed)
SYNTHETIC_ADE_SPLITS: Dict[str, Tuple[str, int, int]] = {
    "train": ("training", 400, 0),
    "val": ("validation", 60, 1),
}
_WIDTH_RANGE, _HEIGHT_RANGE = (112, 208), (96, 176)
_OBJECT_RADIUS = (0.2, 0.36)  # fraction of the shorter image side
_MAX_OBJECTS = 3
# object colour families in OpenCV HSV (hue 0..180): (hue lo, hue hi, saturation lo, value lo)
_OBJECT_HSV = {"disc": (-8, 8, 150, 150), "box": (135, 160, 110, 120), "triangle": (40, 58, 150, 170),
               "bar": (82, 98, 120, 120)}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    px = np.uint8([[[int(h) % 180, int(np.clip(s, 0, 255)), int(np.clip(v, 0, 255))]]])
    return cv2.cvtColor(px, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1], (h, w)."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


def _object_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """uint8 {0, 1} mask of one object of ``kind`` at a random place, size and angle."""
    side = min(h, w)
    r = rng.uniform(*_OBJECT_RADIUS) * side
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    angle = rng.uniform(0, 2 * math.pi)
    mask = np.zeros((h, w), np.uint8)
    if kind == "disc":
        cv2.ellipse(mask, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.7, 1.0))),
                    math.degrees(angle), 0, 360, 1, -1)
        return mask
    if kind == "box":
        corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        half = [(r * a * 0.8, r * b * 0.8 * rng.uniform(0.7, 1.0)) for a, b in corners]
    elif kind == "triangle":
        half = [(r * math.cos(t), r * math.sin(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    else:  # bar: long and thin
        length, width = r * rng.uniform(1.1, 1.5), r * rng.uniform(0.25, 0.35)
        half = [(length, width), (-length, width), (-length, -width), (length, -width)]
    c, s = math.cos(angle), math.sin(angle)
    pts = np.array([(cx + x * c - y * s, cy + x * s + y * c) for x, y in half])
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def make_scene(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: (RGB uint8 image (H, W, 3), label uint8 (H, W) with 0..5 and 255)."""
    w, h = int(rng.integers(*_WIDTH_RANGE, endpoint=True)), int(rng.integers(*_HEIGHT_RANGE, endpoint=True))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.35, 0.6) + h * 0.06 * np.sin(xs[0] / w * rng.uniform(2, 8) + rng.uniform(0, 6))
    label = np.where(ys < horizon[None, :], 0, 1).astype(np.uint8)

    sky = _hsv_to_rgb(rng.uniform(95, 110), rng.uniform(40, 110), rng.uniform(190, 250))
    ground = _hsv_to_rgb(rng.uniform(8, 30), rng.uniform(60, 160), rng.uniform(70, 150))
    shade = (ys / h)[..., None]  # sky lightens and ground darkens towards the bottom
    image = np.where(label[..., None] == 0, sky * (0.85 + 0.25 * shade),
                     ground * (1.1 - 0.3 * shade) * (1 + 0.25 * _smooth_noise(rng, h, w, 12)[..., None]))

    ignore = np.zeros((h, w), bool)
    kinds = list(_OBJECT_HSV)
    for _ in range(int(rng.integers(1, _MAX_OBJECTS, endpoint=True))):
        kind = kinds[int(rng.integers(len(kinds)))]
        mask = _object_mask(rng, kind, h, w).astype(bool)
        hue_lo, hue_hi, sat_lo, val_lo = _OBJECT_HSV[kind]
        colour = _hsv_to_rgb(rng.uniform(hue_lo, hue_hi), rng.uniform(sat_lo, 255), rng.uniform(val_lo, 255))
        image[mask] = colour * (1 + 0.15 * _smooth_noise(rng, h, w, 6)[mask, None])
        label[mask] = SYNTHETIC_ADE_CLASSES.index(kind)
        ignore[mask] = False  # a later object covers earlier outlines
        kernel = np.ones((3, 3), np.uint8)
        m8 = mask.astype(np.uint8)
        ignore |= (cv2.dilate(m8, kernel) - cv2.erode(m8, kernel)).astype(bool)
    if rng.random() < 0.3:  # unlabelled clutter
        clutter = np.zeros((h, w), np.uint8)
        cv2.ellipse(clutter, (int(rng.uniform(0, w)), int(rng.uniform(0, h))),
                    (int(rng.uniform(5, 18)), int(rng.uniform(5, 18))), 0, 0, 360, 1, -1)
        clutter = clutter.astype(bool)
        image[clutter] = rng.uniform(90, 160) + 25 * rng.standard_normal((int(clutter.sum()), 1))
        ignore |= clutter
    label[ignore] = IGNORE_LABEL
    image = image + rng.normal(0, 6, image.shape)
    return image.clip(0, 255).astype(np.uint8), label


def synthetic_ade_paths(root: str, split: str) -> Tuple[str, str]:
    """(image folder, label folder) of a split under ``root``."""
    folder = SYNTHETIC_ADE_SPLITS[split][0]
    base = os.path.join(root, "synthetic_ade")
    return os.path.join(base, "images", folder), os.path.join(base, "annotations_detectron2", folder)


def _version_file(root: str) -> str:
    return os.path.join(root, "synthetic_ade", "VERSION")


def _is_current(root: str) -> bool:
    try:
        with open(_version_file(root)) as f:
            return f.read().strip() == GENERATOR_VERSION
    except OSError:
        return False


def ensure_synthetic_ade(root: str) -> str:
    """Generate ``<root>/synthetic_ade`` unless a current copy exists; return its folder."""
    base = os.path.join(root, "synthetic_ade")
    if _is_current(root):
        return base
    make_datasets_folder(root)
    remove_stale_temporaries(root, prefix=".synthetic_ade_")  # what killed generations left behind
    tmp = tempfile.mkdtemp(prefix=f".synthetic_ade_{os.getpid()}_", dir=root)
    try:
        for split, (_, num, seed) in SYNTHETIC_ADE_SPLITS.items():
            image_dir, label_dir = synthetic_ade_paths(tmp, split)
            os.makedirs(image_dir)
            os.makedirs(label_dir)
            rng = np.random.default_rng(seed)
            for i in range(num):
                image, label = make_scene(rng)
                cv2.imwrite(os.path.join(image_dir, f"{i:06d}.jpg"), image[:, :, ::-1],
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                Image.fromarray(label, mode="L").save(os.path.join(label_dir, f"{i:06d}.png"))
        with open(_version_file(tmp), "w") as f:
            f.write(GENERATOR_VERSION + "\n")
        if _is_current(root):
            return base  # another process finished first
        if os.path.exists(base):  # never deleted: an older version is moved aside, anything else reported
            if not os.path.isfile(_version_file(root)) and os.listdir(base):
                raise FileExistsError(f"{base} exists but was not written by this project (no {_version_file(root)}); "
                                      "nothing was deleted: move it away to have the dataset generated there")
            aside, i = base + ".old", 1
            while os.path.exists(aside):
                aside, i = f"{base}.old{i}", i + 1
            os.replace(base, aside)
            logger.warning("synthetic_ade: an older version was moved to %s; delete it when no longer needed", aside)
        os.replace(os.path.join(tmp, "synthetic_ade"), base)
        logger.info("Generated the synthetic ADE20K-layout dataset in %s", base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base


def register_synthetic_ade(root: str) -> None:
    """Register ``synthetic_ade_train`` / ``synthetic_ade_val`` (generated on first load).

    ADE20K itself is registered by detectron2 (``ade20k_sem_seg_*``); nothing to do here.
    """
    for split in SYNTHETIC_ADE_SPLITS:
        name = f"synthetic_ade_{split}"
        if name in DatasetCatalog.list():
            continue
        image_dir, label_dir = synthetic_ade_paths(root, split)

        def load(image_dir=image_dir, label_dir=label_dir):
            ensure_synthetic_ade(root)
            return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="jpg")

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            stuff_classes=list(SYNTHETIC_ADE_CLASSES),
            stuff_colors=[list(c) for c in SYNTHETIC_ADE_COLORS],
            image_root=image_dir,
            sem_seg_root=label_dir,
            evaluator_type="sem_seg",
            ignore_label=IGNORE_LABEL,
        )
