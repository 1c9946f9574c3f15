"""Linear CKA (Kornblith et al. 2019) of every column's every level of a checkpoint against
the input pixels, the patch embedding and the last column's top level, over the tokens of
a set of images: one heatmap per reference (columns x levels) and the values as JSON.

    python tools/analyze_levels.py --checkpoint output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth \\
        --data datasets/synthetic_imagenet/val --output cka/

Any checkpoint of the project: MIM pre-training, fine-tuning, linear probing (their config
names the preset) and detectron2 (which records it too; older ones: give --model). How to
read the pictures: docs/ARCHITECTURE.md, "Looking inside a checkpoint".
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

import torch
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, load_file
from ..checkpoint_models import recorded_config
from ..export import model_from_checkpoint
from ..level_analysis import REFERENCES, analyze_levels, write_results
from .inspect_common import prepared_images


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/analyze_levels.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a MIM, fine-tuning, linear-probe or detectron2 checkpoint")
    p.add_argument("--data", required=True, nargs="+",
                   help="image files, folders (searched recursively) or text files of image paths")
    p.add_argument("--output", required=True, help="folder for cka.json and cka_<reference>.png")
    p.add_argument("--input-size", type=int, default=None,
                   help="resize (short side) and centre-crop to this size (default: the checkpoint's "
                        "data.input_size, else 224)")
    p.add_argument("--max-images", type=int, default=64, help="use at most this many images (default 64)")
    p.add_argument("--model", default=None,
                   help="the preset (e.g. revcolv2_base) of a checkpoint that records none")
    p.add_argument("--no-ema", action="store_true",
                   help="from a checkpoint with EMA weights (model_ema), analyse the raw ones ('model')")
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Run the analysis; returns its results (as written to cka.json)."""
    args = get_parser().parse_args(argv)
    try:
        checkpoint = load_file(args.checkpoint)
        print(f"checkpoint {args.checkpoint}")
        model, kwargs = model_from_checkpoint(checkpoint, args.model, ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{args.checkpoint}: {e}") from None
    size = args.input_size or int((recorded_config(checkpoint).get("data") or {}).get("input_size", 224))
    if size % model.patch_size:
        raise SystemExit(f"--input-size {size} is not a multiple of the patch size {model.patch_size}")
    images = prepared_images(args.data, size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    batches = (x for x, _ in DataLoader(images, batch_size=16, num_workers=0))
    results = analyze_levels(model, batches, args.max_images)
    name = model.pretrained_cfg.get("architecture", "") if hasattr(model, "pretrained_cfg") else ""
    meta = {"checkpoint": os.path.abspath(args.checkpoint), "model": {"name": name, "kwargs": kwargs},
            "weights": "raw" if args.no_ema else "EMA where present", "input_size": size}
    written = write_results(results, args.output, meta)
    for ref in REFERENCES:
        print(f"CKA with {ref}:")
        for col, row in zip(results["columns"], results["cka"][ref]):
            print(f"  {col:6s} " + "  ".join("  -  " if v != v else f"{v:.3f}" for v in row))
    print(f"wrote {', '.join(written)}")
    return results
