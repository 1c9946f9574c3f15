"""Input pipelines: images per second per loader worker, and how many workers one GPU needs.

Three pipelines, each as the training tools run it and, for the first two, as plain
torchvision / timm run the same transforms (the reference):

- MIM pre-training: RandomResizedCrop(224, scale 0.2-1, bicubic) + flip
  (``configs/pretrain/revcolv2_base.yaml``);
- fine-tuning: timm's RandomResizedCrop(224, 0.08-1) + flip + RandAugment
  ``rand-m9-mstd0.5-inc1`` + random erasing 0.25, then mixup 0.8 / cutmix 1.0 on the batch
  (``configs/finetune/revcolv2_base_in1k.yaml``; the trainer mixes on the device, so the
  mixup column is not a worker's work);
- COCO large-scale jitter at 1024 (``projects/RevColV2/configs/common/coco_loader_lsj.py``:
  flip, resize 0.1-2.0, crop 1024, polygon masks, boxes recomputed), with detectron2's own
  ``DatasetMapper`` as the reference.

Every row runs in a fresh process with one thread (what a DataLoader worker has), loads
``--images`` generated JPEGs through a DataLoader without workers (the worker's own loop:
decode, augment, collate) after ``--warmup`` images, and reports CPU milliseconds per
image (which other load on the machine does not inflate) and images per CPU second: what
one worker delivers on this machine's cores. The images are photos (scikit-image's) cut to
about 500x375, with a little sensor-like grain, saved as JPEG quality 90 into a temporary
folder, with COCO-style polygon annotations for the LSJ rows.

"Workers per GPU" divides a training step's rate on a GPU, read from the GPU tables of
docs/BENCHMARKS.md (the row and card are named), by a worker's rate here.

    python tools/benchmark_loader.py                      # prints the table
    python tools/benchmark_loader.py --report             # ... and writes it to docs/BENCHMARKS.md
    python tools/benchmark_loader.py --rows mim,mim-torchvision --images 64
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from .measure import print_result, run_workers
from .report import REPORT, markdown_table, print_and_report, write_rows_json

TOOL = "benchmark_loader.py"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIG = os.path.join(_ROOT, "configs", "pretrain", "revcolv2_base.yaml")
FINETUNE_CONFIG = os.path.join(_ROOT, "configs", "finetune", "revcolv2_base_in1k.yaml")
LSJ_CONFIG = os.path.join(_ROOT, "projects", "RevColV2", "configs", "common", "coco_loader_lsj.py")

# row key -> (pipeline, implementation); the reference of a pipeline is its first row
ROWS: Dict[str, Tuple[str, str]] = {
    "mim-torchvision": ("MIM pre-training", "torchvision ImageFolder + transforms (reference)"),
    "mim-before": ("MIM pre-training", "RevColV2 before: RobustImageFolder, decode, then the same transforms"),
    "mim": ("MIM pre-training", "RevColV2: RandomResizedCropDecoder (crop from the header, uint8)"),
    "ft-timm": ("fine-tuning", "torchvision ImageFolder + timm create_transform, Mixup (reference)"),
    "ft": ("fine-tuning", "RevColV2: RobustImageFolder, timm transforms, Pillow-safe RandAugment"),
    "lsj-detectron2": ("COCO LSJ 1024", "detectron2 DatasetMapper (reference)"),
    "lsj": ("COCO LSJ 1024", "RevColV2: coco_loader_lsj.py's CheckedDatasetMapper"),
}
PIPELINE_OF = {"mim-torchvision": "mim", "mim-before": "mim", "mim": "mim", "ft-timm": "ft", "ft": "ft",
               "lsj-detectron2": "lsj", "lsj": "lsj"}
# the GPU step rates a pipeline has to feed: (docs/BENCHMARKS.md section, model cell, batch cell)
GPU_RATES = {
    "mim": [("MIM pre-training step: revcolv2_base vs MAE ViT-B/16 (GPU)", "revcolv2_base reversible", "256")],
    "ft": [("Backbone training step: revcolv2_base vs ViT-B/16 (GPU)", "revcolv2_base reversible", "128"),
           ("Backbone training step: revcolv2_base vs ViT-B/16 (GPU)", "revcolv2_base reversible, compiled levels",
            "128")],
    "lsj": [],  # no GPU Mask R-CNN table yet: tools/benchmark_detection.py has not run on a GPU
}
WORKER_LIMIT = 8  # the loader workers a GPU gets by default (revcolv2.data.num_workers_default)


# --------------------------------------------------------------------------- data
def write_jpegs(folder: str, count: int, seed: int = 0, classes: int = 10) -> Dict[str, float]:
    """``count`` JPEGs (quality 90) of about ImageNet's size, in ``classes`` class folders:
    scikit-image's photos at about their own scale, cut to 500x375 (a quarter 375x500),
    with a little grain. Returns the mean file size (KB) and count."""
    from PIL import Image

    from revcolv2.synthetic_imagenet import _photo_bank

    bank, rng, grain = _photo_bank(), random.Random(seed), np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        photo = Image.fromarray(bank[rng.randrange(len(bank))])
        width, height = (500, 375) if rng.random() < 0.75 else (375, 500)
        scale = max(width / photo.size[0], height / photo.size[1]) * rng.uniform(1.0, 1.3)
        photo = photo.resize((max(width, round(photo.size[0] * scale)), max(height, round(photo.size[1] * scale))),
                             Image.Resampling.BICUBIC)
        x, y = rng.randrange(photo.size[0] - width + 1), rng.randrange(photo.size[1] - height + 1)
        pixels = np.asarray(photo.crop((x, y, x + width, y + height)), dtype=np.float32)
        pixels = pixels + grain.normal(0.0, 2.5, pixels.shape[:2] + (1,))
        sub = os.path.join(folder, f"class_{i % classes:02d}")
        os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"{i:05d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        sizes.append(os.path.getsize(path))
    return {"images": count, "mean KB": round(float(np.mean(sizes)) / 1024, 1)}


def coco_dicts(folder: str, seed: int = 0, per_image: int = 7) -> List[Dict]:
    """detectron2 dataset dicts of the images in ``folder``, each with ``per_image``
    polygon instances (COCO's average), seeded."""
    from detectron2.structures import BoxMode
    from PIL import Image

    rng = random.Random(seed)
    dicts = []
    for image_id, path in enumerate(sorted(_images(folder))):
        width, height = Image.open(path).size
        annotations = []
        for _ in range(per_image):
            cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height
            r = rng.uniform(0.05, 0.25) * min(width, height)
            poly = [v for k in range(12) for v in (cx + r * math.cos(k * math.pi / 6) * rng.uniform(0.7, 1.0),
                                                   cy + r * math.sin(k * math.pi / 6) * rng.uniform(0.7, 1.0))]
            xs, ys = poly[0::2], poly[1::2]
            annotations.append({"bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                                "bbox_mode": BoxMode.XYWH_ABS, "category_id": rng.randrange(80),
                                "segmentation": [poly], "iscrowd": 0})
        dicts.append({"file_name": path, "image_id": image_id, "width": width, "height": height,
                      "annotations": annotations})
    return dicts


def _images(folder: str) -> List[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if n.endswith(".jpg")]


# --------------------------------------------------------------------------- one row, in its own process
def _config(path: str, opts=()) -> dict:
    from revcolv2.config import load_config

    return load_config(path, list(opts))


def row_dataset(key: str, folder: str):
    """(dataset, collate, batch transform or None) of a row, as its trainer builds it."""
    import torch
    from torch.utils.data import default_collate
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    from revcolv2.data import RobustImageFolder, SeededSamples

    if key.startswith("mim"):
        from revcolv2.cli.pretrain import pretrain_decoder, pretrain_transform

        cfg = _config(PRETRAIN_CONFIG)
        if key == "mim-torchvision":
            d = cfg["data"]
            tf = transforms.Compose([
                transforms.RandomResizedCrop(d["input_size"], scale=tuple(d["crop_scale"]),
                                             interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
            return ImageFolder(folder, transform=tf), default_collate, None
        if key == "mim-before":
            return SeededSamples(RobustImageFolder(folder, transform=pretrain_transform(cfg))), default_collate, None
        return SeededSamples(RobustImageFolder(folder, loader=pretrain_decoder(cfg))), default_collate, None
    if key.startswith("ft"):
        from timm.data import Mixup, create_transform

        from revcolv2.cli.finetune import build_transforms
        from revcolv2.data import pillow_safe_randaugment

        cfg = _config(FINETUNE_CONFIG)
        m = cfg["mixup"]
        mixup = Mixup(mixup_alpha=m["mixup"], cutmix_alpha=m["cutmix"], label_smoothing=m["label_smoothing"],
                      num_classes=1000)

        def mix(batch):  # timm's Mixup pairs images: an even batch
            even = len(batch[0]) // 2 * 2
            return mixup(batch[0][:even], batch[1][:even])

        if key == "ft-timm":
            d = cfg["data"]
            tf = create_transform(d["input_size"], is_training=True, scale=tuple(d["crop_scale"]),
                                  auto_augment=d["auto_augment"], interpolation=d["interpolation"],
                                  re_prob=d["re_prob"], re_mode="pixel", re_count=1)
            # timm as it is, but for the one patch without which it cannot run on Pillow >= 12
            # (RandAugment's posterize to 0 bits raises there: revcolv2.data.pillow_safe_randaugment)
            return ImageFolder(folder, transform=pillow_safe_randaugment(tf)), default_collate, mix
        return SeededSamples(RobustImageFolder(folder, transform=build_transforms(cfg)[0])), default_collate, mix
    if key.startswith("lsj"):
        from detectron2.config import LazyConfig, instantiate
        from detectron2.data import DatasetMapper

        mapper_cfg = LazyConfig.load(LSJ_CONFIG).dataloader.train.mapper
        if key == "lsj-detectron2":
            mapper_cfg._target_ = DatasetMapper
        mapper = instantiate(mapper_cfg)
        dicts = coco_dicts(folder)

        class Mapped(torch.utils.data.Dataset):
            def __len__(self):
                return len(dicts)

            def __getitem__(self, i):
                return mapper(dict(dicts[i]))

        return Mapped(), list, None
    raise ValueError(f"unknown row {key!r}; choose from {list(ROWS)}")


def worker(args: argparse.Namespace) -> Dict:
    """One row: ``--images`` images after ``--warmup``, one thread, as a loader worker runs."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass
    dataset, collate, batch_op = row_dataset(args.worker, args.data)
    n = min(args.images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    keys = [(i, 0) for i in order] if type(dataset).__name__ == "SeededSamples" else order
    for k in keys[:args.warmup]:
        dataset[k]
    loader = DataLoader(_Keys(dataset, keys[:n]), batch_size=args.batch, collate_fn=collate, num_workers=0)
    batches = []
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in loader:
        if batch_op is not None:
            batches.append(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    figures = {"ms/img (CPU)": round(1000 * cpu / n, 2), "img/s per worker": round(n / cpu, 1),
               "wall img/s": round(n / wall, 1)}
    if batch_op is not None:  # mixup / cutmix: on the device in the trainer, timed here on the CPU
        t = time.process_time()
        for batch in batches:
            batch_op(batch)
        figures["mixup ms/img (CPU)"] = round(1000 * (time.process_time() - t) / n, 3)
    return figures


class _Keys:
    """The dataset items of ``keys`` in order, for a DataLoader without a sampler of its own."""

    def __init__(self, dataset, keys):
        self.dataset, self.keys = dataset, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.dataset[self.keys[i]]


# --------------------------------------------------------------------------- GPU rates, table
def gpu_step_rates(report: str = REPORT) -> Dict[str, List[Dict]]:
    """Per pipeline, the training step rates (img/s) of the current GPU tables of
    ``report`` that it has to feed, each with its section, row and card."""
    text = open(report).read() if os.path.exists(report) else ""
    history = text.find("\n## History")
    text = text if history < 0 else text[:history]
    rates: Dict[str, List[Dict]] = {}
    for pipeline, wanted in GPU_RATES.items():
        rates[pipeline] = []
        for section, model, batch in wanted:
            found = _table_row(text, section, model, batch)
            if found:
                rates[pipeline].append(found)
    return rates


def _table_row(text: str, section: str, model: str, batch: str) -> Optional[Dict]:
    start = text.find(f"### {section}\n")
    if start < 0:
        return None
    end = text.find("<!-- /report -->", start)
    body = text[start:end if end > 0 else len(text)]
    card = re.search(r"^- machine: (.+?) \(torch", body, re.M)
    when = re.search(r"^- date: (.+)$", body, re.M)
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return None
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for ln in lines[2:]:
        cells = dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
        if cells.get("model") == model and cells.get("batch") == batch and cells.get("img/s"):
            return {"img/s": float(cells["img/s"]), "row": f"{model}, batch {batch}", "section": section,
                    "card": card.group(1) if card else "?", "date": when.group(1) if when else "?"}
    return None


def add_worker_columns(rows: List[Dict], rates: Dict[str, List[Dict]]) -> None:
    """``vs reference`` (a worker's rate against its pipeline's reference row) and, per GPU
    rate the pipeline has to feed, the workers one GPU needs (rounded up)."""
    reference = {}
    for r in rows:
        pipeline = PIPELINE_OF[r["key"]]
        reference.setdefault(pipeline, r)  # the first row of a pipeline is its reference
        if "img/s per worker" in r and "img/s per worker" in reference[pipeline]:
            r["vs reference"] = f"{r['img/s per worker'] / reference[pipeline]['img/s per worker']:.2f}x"
        needs = [f"{math.ceil(g['img/s'] / r['img/s per worker'])} at {g['img/s']:.0f} img/s"
                 for g in rates.get(pipeline, []) if r.get("img/s per worker")]
        r["workers per GPU"] = "; ".join(needs) if needs else "no GPU rate in docs/BENCHMARKS.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows out of: {', '.join(ROWS)}")
    ap.add_argument("--images", type=int, default=256, help="images timed per row (default 256)")
    ap.add_argument("--warmup", type=int, default=16, help="images loaded before timing (default 16)")
    ap.add_argument("--batch", type=int, default=32, help="batch collated by the loader (default 32)")
    ap.add_argument("--data", default=None, metavar="DIR",
                    help="a folder of class folders of JPEGs to read instead of generated ones")
    ap.add_argument("--report", nargs="?", const=REPORT, default=None, metavar="PATH",
                    help="write the table to docs/BENCHMARKS.md (or PATH) as the current CPU table of this benchmark")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows, as measured, to PATH")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print_result(worker(args))
        return
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    keys = [k for k in ROWS if k in keys]  # each pipeline's reference first
    folder = args.data or tempfile.mkdtemp(prefix="revcolv2-loader-")
    try:
        data = {"images": len(_images(folder)), "mean KB": round(float(np.mean(
            [os.path.getsize(p) for p in _images(folder)])) / 1024, 1)} if args.data else \
            write_jpegs(folder, args.images + args.warmup)
        measured = run_workers(__spec__.name, keys, ["--data", folder, "--images", args.images, "--warmup",
                                                     args.warmup, "--batch", args.batch], "benchmark_loader")
    finally:
        if not args.data:
            shutil.rmtree(folder, ignore_errors=True)
    rows = [{"key": k, "pipeline": ROWS[k][0], "implementation": ROWS[k][1], **{x: v for x, v in r.items()
                                                                                 if x != "model"}}
            for k, r in zip(keys, measured)]
    rates = gpu_step_rates()
    add_worker_columns(rows, rates)
    cols = ["pipeline", "implementation", "ms/img (CPU)", "img/s per worker", "vs reference", "wall img/s",
            "mixup ms/img (CPU)", "workers per GPU"]
    table = markdown_table(rows, cols)
    sources = "; ".join(f"{g['img/s']:.1f} img/s: {g['section']}, row \"{g['row']}\" ({g['card']}, {g['date']})"
                        for pipeline in rates for g in rates[pipeline])
    body = (f"Images per second of one loader worker (one process, one thread: decode, augment, collate), on "
            f"{data['images']} JPEGs " + ("of --data" if args.data else "generated, about 500x375, quality 90,")
            + f" mean {data['mean KB']} KB; "
            f"{args.images} images per row after {args.warmup} of warm-up, batch {args.batch}, every row in a fresh "
            f"process. \"ms/img (CPU)\" is process CPU time, which other load does not inflate; \"wall img/s\" "
            f"shows that load. Mixup / cutmix runs on the device in the trainer (its column is the CPU's time "
            f"here, not a worker's). \"workers per GPU\": the GPU step rate divided by a worker's rate, rounded "
            f"up; the rates are from the GPU tables of this file ({sources or 'none found'}). The COCO LSJ "
            f"pipeline has no GPU rate yet (tools/benchmark_detection.py has not run on a GPU).\n\n{table}\n")
    summary = "; ".join(f"{r['key']}: {r['img/s per worker']} img/s per worker, {r['workers per GPU']}"
                        for r in rows if "img/s per worker" in r)
    print_and_report(TOOL, table, summary, args.report, "Input pipelines: images per second per loader worker",
                     "cpu", body)
    write_rows_json(args.json, rows)


if __name__ == "__main__":
    main()
