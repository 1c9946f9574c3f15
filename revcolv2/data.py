"""Image data for pre-training, fine-tuning and linear probing.

- :class:`RobustImageFolder`: an ImageNet-style folder (``root/<class>/<image>``) that
  converts every image to RGB (grayscale, palette, RGBA, CMYK ...) and skips files it cannot
  decode, with one warning that counts them; ``strict=True`` turns the first unreadable
  file into an error instead.
- :class:`RandomResizedCropDecoder`: the MIM pipeline's decode, random resized crop and flip
  in one step from the file (the crop drawn from the JPEG header, decoding at reduced size
  where the crop allows), to uint8 tensors that :func:`normalize_uint8` normalizes on the
  device; the same random draws and, but for the reduced decodes, the same pixels as
  torchvision's transforms on the decoded image.
- :class:`ImageFiles`: unlabelled images for pre-training, every image under a folder
  (searched recursively) or the files a text file lists, with the same conversion and the
  same skipping and counting of unreadable files; :func:`pretraining_images` picks it or
  an ImageNet-style folder for ``--data-path``.
- :class:`SeededSamples` + :class:`EpochSampler`: every sample's augmentation randomness is a
  pure function of (seed, epoch, index), and the order of an epoch is a pure function of
  (seed, epoch). A run resumed in the middle of an epoch therefore sees exactly the batches
  an uninterrupted run would have seen, whatever the number of loader workers.
- :func:`resolve_data_path`: ``--data-path``, or the built-in dataset of
  :mod:`revcolv2.synthetic_imagenet` when none is given; :func:`prepare_data_root`: the
  same for every process of a distributed run, generated once by the main process.
- :func:`datasets_root`: the one location rule of every dataset the project finds by name.
"""
from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .distributed import DistInfo, barrier
from .synthetic_imagenet import SYNTHETIC_NAME, ensure_synthetic_imagenet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
    rather than clipped, which would turn nearly every pixel white. An EXIF orientation tag
    (a rotated phone photo) is applied, as detectron2's ``read_image`` (and so
    ``tools/visualize.py`` and the detection and segmentation loaders) applies it.
    Raises :class:`UnreadableImageError` for empty, truncated or non-image files.
    """
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # full decode: a truncated JPEG fails here, not later in a worker
            img = ImageOps.exif_transpose(img)  # a camera's rotation tag, as detectron2's read_image
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
        loader: path -> sample (default :func:`load_rgb`); it raises
            :class:`UnreadableImageError` for a file it cannot decode.
    """

    def __init__(
        self,
        root: str,
        transform: Optional[Callable] = None,
        strict: bool = False,
        verify="auto",
        num_threads: int = 8,
        loader: Callable = load_rgb,
    ):
        super().__init__(root, transform=transform, loader=loader)
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


_EXIF_ORIENTATION = 0x0112


