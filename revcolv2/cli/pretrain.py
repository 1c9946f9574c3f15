"""Masked image modeling pre-training of RevColV2 (paper Table 1).

    python tools/pretrain.py --config configs/pretrain/revcolv2_tiny_demo.yaml
    torchrun --nproc_per_node 8 tools/pretrain.py --config configs/pretrain/revcolv2_base.yaml \\
        --data-path /data/imagenet --batch-per-gpu 128

Without ``--data-path`` the built-in synthetic dataset is used (generated once).
``--data-path`` is an ImageNet-style folder (its ``train/`` split), any folder of images
(searched recursively: no class folders needed) or a text file with one image path a line.
``--init CKPT`` starts a new run from a checkpoint's weights (a MIM checkpoint: encoder and
decoder; a fine-tuned or detectron2 one: what matches, the rest listed) with a fresh
optimizer and schedule; ``--resume`` continues a run instead. The
effective batch of the config is reached by gradient accumulation; ``--resume auto``
continues the latest checkpoint in the output folder exactly where it stopped (Ctrl-C or
SIGTERM write one before exiting). Every ``train.vis_every`` epochs a PNG grid
(original | masked | reconstruction | reconstruction with the visible patches pasted)
is written to ``<output>/reconstructions/``.
"""
from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import List, Optional

import torch
from timm.optim import param_groups_weight_decay
from torchvision import transforms
from torchvision.utils import save_image

from ..atomic_io import write_bytes_atomic
from ..checkpoint import CheckpointError, ShapeMismatchError
from ..checkpoint_models import init_from_checkpoint
from ..config import (
    AMP,
    SCHEDULE,
    flag,
    load_config,
    mapping,
    number,
    numbers,
    text,
    validate_config,
    whole,
    write_config,
)
from ..data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFiles,
    RandomResizedCropDecoder,
    RobustImageFolder,
    normalize_uint8,
    num_workers_default,
    pretraining_images,
)
from ..distributed import init_distributed
from ..model import MODEL_CFGS
from ..rng import seed_everything
from ..run_checkpoints import find_resume_checkpoint
from ..run_dir import claim_output_dir
from ..trainer import Trainer
from ..visualization import reconstruction_grid
from .common import build_model, compile_if_asked, training_parser

# every key of a pre-training recipe, its type and range: checked before anything runs
SCHEMA = {
    "model": {"name": text(*MODEL_CFGS), "reversible": flag(), "kwargs": mapping(),
              "mask_ratio": number(above=0, below=1), "norm_pix_loss": flag(),
              "drop_path_rate": number(low=0, below=1)},
    "data": {"input_size": whole(1), "crop_scale": numbers(2, above=0, high=1), "hflip": number(low=0, high=1)},
    "optim": {"betas": numbers(2, low=0, below=1), "base_lr": number(above=0), "weight_decay": number(low=0),
              "batch_size": whole(1)},
    "schedule": SCHEDULE,
    "train": {"batch_per_gpu": whole(1), "amp": AMP, "save_every": whole(1), "keep_last": whole(0, default=0),
              "keep_every": whole(0, default=0), "vis_every": whole(1), "vis_images": whole(0), "log_every": whole(1)},
}


def get_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return training_parser(__doc__, "pretrain").parse_args(argv)


def pretrain_decoder(cfg: dict) -> RandomResizedCropDecoder:
    """The training images of pre-training: decoded, cropped, resized and flipped in one step
    from the file (uint8; :class:`~revcolv2.data.RandomResizedCropDecoder`), which gives
    :func:`pretrain_transform`'s crops and flips."""
    d = cfg["data"]
    return RandomResizedCropDecoder(d["input_size"], tuple(d["crop_scale"]), hflip=d["hflip"])


