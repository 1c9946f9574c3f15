"""Mask R-CNN: RevColV2-B (reversible, plain) vs detectron2's ViTDet-B, in one run.

Both detectors are built from their LazyConfigs with nothing changed but the square padding
(= the benchmark resolution) and drop path (0.1 for both, ViTDet-B's value):
- RevColV2-B: ``projects/RevColV2/configs/COCO/mask_rcnn_revcolv2_b_50ep.py`` (FPN on the last
  TD column's levels, windows 14 + 4 global blocks), ``reversible`` on or off;
- ViTDet-B: detectron2's ``common/models/mask_rcnn_vitdet.py`` (ViT-B, windows 14 + 4 global
  blocks with relative position, simple feature pyramid), the same heads.

A training step is forward (losses on 6 synthetic instances per image) + backward + AdamW
step; inference is a no-grad forward with post-processing, both on the same batch. On CUDA
they run under bf16 autocast and peak memory is ``torch.cuda.max_memory_allocated`` (weights,
gradients and AdamW state included). On CPU (fp32) memory is what autograd saves for
backward in one training forward (saved-tensor hooks, each storage once, parameters left
out), the profiler's peak of tensor bytes that forward + backward add, and the process's peak
RSS. "backbone GFLOPs" (fvcore, multiply-adds, one image) counts backbone + feature
pyramid, the part that differs. Each model runs in its own subprocess.

    python tools/benchmark_detection.py                      # CUDA: 1024x1024, batch 2, bf16
    python tools/benchmark_detection.py --device cpu         # CPU: 256x256, batch 2, fp32
    python tools/benchmark_detection.py --device cpu --report  # ... and writes it to docs/BENCHMARKS.md

Targets on a GPU: training step <= 1.2x ViTDet-B's time, reversible peak memory <= ViTDet-B's,
inference >= 0.8x ViTDet-B's img/s.
"""
import os

import torch

from .cli import benchmark_parser, fill_device_defaults
from .detectron2_runs import detectron2_train_infer
from .flops import count_flops
from .measure import peak_rss_mb, print_result, run_workers
from .report import CPU_RATIO_NOTE, add_ratio_columns, markdown_table, print_and_report, write_rows_json

TOOL = "benchmark_detection.py"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["RevColV2-B reversible", "RevColV2-B plain", "ViTDet-B"]
REVCOLV2_CONFIG = os.path.join(_ROOT, "projects", "RevColV2", "configs", "COCO", "mask_rcnn_revcolv2_b_50ep.py")
DROP_PATH = 0.1


def build(label: str, size: int) -> torch.nn.Module:
    from detectron2 import model_zoo
    from detectron2.config import LazyConfig, instantiate

    if label == "ViTDet-B":
        model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
        model.backbone.net.drop_path_rate = DROP_PATH
    else:
        model = LazyConfig.load(REVCOLV2_CONFIG).model
        model.backbone.bottom_up.square_pad = size
        model.backbone.bottom_up.drop_path_rate = DROP_PATH
        model.backbone.bottom_up.reversible = label.endswith("reversible")
    model.backbone.square_pad = size
    return instantiate(model)


