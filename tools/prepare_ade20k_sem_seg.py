#!/usr/bin/env python
"""Make ``annotations_detectron2`` from the official ADE20K (SceneParsing) release.

The release's ``annotations/{training,validation}/*.png`` store 0 for "other" and 1..150
for the classes. detectron2 (``ade20k_sem_seg_*``) and our configs read
``annotations_detectron2/`` with classes 0..149 and 255 for "other" (ignored in loss and
metrics): every value is shifted down by one and 0 becomes 255.

    python tools/prepare_ade20k_sem_seg.py                       # $DETECTRON2_DATASETS/ADEChallengeData2016
    python tools/prepare_ade20k_sem_seg.py --root /data/ADEChallengeData2016

Files already converted are skipped (``--overwrite`` redoes them); a label with a value
above 150, a colour PNG, an unreadable file, or a label whose size differs from its image
stops the script with one line naming the file (exit status 1); the labels converted
before it are kept.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, Tuple

import numpy as np
from PIL import Image

NUM_CLASSES = 150
SPLITS = ("training", "validation")


def convert_label(label: np.ndarray, path: str) -> np.ndarray:
    """Official label (0 other, 1..150) -> detectron2 label (0..149, 255 other)."""
    if label.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label PNG, got shape {label.shape}")
    if label.size and label.max() > NUM_CLASSES:
        raise ValueError(f"{path}: value {int(label.max())} above the {NUM_CLASSES} ADE20K classes")
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 - 1 wraps to 255


def convert_split(root: str, split: str, overwrite: bool = False) -> Tuple[int, int]:
    """Convert one split; returns (converted, skipped)."""
    src_dir = os.path.join(root, "annotations", split)
    dst_dir = os.path.join(root, "annotations_detectron2", split)
    image_dir = os.path.join(root, "images", split)
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"{src_dir} not found: is --root the ADEChallengeData2016 folder?")
    os.makedirs(dst_dir, exist_ok=True)
    converted = skipped = 0
    for name in sorted(n for n in os.listdir(src_dir) if n.endswith(".png")):
        src, dst = os.path.join(src_dir, name), os.path.join(dst_dir, name)
        if os.path.exists(dst) and not overwrite:
            skipped += 1
            continue
        with Image.open(src) as f:
            label = np.asarray(f)
        image_file = os.path.join(image_dir, name[:-4] + ".jpg")
        if os.path.exists(image_file):
            with Image.open(image_file) as im:  # reads the header only
                if im.size != (label.shape[1], label.shape[0]):
                    raise ValueError(f"{src}: label is {label.shape[1]}x{label.shape[0]} but {image_file} is "
                                     f"{im.size[0]}x{im.size[1]}")
        tmp = dst + ".tmp.png"
        Image.fromarray(convert_label(label, src), mode="L").save(tmp)
        os.replace(tmp, dst)  # never leave a half-written label behind
        converted += 1
    return converted, skipped


def main(argv: Iterable[str] = None) -> int:
    from revcolv2.data import datasets_root  # the project's one dataset-location rule

    default_root = os.path.join(datasets_root(), "ADEChallengeData2016")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=default_root, help="the ADEChallengeData2016 folder (default: %(default)s)")
    ap.add_argument("--overwrite", action="store_true", help="convert files that already exist again")
    args = ap.parse_args(argv)
    try:
        for split in SPLITS:
            converted, skipped = convert_split(args.root, split, args.overwrite)
            print(f"{split}: {converted} converted, {skipped} already there -> "
                  f"{os.path.join(args.root, 'annotations_detectron2', split)}")
    except (ValueError, OSError) as e:  # a bad or unreadable file: its message names it
        print(f"prepare_ade20k_sem_seg.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
