"""The built-in dataset used when no ``--data-path`` is given: about 10 classes of
procedurally drawn shapes and patterns over gradients or ``skimage.data`` photos,
generated once into ``<datasets>/synthetic_imagenet/{train,val}`` (an ImageNet-style layout
that :class:`revcolv2.data.RobustImageFolder` reads; ``<datasets>`` is
:func:`revcolv2.data.datasets_root`: ``$DETECTRON2_DATASETS``, else ``./datasets``)."""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .atomic_io import remove_stale_temporaries

logger = logging.getLogger(__name__)

SYNTHETIC_NAME = "synthetic_imagenet"  # its folder under the datasets root


# Classes that differ in local structure (edge orientation, periodicity, curvature), so a
# small ViT separates them within minutes; colours and placement are random.
SYNTHETIC_CLASSES: Tuple[str, ...] = (
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "polka_dots",
    "concentric_rings", "grid", "confetti", "disc", "triangle",
)
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry", "camera", "coins", "moon", "brick", "grass", "gravel")


def _photo_bank() -> List[np.ndarray]:
    import skimage.data

    bank = []
    for name in _PHOTOS:
        try:
            a = getattr(skimage.data, name)()
        except Exception:  # a photo that would need a download: do without it
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        bank.append(np.ascontiguousarray(a[..., :3]).astype(np.uint8))
    return bank


def _random_color(rng: random.Random, avoid: Optional[Tuple[int, int, int]] = None) -> Tuple[int, int, int]:
    while True:
        c = tuple(rng.randrange(256) for _ in range(3))
        if avoid is None or sum(abs(a - b) for a, b in zip(c, avoid)) > 200:
            return c


def _background(rng: random.Random, size: int, bank: Sequence[np.ndarray]) -> Image.Image:
    if bank and rng.random() < 0.5:
        photo = bank[rng.randrange(len(bank))]
        h, w = photo.shape[:2]
        s = rng.randint(min(h, w) // 3, min(h, w))
        y, x = rng.randrange(h - s + 1), rng.randrange(w - s + 1)
        img = Image.fromarray(photo[y:y + s, x:x + s]).resize((size, size), Image.BILINEAR)
        flat = Image.new("RGB", (size, size), _random_color(rng))
        return Image.blend(img, flat, 0.4)  # lower the contrast so the drawn class stays visible
    c0, c1 = np.array(_random_color(rng)), np.array(_random_color(rng))
    t = np.linspace(0, 1, size)[:, None, None]
    grad = (c0 * (1 - t) + c1 * t).astype(np.uint8).repeat(size, axis=1)
    img = Image.fromarray(grad)
    return img.rotate(rng.choice((0, 90, 180, 270)))


def _mean_color(img: Image.Image) -> Tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))


def _polygon(cx, cy, r, n, angle, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else r)
        a = angle + k * math.pi / (n if inner else n / 2)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_synthetic(label: int, size: int, rng: random.Random, bank: Sequence[np.ndarray]) -> Image.Image:
    """One image of class ``SYNTHETIC_CLASSES[label]``: random colours, placement, scale."""
    img = _background(rng, size, bank)
    fg = _random_color(rng, avoid=_mean_color(img))
    d = ImageDraw.Draw(img)
    name = SYNTHETIC_CLASSES[label]
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    period = rng.uniform(0.12, 0.22) * size
    off = rng.uniform(0, period)
    n = int(size / period) + 3
    if name in ("horizontal_stripes", "vertical_stripes"):
        for k in range(-1, n):
            a = off + k * period
            d.rectangle((0, a, size, a + period / 2) if name == "horizontal_stripes" else (a, 0, a + period / 2, size),
                        fill=fg)
    elif name == "diagonal_stripes":
        sign = rng.choice((-1, 1))  # 45 or 135 degrees
        w = period / 2 * math.sqrt(2)
        for k in range(-n, 2 * n):
            a = off + k * period * math.sqrt(2)
            pts = [(a, 0), (a + w, 0), (a + w - sign * size, size), (a - sign * size, size)]
            d.polygon(pts if sign > 0 else [(x - size, y) for x, y in pts], fill=fg)
    elif name == "checkerboard":
        for i in range(n):
            for j in range(n):
                if (i + j) % 2 == 0:
                    d.rectangle((j * period - off, i * period - off, (j + 1) * period - off, (i + 1) * period - off),
                                fill=fg)
    elif name == "polka_dots":
        dr = period * 0.25
        for i in range(n):
            for j in range(n):
                x, y = (j + 0.5) * period - off, (i + 0.5) * period - off
                d.ellipse((x - dr, y - dr, x + dr, y + dr), fill=fg)
    elif name == "concentric_rings":
        for k in range(1, int(size * 1.5 / period)):
            rad = k * period
            d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), outline=fg, width=max(2, int(period / 2.5)))
    elif name == "grid":
        lw = max(1, int(period * 0.12))
        for k in range(-1, n):
            a = off + k * period
            d.rectangle((0, a, size, a + lw), fill=fg)
            d.rectangle((a, 0, a + lw, size), fill=fg)
    elif name == "confetti":
        for _ in range(rng.randint(25, 45)):
            x, y, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.02, 0.06) * size
            d.rectangle((x, y, x + s, y + s), fill=_random_color(rng))
    elif name == "disc":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, angle), fill=fg)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return img


def generate_synthetic_imagenet(root: os.PathLike, num_classes: int = 10, train_per_class: int = 260,
                                val_per_class: int = 50, size: int = 112, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<class>/<i>.png`` (overwrites nothing: fails if root exists)."""
    root = Path(root)
    if num_classes > len(SYNTHETIC_CLASSES):
        raise ValueError(f"at most {len(SYNTHETIC_CLASSES)} synthetic classes, got {num_classes}")
    bank = _photo_bank()
    for split, per_class, split_seed in (("train", train_per_class, seed), ("val", val_per_class, seed + 1)):
        for label in range(num_classes):
            folder = root / split / f"{label:02d}_{SYNTHETIC_CLASSES[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(split_seed * 1000 + label)
            for i in range(per_class):
                draw_synthetic(label, size, rng, bank).save(folder / f"{i:04d}.png")
    return root


def ensure_synthetic_imagenet(root: os.PathLike, **kwargs) -> Path:
    """The built-in dataset in ``root``: generated on first use, reused afterwards.

    Generation writes into a temporary sibling folder and renames it into place, so an
    interrupted generation or several processes starting together (DDP ranks) never leave
    a half-written dataset behind.
    """
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root.parent, prefix=".tmp_" + root.name)  # of killed generations
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{root.name}_{os.getpid()}_", dir=root.parent))
    try:
        logger.info("generating the built-in synthetic dataset in %s", root)
        generate_synthetic_imagenet(tmp, **kwargs)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "train").is_dir():  # not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
