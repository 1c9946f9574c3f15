"""Reconstructions of a MIM checkpoint for any images: the panels of pre-training's grids
(original | masked | reconstruction | reconstruction with the visible patches pasted), drawn
by the same code (:func:`revcolv2.visualization.reconstruction_grid`), one PNG per image.

    python tools/reconstruct.py --checkpoint output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth \\
        photo.jpg more_photos/ --output recon/ --mask-ratio 0.75 --seed 0
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch
from torchvision.utils import save_image

from ..checkpoint import CheckpointError
from ..checkpoint_models import mim_model_from_checkpoint
from ..mim import num_visible
from ..visualization import reconstruction_grid
from .inspect_common import prepared_images


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/reconstruct.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a MIM pre-training checkpoint of tools/pretrain.py")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or text files of paths")
    p.add_argument("--output", required=True,
                   help="folder for one PNG per image (named after it, below the images' common folder)")
    p.add_argument("--mask-ratio", type=float, default=None,
                   help="fraction of patches masked (default: the checkpoint's, 0.75 in the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random mask")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize (short side) and centre-crop to this size (default: the checkpoint's data.input_size)")
    p.add_argument("--no-ema", action="store_true",
                   help="from a checkpoint with EMA weights (model_ema), draw with the raw ones ('model')")
    return p


def output_names(paths: List[str]) -> List[str]:
    """One distinct output name per image: its path below the images' common folder, with
    ``.png`` for its extension (``a/x.jpg`` -> ``a/x.png``); two images that would still
    share a name keep their extension in it (``x.jpg.png``, ``x.png.png``)."""
    full = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in full]) if full else ""
    rel = [os.path.relpath(p, common) for p in full]
    plain = [os.path.splitext(r)[0] + ".png" for r in rel]
    return [n if plain.count(n) == 1 else r + ".png" for n, r in zip(plain, rel)]


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Write one panel per image; returns the written paths."""
    args = get_parser().parse_args(argv)
    try:
        model, cfg = mim_model_from_checkpoint(args.checkpoint, ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    size = args.input_size or int((cfg.get("data") or {}).get("input_size", 224))
    if size % model.patch_size:
        raise SystemExit(f"--input-size {size} is not a multiple of the patch size {model.patch_size}")
    if args.mask_ratio is not None:
        try:
            num_visible((size // model.patch_size) ** 2, args.mask_ratio)
        except ValueError as e:
            raise SystemExit(f"--mask-ratio: {e}") from None
        model.mask_ratio = args.mask_ratio
    images = prepared_images(args.images, size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    os.makedirs(args.output, exist_ok=True)
    written = []
    for (path, _), name in zip(images.samples, output_names([p for p, _ in images.samples])):
        x, _ = images[len(written)]
        out = os.path.join(args.output, name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        save_image(reconstruction_grid(model, x[None], seed=args.seed), out)
        written.append(out)
    print(f"wrote {len(written)} panels (original | masked {model.mask_ratio:.0%} | reconstruction | "
          f"reconstruction + visible) at {size}x{size} to {args.output}")
    return written
