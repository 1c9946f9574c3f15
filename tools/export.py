#!/usr/bin/env python
"""Export a RevColV2 checkpoint for deployment or for use with timm.

--format timm (default): a timm / Hugging Face folder, config.json + model.safetensors, from a
MIM, fine-tuned, linear-probe or detectron2 checkpoint (the RevColV2 model only):

    python tools/export.py output/pretrain/revcolv2_base/checkpoint-last.pth --output export/revcolv2_base
    python tools/export.py output/coco/model_final.pth --model revcolv2_base --output export/coco_backbone
    python tools/export.py ckpt.pth --model revcolv2_tiny --set embed_dim=32 num_heads=2 --output export/tiny

  Load it back after `import revcolv2` (it registers the presets with timm):
  timm.create_model("local-dir:export/revcolv2_base", pretrained=True).

--format onnx: one .onnx file (torch.onnx.export with dynamo=True, dynamic batch), the
classifier's logits, or the backbone's four level maps for a checkpoint without a classifier
(or with --features); checked against PyTorch under onnxruntime (max abs difference <= 1e-4):

    python tools/export.py output/finetune/revcolv2_base_in1k/checkpoint-best.pth --format onnx \\
        --output export/revcolv2_base.onnx --img-size 224

--format torchscript: a detectron2 model of projects/RevColV2 (its LazyConfig and
checkpoint), traced through detectron2's TracingAdapter as detectron2's deploy tool does,
written as OUTPUT/model.ts and checked against the eager model on the sample images (default:
the first images of the config's test dataset):

    python tools/export.py output/demo/train/model_final.pth --format torchscript \\
        --config-file projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py --output export/demo_ts

Every checkpoint is read with the project's safe loader: nothing in it can run code.
"""
import argparse
import os
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


def _torchscript(args) -> None:
    if not args.config_file:
        raise SystemExit("--format torchscript needs --config-file (the detectron2 LazyConfig of the checkpoint)")
    from revcolv2_d2.export import dataset_images, export_torchscript
    from revcolv2_d2.safe_config import load_lazy_config

    cfg = load_lazy_config(args.config_file)
    images = args.sample_image or dataset_images(cfg, args.num_samples)
    diffs = export_torchscript(cfg, args.checkpoint, images, args.output, ema=not args.no_ema)
    print(f"wrote {args.output}/model.ts; traced outputs equal the eager model's on {len(diffs)} images "
          f"(largest difference {max(diffs.values()):.3g}). Load it with torch.jit.load; no import of this "
          "project is needed")


def _refuse_replacing_inputs(args) -> None:
    """No output may replace an input (the checkpoint, the config, a sample image)."""
    from revcolv2.atomic_io import inputs_replaced

    written = {"timm": ["config.json", "model.safetensors"], "torchscript": ["model.ts"]}.get(args.format)
    outputs = [os.path.join(args.output, n) for n in written] if written else [args.output]
    for out, given in inputs_replaced(outputs, [args.checkpoint, args.config_file, *args.sample_image]):
        raise SystemExit(f"--output {args.output}: writing {out} would replace the input {given}; "
                         "give --output another path")


def main(argv: Optional[List[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="a .pth checkpoint of tools/pretrain.py, finetune.py, linear_probe.py or detectron2")
    p.add_argument("--output", required=True,
                   help="timm: a folder for config.json + model.safetensors; onnx: the .onnx file; "
                        "torchscript: a folder for model.ts")
    p.add_argument("--format", choices=("timm", "onnx", "torchscript"), default="timm")
    p.add_argument("--model", default=None, help="preset name (default: the one recorded in the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="RevColV2 size overrides (default: those recorded in the checkpoint)")
    p.add_argument("--img-size", type=int, default=224, help="onnx: input height and width (fixed; batch is dynamic)")
    p.add_argument("--features", action="store_true",
                   help="onnx: export the four level maps even when the checkpoint has a classifier")
    p.add_argument("--config-file", default="", help="torchscript: the detectron2 LazyConfig")
    p.add_argument("--sample-image", action="append", default=[], metavar="IMAGE",
                   help="torchscript: an image to trace with and check on (repeatable; default: the "
                        "first --num-samples images of the config's test dataset)")
    p.add_argument("--num-samples", type=int, default=4, help="torchscript: dataset images to check on")
    p.add_argument("--no-ema", action="store_true", help="take the raw weights of a checkpoint with EMA weights")
    args = p.parse_args(argv)

    _refuse_replacing_inputs(args)
    if args.format == "torchscript":
        _torchscript(args)
        return args.output
    from revcolv2.export import export_onnx, export_to_folder, model_from_checkpoint

    if args.format == "timm":
        export_to_folder(args.checkpoint, args.output, args.model, parse_overrides(args.set), ema=not args.no_ema)
    else:
        model, _ = model_from_checkpoint(args.checkpoint, args.model, parse_overrides(args.set), ema=not args.no_ema)
        export_onnx(model, args.output, img_size=args.img_size, features=args.features or None)
    return args.output


if __name__ == "__main__":
    main()
