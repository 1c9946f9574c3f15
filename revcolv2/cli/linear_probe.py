"""Linear probing of a MIM-pre-trained RevColV2 (paper Table 5, MAE's protocol).

The backbone is frozen; the head (global average pool -> BatchNorm without affine ->
Linear) sits on the last level of the bottom-up columns and is trained with LARS.

    torchrun --nproc_per_node 8 tools/linear_probe.py --config configs/linear_probe/revcolv2_base.yaml \\
        --data-path /data/imagenet --finetune output/pretrain/revcolv2_base/checkpoint-1600.pth
    python tools/linear_probe.py --config configs/linear_probe/revcolv2_tiny_demo.yaml \\
        --finetune output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth
"""
from __future__ import annotations

from typing import List, Optional

import torch
from timm.data import create_transform
from timm.optim import Lars

from ..classification import ClassificationTrainer, LinearProbe, load_pretrained
from ..config import SCHEDULE, number, whole, write_config
from ..data import IMAGENET_MEAN, IMAGENET_STD, RobustImageFolder, prepare_data_root
from ..rng import seed_everything
from ..run_dir import claim_output_dir
from .common import (
    CLASSIFICATION_DATA,
    CLASSIFICATION_MODEL,
    CLASSIFICATION_TRAIN,
    build_model,
    checked_train_split,
    compile_if_asked,
    evaluate_only,
    resume_and_fit,
    start_classification,
)

# every key of a linear-probing recipe, its type and range: checked before anything runs
SCHEMA = {
    "model": CLASSIFICATION_MODEL,
    "data": CLASSIFICATION_DATA,
    "optim": {"base_lr": number(above=0), "weight_decay": number(low=0), "momentum": number(low=0, below=1),
              "trust_coeff": number(above=0), "batch_size": whole(1)},
    "schedule": SCHEDULE,
    "train": CLASSIFICATION_TRAIN,
}


def main(argv: Optional[List[str]] = None) -> dict:
    args, cfg, info, out_dir = start_classification(argv, __doc__, "linear_probe", SCHEMA)
    m_cfg, d_cfg, o_cfg, s_cfg, t_cfg = cfg["model"], cfg["data"], cfg["optim"], cfg["schedule"], cfg["train"]

    root = prepare_data_root(args.data_path, info)
    common = dict(input_size=d_cfg["input_size"], interpolation=d_cfg["interpolation"],
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
    # RandomResizedCrop + flip only (MAE linear probing): no colour jitter, no RandAugment
    train_tf = create_transform(is_training=True, scale=tuple(d_cfg["crop_scale"]), color_jitter=None, **common)
    val_tf = create_transform(is_training=False, crop_pct=d_cfg["crop_pct"], **common)
    val_set = RobustImageFolder(str(root / "val"), transform=val_tf, strict=args.strict_data)
    num_classes = m_cfg.get("num_classes") or len(val_set.classes)

    seed_everything(args.seed)
    backbone = build_model(cfg, "linear_probe")
    if args.finetune and not args.eval:
        load_pretrained(backbone, args.finetune, verbose=info.is_main, ema=not args.no_ema)
    elif not args.eval and info.is_main:
        print("warning: no --finetune checkpoint: probing a randomly initialised backbone")
    model = LinearProbe(backbone, num_classes)
    if info.enabled and info.device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    seed_everything(args.seed + info.rank)

    if args.eval:
        return evaluate_only(model, args, cfg, out_dir, val_set, info)

    train_set = checked_train_split(root, train_tf, val_set, args.strict_data)
    with claim_output_dir(out_dir, args.resume, args.overwrite, info):  # locked until training ends
        write_config(cfg, out_dir, info)
        batch = o_cfg["batch_size"]
        lr = o_cfg["base_lr"] * batch / 256
        linear = model.head[1]
        # MAE's LARS: weight decay and trust-ratio adaptation for matrices, neither for biases
        optimizer = Lars(
            [{"params": [linear.weight], "weight_decay": o_cfg["weight_decay"], "always_adapt": True},
             {"params": [linear.bias], "weight_decay": 0.0, "always_adapt": False}],
            lr=lr, momentum=o_cfg["momentum"], trust_coeff=o_cfg["trust_coeff"],
        )
        compile_if_asked(model, args, info)
        if info.is_main:
            print(f"linear probe of {m_cfg['name']} ({num_classes} classes), {len(train_set)} train / "
                  f"{len(val_set)} val images, LARS lr {lr:.3g} (base {o_cfg['base_lr']} x {batch}/256)")
        trainer = ClassificationTrainer(
            model=model, optimizer=optimizer, dataset=train_set, info=info, output_dir=out_dir,
            effective_batch=batch,
            micro_batch=t_cfg["batch_per_gpu"] if args.batch_per_gpu is None else args.batch_per_gpu,
            epochs=s_cfg["epochs"], warmup_epochs=s_cfg["warmup_epochs"], min_lr=s_cfg["min_lr"],
            amp=t_cfg["amp"], num_workers=args.num_workers, seed=args.seed, log_every=t_cfg["log_every"],
            config=cfg, name="linear_probe",
            val_dataset=val_set, criterion=torch.nn.CrossEntropyLoss(), eval_batch=t_cfg["eval_batch"],
        )
        return resume_and_fit(trainer, args, out_dir, info)


if __name__ == "__main__":
    main()
