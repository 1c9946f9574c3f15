#!/usr/bin/env python
"""Export a RevColV2 checkpoint for use with timm: a timm / Hugging Face folder, config.json + model.safetensors, from a
MIM, fine-tuned, linear-probe or detectron2 checkpoint (the RevColV2 model only):

    python tools/export.py output/pretrain/revcolv2_base/checkpoint-last.pth --output export/revcolv2_base
    python tools/export.py output/coco/model_final.pth --model revcolv2_base --output export/coco_backbone
    python tools/export.py ckpt.pth --model revcolv2_tiny --set embed_dim=32 num_heads=2 --output export/tiny

  Load it back after `import revcolv2` (it registers the presets with timm):
  timm.create_model("local-dir:export/revcolv2_base", pretrained=True).

Every checkpoint is read with the project's safe loader: nothing in it can run code.
"""
import argparse
from typing import List, Optional

import yaml


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
    p.add_argument("checkpoint", help="a .pth checkpoint of tools/pretrain.py, finetune.py, linear_probe.py or detectron2")
    p.add_argument("--output", required=True, help="a folder for config.json + model.safetensors")
    p.add_argument("--model", default=None, help="preset name (default: the one recorded in the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RevColV2 size overrides (default: those recorded in the checkpoint)")
    p.add_argument("--no-ema", action="store_true", help="take the raw weights of a checkpoint with EMA weights")
    args = p.parse_args(argv)

    from revcolv2.export import export_to_folder

    export_to_folder(args.checkpoint, args.output, args.model, parse_overrides(args.set), ema=not args.no_ema)
    return args.output


if __name__ == "__main__":
    main()