class RandomResizedCropDecoder:
    """The MIM pipeline from the file: torchvision's ``RandomResizedCrop(size, scale, ratio,
    bicubic)`` then ``RandomHorizontalFlip(hflip)``, with the same random draws, to a uint8
    (3, size, size) tensor. Normalize it where it is trained (:func:`normalize_uint8`).

    What makes it faster than decoding and then transforming (``tools/benchmark_loader.py``
    measures both):

    - the crop is drawn from the size in the JPEG header, before anything is decoded;
    - a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling, PIL's
      ``draft``) when the crop at that scale still has at least ``size`` pixels on both
      sides, so that only downscaling follows (never for 500x375 images at 224, often for
      larger photos);
    - the worker returns uint8: no float conversion and normalization there, and a quarter
      of the bytes through shared and pinned memory.

    The output is torchvision's pixel for pixel (the same crop, resampling and flip of the
    decoded image) except after a reduced decode, whose pixels differ slightly (the DCT's
    downscaling instead of the first part of the bicubic one). Files other than plain RGB
    JPEGs (PNG, grayscale, CMYK, an EXIF rotation) are decoded by :func:`load_rgb` first.
    Raises :class:`UnreadableImageError` for a file it cannot decode.
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), float(hflip)

    def __call__(self, path: str) -> torch.Tensor:
        try:
            with open(path, "rb") as f:
                img = Image.open(f)  # the header only
                if img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(_EXIF_ORIENTATION, 1) == 1:
                    return self._crop(img, lazy=True)
        except UnreadableImageError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
            raise UnreadableImageError(f"{path}: {type(e).__name__}: {e}") from e
        return self._crop(load_rgb(path), lazy=False)

    def _crop(self, img: Image.Image, lazy: bool) -> torch.Tensor:
        # the draws of RandomResizedCrop, then of RandomHorizontalFlip, in their order
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        flip = bool(torch.rand(1) < self.hflip)
        reduce = 1
        while lazy and reduce < 8 and min(h, w) // (2 * reduce) >= self.size:
            reduce *= 2
        if reduce > 1:
            full_width = img.size[0]
            img.draft("RGB", (img.size[0] // reduce, img.size[1] // reduce))
            img.load()
            s = 1 / round(full_width / img.size[0])  # DCT scaling by 1/2, 1/4 or 1/8 (sizes round up)
            out = img.resize((self.size, self.size), Image.Resampling.BICUBIC,
                             box=(left * s, top * s, (left + w) * s, (top + h) * s))
        else:
            if lazy:
                img.load()
            out = img.crop((left, top, left + w, top + h)).resize((self.size, self.size), Image.Resampling.BICUBIC)
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return transforms.functional.pil_to_tensor(out)


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) as float, ImageNet-normalized on their device: the same
    operations (and values) as ``ToTensor()`` + ``Normalize(IMAGENET_MEAN, IMAGENET_STD)``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(3, 1, 1)
    return images.to(torch.float32).div(255).sub_(mean).div_(std)


def list_image_files(source: str) -> List[str]:
    """The image files of ``source``: every file with an image extension under a folder
    (recursively, sorted), or the lines of a text file (one path a line; blank lines and
    lines starting with ``#`` skipped; relative paths are relative to the list's folder)."""
    if os.path.isdir(source):
        found = []
        for folder, subfolders, names in os.walk(source, followlinks=True):
            subfolders.sort()
            found += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            raise UnreadableImageError(f"no image files ({', '.join(IMG_EXTENSIONS)}) under {source}")
        return found
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such folder or image list")
    base = os.path.dirname(os.path.abspath(source))
    with open(source, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    paths = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
    if not paths:
        raise UnreadableImageError(f"the image list {source} names no file")
    return paths


def _missing_or_empty(path: str) -> Optional[str]:
    try:
        return f"{path}: empty file" if os.path.getsize(path) == 0 else None
    except OSError as e:
        return f"{path}: {e.strerror or e}"


class ImageFiles(Dataset):
    """Unlabelled images: a folder searched recursively, or a text file of image paths
    (:func:`list_image_files`). Items are ``(image, 0)``, as an image folder's with one class.

    Like :class:`RobustImageFolder`, images are converted to RGB (:func:`load_rgb`) and
    unreadable or missing files are skipped with one warning that counts and names them
    (``verify``: decode every file once at construction; ``"auto"``: only up to
    ``VERIFY_AUTO_LIMIT`` files, larger sets drop missing and empty files up front and skip
    undecodable ones when met); ``strict=True`` makes the first one an error.
    """

    def __init__(self, source: str, transform: Optional[Callable] = None, strict: bool = False, verify="auto",
                 num_threads: int = 8, files: Optional[List[str]] = None, loader: Callable = load_rgb):
        self.root = source
        self.transform, self.target_transform = transform, None
        self.loader = loader
        self.strict = strict
        paths = list_image_files(source) if files is None else list(files)
        if verify == "auto":
            verify = len(paths) <= VERIFY_AUTO_LIMIT
        if verify:
            with ThreadPoolExecutor(max(1, num_threads)) as pool:
                problems = list(pool.map(_check_readable, paths))
        else:
            problems = [_missing_or_empty(p) for p in paths]
        bad = [msg for msg in problems if msg is not None]
        self.skipped: List[str] = []
        if bad:
            if strict:
                raise UnreadableImageError(
                    f"{len(bad)} unreadable image file(s) in {source} (strict data mode), first: {bad[0]}")
            self.skipped = bad
            warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(paths)} in {source}: "
                          + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""), stacklevel=2)
        self.samples = [(p, 0) for p, msg in zip(paths, problems) if msg is None]
        if not self.samples:
            raise UnreadableImageError(f"no readable images in {source}")
        self._load_failures = 0

    def __len__(self) -> int:
        return len(self.samples)

    # the same replacement of files that break after construction, counted and reported
    __getitem__ = RobustImageFolder.__getitem__