def synthetic_batch(batch: int, size: int, device: str, with_targets: bool):
    """``batch`` images (0-255) with 6 box + elliptical-mask instances each, seeded."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        image = torch.rand(3, size, size, generator=g) * 255
        record = {"image": image.to(device), "height": size, "width": size}
        if with_targets:
            xy = torch.rand(6, 2, generator=g) * size * 0.7
            wh = (0.1 + torch.rand(6, 2, generator=g) * 0.2) * size
            boxes = torch.cat([xy, xy + wh], dim=1)
            ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, wh / 2
            masks = ((xs - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 \
                + ((ys - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2 <= 1
            inst = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.randint(0, 80, (6,), generator=g),
                             gt_masks=BitMasks(masks))
            record["instances"] = inst.to(device)
        out.append(record)
    return out


def backbone_gflops(backbone: torch.nn.Module, size: int) -> float:
    """Multiply-adds (fvcore's convention) of backbone + feature pyramid on one image."""
    return count_flops(backbone, size)


def worker(args) -> dict:
    torch.manual_seed(0)
    model = build(args.worker, args.size).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    train_batch = synthetic_batch(args.batch, args.size, args.device, with_targets=True)
    test_batch = synthetic_batch(args.batch, args.size, args.device, with_targets=False)
    out = {"params (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
           "backbone GFLOPs": round(backbone_gflops(model.backbone, args.size), 1)}
    out.update(detectron2_train_infer(model, opt, train_batch, test_batch, args.device, args.warmup, args.iters))
    if not args.device.startswith("cuda"):
        out["peak RSS (MB)"] = round(peak_rss_mb(), 0)
    return out


def main():
    ap = benchmark_parser(__doc__, MODELS)
    ap.add_argument("--size", type=int, default=None, help="square input side; default 1024 on CUDA, 256 on CPU")
    args = ap.parse_args()
    cuda = fill_device_defaults(args, batch=(2, 2), warmup=(1, 3), iters=(2, 10))
    args.size = args.size or (1024 if cuda else 256)

    if args.worker:
        print_result(worker(args))
        return

    rows = run_workers(__spec__.name, MODELS, ["--batch", args.batch, "--size", args.size,
                                          "--warmup", args.warmup, "--iters", args.iters,
                                          "--device", args.device], "benchmark_detection")

    vitdet = rows[-1]
    step, speed, mem = add_ratio_columns(rows, vitdet, "ViTDet", cuda)
    cols = ["model", "params (M)", "backbone GFLOPs", "train s/step"] + ([] if cuda else ["train CPU-s/step"])
    cols += ["train time vs ViTDet", "saved activations (MB)"]
    cols += ["train peak GPU mem (GiB)"] if cuda else ["fwd+bwd adds (MB)"]
    cols += ["train memory vs ViTDet", "infer img/s"] + ([] if cuda else ["infer img/CPU-s"]) + ["infer vs ViTDet"]
    cols += ["infer peak GPU mem (GiB)"] if cuda else ["peak RSS (MB)"]
    table = markdown_table(rows, cols)

    rev, plain = rows[0], rows[1]

    def check(ok):
        return "met" if ok else "NOT met"

    verdict = (
        f"Targets (GPU): training step <= 1.2x ViTDet-B -> reversible {rev['train time vs ViTDet']}, "
        f"plain {plain['train time vs ViTDet']} "
        f"({check(rev[step] <= 1.2 * vitdet[step])} / {check(plain[step] <= 1.2 * vitdet[step])}); "
        f"reversible peak memory <= ViTDet-B -> {rev['train memory vs ViTDet']} ({check(rev[mem] <= vitdet[mem])}); "
        f"inference >= 0.8x ViTDet-B img/s -> {rev['infer vs ViTDet']} ({check(rev[speed] >= 0.8 * vitdet[speed])})."
    )
    precision = "bf16 autocast" if cuda else "fp32"
    body = (
        f"Mask R-CNN, {args.size}x{args.size} (square padding {args.size}), batch {args.batch}, {precision}, "
        f"drop path {DROP_PATH} for both, {args.warmup} warm-up + {args.iters} timed steps / inference batches. "
        f"\"train memory vs ViTDet\" compares {mem}.\n\n{table}\n\n"
        + (verdict if cuda else
           CPU_RATIO_NOTE + "The GPU targets (training step <= 1.2x ViTDet-B, reversible peak memory <= "
           "ViTDet-B, inference >= 0.8x ViTDet-B) need this script on CUDA (1024x1024, batch 2, bf16).")
        + "\n"
    )
    print_and_report(TOOL, table,
                     verdict if cuda else "(CPU run: the targets are for a GPU; the same ratios are printed above)",
                     args.report, "Mask R-CNN: RevColV2-B vs ViTDet-B", args.device, body)
    write_rows_json(args.json, rows)


if __name__ == "__main__":
    main()
