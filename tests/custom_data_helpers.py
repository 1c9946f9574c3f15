"""Datasets "of your own", written at test time: a COCO-format instance dataset (JSON + image
folder, category ids that are not 1..K) and a semantic-segmentation dataset (image folder,
label-PNG folder, class list), both small enough to train a tiny model for two iterations."""
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
from PIL import Image

# non-contiguous ids on purpose: detectron2 maps them to 0..K-1 in id order
CATEGORIES = [{"id": 3, "name": "lamp"}, {"id": 7, "name": "chair"}, {"id": 12, "name": "plant"}]
COLOURS = {3: (230, 60, 40), 7: (40, 200, 60), 12: (50, 80, 230)}
SEM_CLASSES = ["floor", "wall", "window"]
SEM_COLOURS = [(150, 110, 70), (220, 220, 210), (90, 160, 240)]


def _shapes(rng: np.random.Generator, h: int, w: int, count: int) -> List[Tuple[int, List[float]]]:
    """``count`` non-overlapping axis-aligned rectangles: (category id, polygon)."""
    out = []
    cols = np.array_split(np.arange(w), count)
    for i in range(count):
        x0 = int(cols[i][0]) + 4
        x1 = int(cols[i][-1]) - 4
        y0 = int(rng.integers(4, h // 3))
        y1 = int(rng.integers(h // 2, h - 4))
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"]
        out.append((cat, [x0, y0, x1, y0, x1, y1, x0, y1]))
    return out


def write_coco_split(root: Path, split: str, num_images: int, seed: int, size=(96, 128)) -> Tuple[Path, Path]:
    """``root/<split>/*.jpg`` and ``root/<split>.json``: images with 1-3 coloured boxes,
    annotated as polygons."""
    rng = np.random.default_rng(seed)
    images_dir = root / split
    images_dir.mkdir(parents=True)
    h, w = size
    images, annotations = [], []
    for i in range(num_images):
        image = np.full((h, w, 3), 128, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        for cat, poly in _shapes(rng, h, w, 1 + i % 3):
            pts = np.array(poly, np.int32).reshape(-1, 2)
            cv2.fillPoly(image, [pts], COLOURS[cat])
            x0, y0, x1, y1 = pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "area": float((x1 - x0) * (y1 - y0)), "iscrowd": 0,
                                "segmentation": [[float(v) for v in poly]]})
        name = f"{split}_{i:03d}.jpg"
        Image.fromarray(image).save(images_dir / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    json_file = root / f"{split}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return json_file, images_dir


def write_coco_dataset(root: Path, num_train: int = 6, num_val: int = 3) -> Dict[str, str]:
    """Both splits; returns the ``dataset.*`` overrides of the custom COCO config."""
    train_json, train_images = write_coco_split(root, "train", num_train, seed=0)
    val_json, val_images = write_coco_split(root, "val", num_val, seed=1)
    return {"train_json": str(train_json), "train_images": str(train_images),
            "val_json": str(val_json), "val_images": str(val_images)}


def write_sem_seg_split(root: Path, split: str, num_images: int, seed: int, size=(72, 104)) -> Tuple[Path, Path]:
    """``root/images/<split>/*.jpg`` and ``root/labels/<split>/*.png``: floor below a
    horizon, wall above, a window in the wall; a 255 (ignore) strip on the horizon."""
    rng = np.random.default_rng(seed)
    images_dir, labels_dir = root / "images" / split, root / "labels" / split
    images_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    h, w = size
    for i in range(num_images):
        horizon = int(rng.integers(h // 3, 2 * h // 3))
        label = np.zeros((h, w), np.uint8)
        label[:horizon] = 1
        x0 = int(rng.integers(2, w // 2))
        label[4:horizon - 6, x0:x0 + w // 4] = 2
        label[horizon - 1:horizon + 1] = 255
        image = np.zeros((h, w, 3), np.uint8)
        for c, colour in enumerate(SEM_COLOURS):
            image[label == c] = colour
        image[label == 255] = (0, 0, 0)
        image = np.clip(image.astype(int) + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(images_dir / f"{i:04d}.jpg", quality=95)
        Image.fromarray(label, mode="L").save(labels_dir / f"{i:04d}.png")
    return images_dir, labels_dir


def write_sem_seg_dataset(root: Path, num_train: int = 4, num_val: int = 2) -> Dict[str, str]:
    """Both splits and a class list file; returns the ``dataset.*`` overrides of the custom
    semantic-segmentation config."""
    train_images, train_labels = write_sem_seg_split(root, "train", num_train, seed=0)
    val_images, val_labels = write_sem_seg_split(root, "val", num_val, seed=1)
    classes = root / "classes.txt"
    classes.write_text("# one class a line\n" + "\n".join(SEM_CLASSES) + "\n")
    return {"train_images": str(train_images), "train_labels": str(train_labels), "val_images": str(val_images),
            "val_labels": str(val_labels), "classes": str(classes)}


def overrides(fields: Dict[str, str]) -> List[str]:
    return [f"dataset.{k}={v}" for k, v in fields.items()]


def listdir(path) -> List[str]:
    return sorted(os.listdir(path))