def pretraining_images(data_path: Optional[str], info: DistInfo, transform: Optional[Callable] = None,
                       strict: bool = False, loader: Callable = load_rgb) -> Tuple[Dataset, str]:
    """The images of ``tools/pretrain.py --data-path`` and where they come from: an
    ImageNet-style folder's ``train/`` split (class folders play no part), else any folder
    of images (recursive) or a text file listing image paths (:class:`ImageFiles`); without
    ``--data-path`` the built-in dataset. ``loader`` reads a file (path -> sample; e.g. a
    :class:`RandomResizedCropDecoder`), ``transform`` then transforms it."""
    if data_path and not (Path(data_path) / "train").is_dir():
        return ImageFiles(data_path, transform=transform, strict=strict, loader=loader), data_path
    train = str(prepare_data_root(data_path, info) / "train")
    return RobustImageFolder(train, transform=transform, strict=strict, loader=loader), train


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
            # the CPU generator only (what transforms draw from; torch.manual_seed would also
            # reseed every CUDA device, ~0.1 ms per image, and fork_rng restores only the CPU's)
            torch.default_generator.manual_seed(s)
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


def datasets_root() -> str:
    """The folder of every dataset the project finds by name: ``$DETECTRON2_DATASETS`` when
    set, else ``datasets`` in the working directory (detectron2's own rule for COCO and
    ADE20K). The built-in datasets (``synthetic_imagenet`` here, ``synthetic_shapes`` and
    ``synthetic_ade`` in ``revcolv2_d2``) are generated there on first use, so a read-only
    checkout works from any writable working directory."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def make_datasets_folder(folder: str) -> None:
    """Create ``folder`` for a built-in dataset, or fail saying how to choose a writable one."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create {os.path.abspath(folder)} for the built-in datasets "
                               f"({e.strerror}): run from a writable folder or set DETECTRON2_DATASETS "
                               f"to one") from e


def resolve_data_path(data_path: Optional[str]) -> Path:
    """``--data-path`` if given, else the built-in synthetic dataset, generated once under
    :func:`datasets_root`."""
    if data_path:
        p = Path(data_path)
        if not (p / "train").is_dir():
            raise FileNotFoundError(f"{p} has no 'train' folder (expected an ImageNet-style layout "
                                    f"{p}/train/<class>/*.jpg and {p}/val/<class>/*.jpg)")
        return p
    root = datasets_root()
    make_datasets_folder(root)
    return ensure_synthetic_imagenet(Path(root) / SYNTHETIC_NAME)


def prepare_data_root(data_path: Optional[str], info: DistInfo) -> Path:
    """``--data-path``, or the built-in dataset: the main process generates it once while
    the others wait, then every process resolves the same folder."""
    if info.is_main:
        resolve_data_path(data_path)
    barrier(info)
    return resolve_data_path(data_path)


def num_workers_default() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))
