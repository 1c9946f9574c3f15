#!/usr/bin/env python
"""Export a RevColV2 checkpoint (MIM, fine-tuned or detectron2) as a timm / Hugging Face
folder: ``config.json`` + ``model.safetensors``.

    python tools/export.py output/pretrain/revcolv2_base/checkpoint-last.pth --output export/revcolv2_base
    python tools/export.py output/coco/model_final.pth --model revcolv2_base --output export/coco_backbone
    python tools/export.py ckpt.pth --model revcolv2_tiny --set embed_dim=32 num_heads=2 --output export/tiny

Load it back with ``timm.create_model("local-dir:export/revcolv2_base", pretrained=True)``
or ``timm.create_model("revcolv2_base", pretrained=True,
pretrained_cfg_overlay=dict(file="export/revcolv2_base/model.safetensors"))``.
"""
import argparse
from typing import List, Optional

import yaml

from revcolv2.export import export_to_folder


def parse_overrides(items: List[str]) -> dict:
    """``key=value`` pairs, values parsed as YAML (``embed_dim=32`` -> 32)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pth checkpoint of tools/pretrain.py, tools/finetune.py or detectron2")
    p.add_argument("--output", required=True, help="folder to write config.json and model.safetensors into")
    p.add_argument("--model", default=None, help="preset name (default: the one recorded in the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RevColV2 size overrides (default: those recorded in the checkpoint)")
    args = p.parse_args(argv)
    export_to_folder(args.checkpoint, args.output, args.model, parse_overrides(args.set))
    return args.output


if __name__ == "__main__":
    main()
