"""Image data for pre-training, fine-tuning and linear probing.

- :class:`RobustImageFolder`: an ImageNet-style folder (``root/<class>/<image>``) that
  converts every image to RGB (grayscale, palette, RGBA, CMYK ...) and skips files it cannot
  decode, with one warning that counts them; ``strict=True`` turns the first unreadable
  file into an error instead.
- :class:`SeededSamples` + :class:`EpochSampler`: every sample's augmentation randomness is a
  pure function of (seed, epoch, index), and the order of an epoch is a pure function of
  (seed, epoch). A run resumed in the middle of an epoch therefore sees exactly the batches
  an uninterrupted run would have seen, whatever the number of loader workers.
- :func:`ensure_synthetic_imagenet`: the built-in dataset used when no ``--data-path`` is
  given: about 10 classes of procedurally drawn shapes and patterns over gradients or
  ``skimage.data`` photos, generated once into ``datasets/synthetic_imagenet/{train,val}``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

from .checkpoint import remove_stale_temporaries

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_ROOT = REPO_ROOT / "datasets" / "synthetic_imagenet"

# Above this many files the up-front decode check is skipped (it would read all of
# ImageNet); unreadable files are then found, counted and skipped while loading.
VERIFY_AUTO_LIMIT = 20000


class UnreadableImageError(RuntimeError):
    pass


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully and convert it to 3-channel RGB.

    RGBA / LA / palette-with-transparency images are composited over white rather than
    having their alpha dropped (dropping it turns transparent areas into arbitrary colours).
    16-bit grayscale (Pillow's ``I;16*`` / ``I`` modes) is scaled to 8 bits (value / 257)
    rather than clipped, which would turn nearly every pixel white.
    Raises :class:`UnreadableImageError` for empty, truncated or non-image files.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # full decode: a truncated JPEG fails here, not later in a worker
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise UnreadableImageError(f"{path}: {type(e).__name__}: {e}") from e
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _to_8bit(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) single-channel image as 8-bit ``L``: 0..65535 -> 0..255."""
    a = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), mode="L")


def check_same_classes(train: ImageFolder, val: ImageFolder) -> None:
    """Fine-tuning and linear probing score val images by class *index*: the train and
    val folders must hold the same class names, or the accuracy is silently wrong."""
    if list(train.classes) == list(val.classes):
        return
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    raise ValueError(
        f"the class folders of {train.root} and {val.root} differ: only in train {only_train[:10]}, "
        f"only in val {only_val[:10]} ({len(train.classes)} vs {len(val.classes)} classes); "
        "both must hold the same class names"
    )


def _check_readable(path: str) -> Optional[str]:
    try:
        if os.path.getsize(path) == 0:
            return f"{path}: empty file"
        load_rgb(path)
        return None
    except (UnreadableImageError, OSError) as e:
        return str(e)


class RobustImageFolder(ImageFolder):
    """ImageFolder that converts images to RGB and skips unreadable files.

    Args:
        root: folder with one sub-folder per class.
        transform: applied to the RGB PIL image.
        strict: raise on the first unreadable file instead of skipping it.
        verify: decode every file once at construction and drop the unreadable ones
            (``"auto"``: only for folders with at most ``VERIFY_AUTO_LIMIT`` files; larger
            folders drop empty files up front and skip undecodable ones when loading them).
        num_threads: threads for the up-front check.
    """

    def __init__(
        self,
        root: str,
        transform: Optional[Callable] = None,
        strict: bool = False,
        verify="auto",
        num_threads: int = 8,
    ):
        super().__init__(root, transform=transform, loader=load_rgb)
        self.strict = strict
        self.skipped: List[str] = []
        if verify == "auto":
            verify = len(self.samples) <= VERIFY_AUTO_LIMIT
        paths = [p for p, _ in self.samples]
        if verify:
            with ThreadPoolExecutor(max(1, num_threads)) as pool:
                problems = list(pool.map(_check_readable, paths))
        else:
            problems = [f"{p}: empty file" if os.path.getsize(p) == 0 else None for p in paths]
        bad = [msg for msg in problems if msg is not None]
        if bad:
            if strict:
                raise UnreadableImageError(
                    f"{len(bad)} unreadable image file(s) in {root} (strict data mode), first: {bad[0]}"
                )
            self.skipped = bad
            keep = [s for s, msg in zip(self.samples, problems) if msg is None]
            self.samples = self.imgs = keep
            self.targets = [t for _, t in keep]
            warnings.warn(
                f"skipped {len(bad)} unreadable image file(s) of {len(paths)} in {root}: "
                + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
                stacklevel=2,
            )
        if not self.samples:
            raise UnreadableImageError(f"no readable images in {root}")
        self._load_failures = 0

    def __getitem__(self, index: int):
        # Files that break after construction (unverified large folders, files changed on
        # disk) are replaced by the next readable sample, counted and reported.
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except UnreadableImageError as e:
                if self.strict:
                    raise
                self._load_failures += 1
                warnings.warn(f"skipped unreadable image ({self._load_failures} so far in this process): {e}")
                continue
            if self.transform is not None:
                img = self.transform(img)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return img, target
        raise UnreadableImageError(f"no readable image left in {self.root}")


