"""What ``tools/reconstruct.py`` and ``tools/analyze_levels.py`` share: images named on the
command line, prepared as pre-training's grids prepare theirs."""
from __future__ import annotations

import os
from typing import List, Sequence

from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data import ImageFiles, list_image_files
from .pretrain import eval_transform


def image_paths(items: Sequence[str]) -> List[str]:
    """Image files, folders (searched recursively) and text files listing image paths ->
    the image files, in order, each once."""
    paths: List[str] = []
    for item in items:
        if os.path.isfile(item) and item.lower().endswith(IMG_EXTENSIONS):
            paths.append(item)
        else:
            paths += list_image_files(item)
    unique, seen = [], set()
    for p in paths:
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            unique.append(p)
    return unique


def prepared_images(items: Sequence[str], size: int, strict: bool = False) -> ImageFiles:
    """The images of ``items`` resized (short side) and centre-cropped to ``size``,
    normalised: the preparation of pre-training's reconstruction grids. Unreadable files are
    skipped with a counting warning."""
    return ImageFiles(", ".join(items), transform=eval_transform(size), strict=strict, files=image_paths(items))
