"""Classification fine-tuning of RevColV2 (paper Tables 2-4 and the supervised baseline).

    # IN-1K after MIM (Table 3)
    torchrun --nproc_per_node 8 tools/finetune.py --config configs/finetune/revcolv2_base_in1k.yaml \\
        --data-path /data/imagenet --finetune output/pretrain/revcolv2_base/checkpoint-1600.pth
    # CPU demo on the built-in data, from the tiny MIM demo checkpoint
    python tools/finetune.py --config configs/finetune/revcolv2_tiny_demo.yaml \\
        --finetune output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth
    # evaluate a checkpoint only
    python tools/finetune.py --config ... --eval --resume output/finetune/.../checkpoint-best.pth

Top-1/top-5 on ``<data>/val`` after every epoch; ``checkpoint-best.pth`` and
``checkpoint-last.pth`` in the output folder; ``--resume auto`` continues the last one.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from ..classification import ClassificationTrainer, describe_built_levels, load_pretrained
from ..config import SCHEDULE, flag, number, numbers, optional, text, whole, write_config
from ..data import IMAGENET_MEAN, IMAGENET_STD, RobustImageFolder, pillow_safe_randaugment, prepare_data_root
from ..optim import param_groups_layer_decay
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

# every key of a fine-tuning recipe, its type and range: checked before anything runs
SCHEMA = {
    "model": {**CLASSIFICATION_MODEL, "reversible": flag(), "drop_path_rate": number(low=0, below=1),
              "head_init_scale": number(above=0)},
    "data": {**CLASSIFICATION_DATA, "auto_augment": optional(text()), "re_prob": number(low=0, high=1)},
    "mixup": {"mixup": number(low=0), "cutmix": number(low=0), "label_smoothing": number(low=0, below=1)},
    "optim": {"betas": numbers(2, low=0, below=1), "base_lr": number(above=0), "weight_decay": number(low=0),
              "layer_decay": number(above=0, high=1), "batch_size": whole(1), "clip_grad": optional(number(above=0))},
    "schedule": SCHEDULE,
    "ema": {"decay": optional(number(low=0, below=1))},
    "train": CLASSIFICATION_TRAIN,
}


def build_transforms(cfg: dict):
    d = cfg["data"]
    common = dict(input_size=d["input_size"], interpolation=d["interpolation"], mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = create_transform(is_training=True, scale=tuple(d["crop_scale"]), auto_augment=d["auto_augment"],
                             re_prob=d["re_prob"], re_mode="pixel", re_count=1, **common)
    val = create_transform(is_training=False, crop_pct=d["crop_pct"], **common)
    return pillow_safe_randaugment(train), val


def main(argv: Optional[List[str]] = None) -> dict:
    args, cfg, info, out_dir = start_classification(argv, __doc__, "finetune", SCHEMA)
    m_cfg, o_cfg, s_cfg, t_cfg, mix_cfg = cfg["model"], cfg["optim"], cfg["schedule"], cfg["train"], cfg["mixup"]

    root = prepare_data_root(args.data_path, info)
    train_tf, val_tf = build_transforms(cfg)
    val_set = RobustImageFolder(str(root / "val"), transform=val_tf, strict=args.strict_data)
    num_classes = m_cfg.get("num_classes") or len(val_set.classes)

    seed_everything(args.seed)
    model = build_model(cfg, "finetune", num_classes)
    if args.finetune and not args.eval:
        load_pretrained(model, args.finetune, verbose=info.is_main, ema=not args.no_ema, classes=val_set.classes)
    model.to(info.device)
    seed_everything(args.seed + info.rank)

    if args.eval:
        return evaluate_only(model, args, cfg, out_dir, val_set, info)

    train_set = checked_train_split(root, train_tf, val_set, args.strict_data)
    if len(train_set.classes) != num_classes:
        raise ValueError(f"model.num_classes is {num_classes} but {root / 'train'} has "
                         f"{len(train_set.classes)} class folders")
    with claim_output_dir(out_dir, args.resume, args.overwrite, info):  # locked until training ends
        write_config(cfg, out_dir, info)

        batch = o_cfg["batch_size"]
        lr = o_cfg["base_lr"] * batch / 256
        built = describe_built_levels(model)
        if info.is_main and built:
            print(built)
        groups = param_groups_layer_decay(model, o_cfg["weight_decay"], o_cfg["layer_decay"], model.no_weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(o_cfg["betas"]))

        mixup = None
        if mix_cfg["mixup"] > 0 or mix_cfg["cutmix"] > 0:
            mixup = Mixup(mixup_alpha=mix_cfg["mixup"], cutmix_alpha=mix_cfg["cutmix"],
                          label_smoothing=mix_cfg["label_smoothing"], num_classes=num_classes)
            criterion = SoftTargetCrossEntropy()
        elif mix_cfg["label_smoothing"] > 0:
            criterion = LabelSmoothingCrossEntropy(mix_cfg["label_smoothing"])
        else:
            criterion = torch.nn.CrossEntropyLoss()
        ema = ModelEmaV3(model, decay=cfg["ema"]["decay"]) if cfg["ema"]["decay"] else None
        compile_if_asked(model, args, info)  # after the EMA copy, which stays eager
        if info.is_main:
            print(f"model {m_cfg['name']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                  f"{num_classes} classes, reversible={model.reversible}), {len(train_set)} train / "
                  f"{len(val_set)} val images in {root}, lr {lr:.3g} (base {o_cfg['base_lr']} x {batch}/256), "
                  f"layer decay {o_cfg['layer_decay']}, mixup {'on' if mixup else 'off'}, "
                  f"EMA {cfg['ema']['decay'] or 'off'}")

        micro = t_cfg["batch_per_gpu"] if args.batch_per_gpu is None else args.batch_per_gpu
        if mixup is not None and micro % 2:
            raise ValueError("Mixup/CutMix needs an even batch per process")
        trainer = ClassificationTrainer(
            model=model, optimizer=optimizer, dataset=train_set, info=info, output_dir=out_dir,
            effective_batch=batch, micro_batch=micro, epochs=s_cfg["epochs"], warmup_epochs=s_cfg["warmup_epochs"],
            min_lr=s_cfg["min_lr"], amp=t_cfg["amp"], num_workers=args.num_workers, seed=args.seed,
            log_every=t_cfg["log_every"], clip_grad=o_cfg.get("clip_grad"), config=cfg, name="finetune",
            # the levels that do not feed the top-level classifier are frozen above
            find_unused_parameters=False,
            val_dataset=val_set, criterion=criterion, mixup=mixup, ema=ema, eval_batch=t_cfg["eval_batch"],
        )
        return resume_and_fit(trainer, args, out_dir, info)


if __name__ == "__main__":
    main()