def _posterize_at_least_one_bit(img, bits_to_keep, **kwargs):
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, max(1, int(bits_to_keep)))


def pillow_safe_randaugment(transform):
    """Make timm's RandAugment safe with Pillow >= 12.

    With magnitude noise (``mstd0.5``) timm's increasing posterize reaches magnitude 10,
    i.e. ``bits_to_keep = 0``, which old Pillow turned into a black image and Pillow 12+
    rejects with ``ValueError``, killing a run at a random step. Such ops keep one bit
    instead. Patches the op instances inside ``transform`` only; returns ``transform``.
    """
    from timm.data.auto_augment import AugmentOp

    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, AugmentOp) and t.name.startswith("Posterize"):
            t.aug_fn = _posterize_at_least_one_bit
        stack.extend(getattr(t, "transforms", []) or [])
        stack.extend(getattr(t, "ops", []) or [])
    return transform


def _epoch_seed(seed: int, epoch: int, index: int = 0) -> int:
    # a simple, stable integer mix (Python's hash() of tuples changes between processes)
    return (seed * 1_000_003 + epoch * 10_007 + index * 7919 + 12345) % (2 ** 31 - 1)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, epoch)`` is drawn with its own RNG seed.

    The global ``random`` / ``numpy`` / ``torch`` generators (used by torchvision and timm
    transforms) are seeded from (seed, epoch, index) for the duration of the item and then
    restored, so loading is reproducible and does not disturb the caller's RNG streams
    (which matters when ``num_workers == 0``).
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        s = _epoch_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class EpochSampler(Sampler):
    """Shuffled (or ordered) epochs, sharded over ranks, resumable mid-epoch.

    Yields ``(index, epoch)`` keys for :class:`SeededSamples`. Each epoch is a permutation
    drawn from (seed, epoch); it is cut to a multiple of ``world_size * batch_size`` (the
    remainder is dropped, like ``drop_last``) and rank ``r`` takes every ``world_size``-th
    batch-sized slice. :meth:`set_epoch` takes the number of this rank's samples to skip.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0):
        self.n = num_samples
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0
        per_round = batch_size * world_size
        self.batches_per_epoch = num_samples // per_round
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {num_samples} images, fewer than one global batch of {per_round} "
                f"({world_size} process(es) x {batch_size}); use a smaller batch or more data"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        bs, ws = self.batch_size, self.world_size
        mine = []
        for b in range(self.batches_per_epoch):
            base = (b * ws + self.rank) * bs
            mine.extend(order[base:base + bs])
        return mine

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for i in self.indices()[self.start:]:
            yield i, self.epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size - self.start


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Evaluation shard: every sample exactly once over all ranks (no padding)."""
    return list(range(rank, n, world_size))


# --------------------------------------------------------------------------- synthetic data
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


def ensure_synthetic_imagenet(root: Optional[os.PathLike] = None, **kwargs) -> Path:
    """The built-in dataset: generated on first use, reused afterwards.

    Generation writes into a temporary sibling folder and renames it into place, so an
    interrupted generation or several processes starting together (DDP ranks) never leave
    a half-written dataset behind.
    """
    root = Path(root) if root is not None else SYNTHETIC_ROOT
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


def resolve_data_path(data_path: Optional[str]) -> Path:
    """``--data-path`` if given, else the built-in synthetic dataset (generated once)."""
    if data_path:
        p = Path(data_path)
        if not (p / "train").is_dir():
            raise FileNotFoundError(f"{p} has no 'train' folder (expected an ImageNet-style layout "
                                    f"{p}/train/<class>/*.jpg and {p}/val/<class>/*.jpg)")
        return p
    return ensure_synthetic_imagenet()