def pretrain_transform(cfg: dict) -> transforms.Compose:
    """The same augmentation as torchvision transforms of a decoded image, to normalized
    float (the reference that :func:`pretrain_decoder` reproduces)."""
    d = cfg["data"]
    return transforms.Compose([
        transforms.RandomResizedCrop(d["input_size"], scale=tuple(d["crop_scale"]),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(d["hflip"]),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def fixed_images(dataset, size: int, count: int) -> torch.Tensor:
    """The pictures of the reconstruction grids, (K, 3, H, W): of an ImageNet-style folder,
    the first image of each of the first ``count`` classes (val if present); of unlabelled
    images (:class:`ImageFiles`), the first ``count``."""
    if isinstance(dataset, ImageFiles):
        ds = ImageFiles(dataset.root, transform=eval_transform(size), files=[p for p, _ in dataset.samples[:count]])
        return torch.stack([ds[i][0] for i in range(len(ds))])
    root = Path(dataset.root).parent
    folder = root / "val" if (root / "val").is_dir() else root / "train"
    ds = RobustImageFolder(str(folder), transform=eval_transform(size), verify=False)
    picks, seen = [], set()
    for i, (_, target) in enumerate(ds.samples):
        if target not in seen:
            seen.add(target)
            picks.append(i)
        if len(picks) == count:
            break
    while len(picks) < min(count, len(ds)):  # fewer classes than images wanted
        picks.append(len(picks))
    return torch.stack([ds[i][0] for i in picks])


class PretrainTrainer(Trainer):
    def __init__(self, *, vis_images: Optional[torch.Tensor], vis_every: int, **kwargs):
        super().__init__(name="pretrain", **kwargs)
        self.vis_images = vis_images
        self.vis_every = max(1, int(vis_every))

    def forward_loss(self, batch) -> torch.Tensor:
        images, _ = batch
        images = images.to(self.info.device, non_blocking=True)
        if images.dtype == torch.uint8:  # pretrain_decoder's images: normalized here, not in the workers
            images = normalize_uint8(images)
        return self.ddp_model(images)["loss"]

    def end_of_epoch(self, epoch: int) -> dict:
        done = epoch + 1
        if self.info.is_main and self.vis_images is not None and (done % self.vis_every == 0 or done == self.epochs):
            grid = reconstruction_grid(self.model, self.vis_images)
            png = io.BytesIO()
            save_image(grid, png, format="png")
            # through a renamed temporary file: a link planted in the run folder is replaced, not written through
            write_bytes_atomic(os.path.join(self.output_dir, "reconstructions", f"epoch_{done:04d}.png"),
                               png.getvalue())
            self.tb.image("pretrain/reconstruction", grid, done)
        return {}


def main(argv: Optional[List[str]] = None) -> dict:
    args = get_args(argv)
    cfg = load_config(args.config, args.opts)
    validate_config(cfg, SCHEMA, args.config)
    info = init_distributed(args.device)
    out_dir = args.output_dir or os.path.join("output", "pretrain", Path(args.config).stem)
    with claim_output_dir(out_dir, args.resume, args.overwrite, info):  # locked until training ends
        return train(args, cfg, info, out_dir)


def train(args: argparse.Namespace, cfg: dict, info, out_dir: str) -> dict:
    """Pre-train into ``out_dir`` (held by the caller), from ``--resume`` when given."""
    train_cfg, optim_cfg, sched_cfg = cfg["train"], cfg["optim"], cfg["schedule"]

    seed_everything(args.seed)  # same initial weights on every rank
    model = build_model(cfg, "pretrain").to(info.device)
    seed_everything(args.seed + info.rank)  # per-rank masks and drop-path

    dataset, source = pretraining_images(args.data_path, info, loader=pretrain_decoder(cfg), strict=args.strict_data)
    write_config(cfg, out_dir, info)

    batch = optim_cfg["batch_size"]
    lr = optim_cfg["base_lr"] * batch / 256
    groups = param_groups_weight_decay(model, optim_cfg["weight_decay"],
                                       no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg["betas"]))
    if info.is_main:
        print(f"model {cfg['model']['name']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"reversible={model.reversible}), {len(dataset)} training images in {source}, "
              f"lr {lr:.3g} (base {optim_cfg['base_lr']} x {batch}/256)")

    compile_if_asked(model, args, info)
    vis = None
    if info.is_main and train_cfg.get("vis_images", 0) > 0:
        vis = fixed_images(dataset, cfg["data"]["input_size"], train_cfg["vis_images"])
    trainer = PretrainTrainer(
        model=model, optimizer=optimizer, dataset=dataset, info=info, output_dir=out_dir,
        effective_batch=batch,
        micro_batch=train_cfg["batch_per_gpu"] if args.batch_per_gpu is None else args.batch_per_gpu,
        epochs=sched_cfg["epochs"], warmup_epochs=sched_cfg["warmup_epochs"], min_lr=sched_cfg["min_lr"],
        amp=train_cfg["amp"], num_workers=num_workers_default() if args.num_workers is None else args.num_workers,
        seed=args.seed, save_every=train_cfg["save_every"], log_every=train_cfg["log_every"],
        config=cfg, vis_images=vis, vis_every=train_cfg["vis_every"],
        keep_last=train_cfg["keep_last"], keep_every=train_cfg["keep_every"],
    )
    resume = find_resume_checkpoint(args.resume, out_dir, verbose=info.is_main)
    if resume:
        trainer.resume(resume)
        if args.init and info.is_main:
            print(f"--init {args.init} not applied: continuing the run from {resume}")
    elif args.init:
        try:  # every rank loads the same weights; the main one prints the report
            init_from_checkpoint(model, args.init, log=print if info.is_main else None)
        except (CheckpointError, ShapeMismatchError, FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--init: {e}") from None
    history = trainer.fit(stop_at_step=args.stop_at_step)
    return {"history": history, "output_dir": out_dir, "trainer": trainer}


if __name__ == "__main__":
    main()
