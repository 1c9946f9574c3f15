"""What the three training entry points share: one argument parser and one
``build_model(cfg)``; fine-tuning and linear probing also share their start, ``--eval`` and
the resume-then-train end."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
from torch import nn
from torchvision.datasets import ImageFolder

from ..amp import autocast
from ..classification import evaluate_checkpoint
from ..config import (
    AMP,
    load_config,
    mapping,
    nonneg_int,
    number,
    numbers,
    optional,
    positive_int,
    text,
    validate_config,
    whole,
)
from ..data import RobustImageFolder, check_same_classes, num_workers_default
from ..distributed import DistInfo, init_distributed
from ..mim import create_mim_model  # its import of revcolv2.model registers the presets with timm
from ..model import MODEL_CFGS, allow_level_recompiles, compile_for_training
from ..run_checkpoints import find_resume_checkpoint

TASKS = ("pretrain", "finetune", "linear_probe")
# the B recipe of each task, named in --help
EXAMPLE_CONFIGS = {"pretrain": "configs/pretrain/revcolv2_base.yaml",
                   "finetune": "configs/finetune/revcolv2_base_in1k.yaml",
                   "linear_probe": "configs/linear_probe/revcolv2_base.yaml"}

# the keys that fine-tuning and linear probing share: model name and size, data, schedule, run-time
CLASSIFICATION_MODEL = {"name": text(*MODEL_CFGS), "num_classes": optional(whole(1)), "kwargs": mapping()}
CLASSIFICATION_DATA = {"input_size": whole(1), "crop_scale": numbers(2, above=0, high=1),
                       "interpolation": text("bicubic", "bilinear", "nearest", "random"),
                       "crop_pct": number(above=0, high=1)}
CLASSIFICATION_TRAIN = {"batch_per_gpu": whole(1), "eval_batch": whole(1), "amp": AMP, "log_every": whole(1)}


def training_parser(description: str, task: str) -> argparse.ArgumentParser:
    """The command line of ``tools/{pretrain,finetune,linear_probe}.py``.

    Every task takes the config, data, output folder, resume / overwrite, batch, loader,
    device, seed, early stop and override options; fine-tuning and linear probing add
    ``--finetune`` (the checkpoint to start from), ``--no-ema`` and ``--eval``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML recipe, e.g. {EXAMPLE_CONFIGS[task]}")
    p.add_argument("--data-path", default=None,
                   help="a folder of images, searched recursively (no class folders needed), a text file with one "
                        "image path a line, or an ImageNet-style folder (train/<class>/*); default: the built-in "
                        "synthetic dataset" if task == "pretrain" else
                        "ImageNet-style folder with train/<class>/* and val/<class>/*; default: the built-in "
                        "synthetic dataset")
    p.add_argument("--output-dir", default=None, help=f"default: output/{task}/<config name>")
    if task == "pretrain":
        p.add_argument("--init", default=None, metavar="CKPT",
                       help="start a new run from this checkpoint's weights, with a fresh optimizer and schedule: a "
                            "MIM checkpoint gives encoder and decoder; a fine-tuned or detectron2 checkpoint gives "
                            "what matches (the report lists what is left out). Not applied when --resume finds a "
                            "checkpoint")
    if task != "pretrain":
        p.add_argument("--finetune", default=None,
                       help="the pre-trained (MIM) checkpoint to probe" if task == "linear_probe" else
                       "initialise from this pre-training (MIM) or fine-tuning checkpoint; "
                       "omit for random init (supervised baseline)")
        p.add_argument("--no-ema", action="store_true", help="from a checkpoint with EMA weights (model_ema), "
                       "take the raw ones ('model'); --eval then measures only those")
        p.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start from step 0 in an --output-dir that holds a run, deleting its checkpoints")
    p.add_argument("--batch-per-gpu", type=positive_int, default=None, help="micro-batch per process "
                   "(default: train.batch_per_gpu of the config); accumulation makes up the rest")
    p.add_argument("--num-workers", type=nonneg_int, default=None)
    p.add_argument("--strict-data", action="store_true", help="fail on unreadable images instead of skipping them")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training: compile_levels() (each level's F_l) when it is "
                        "reversible, the whole model when it is plain; the first steps are slow while it compiles")
    p.add_argument("--stop-at-step", type=positive_int, default=None,
                   help="stop after this many optimizer steps with a resumable checkpoint (as on Ctrl-C)")
    p.add_argument("--opts", nargs="*", default=[], help="config overrides, e.g. schedule.epochs=10")
    return p


def build_model(cfg: dict, task: str, num_classes: Optional[int] = None) -> nn.Module:
    """The model a recipe's ``model`` section describes, built through the one factory.

    - ``pretrain``: the MIM model (``create_mim_model``);
    - ``finetune``: a classifier with ``num_classes`` outputs, drop path, head init scale;
    - ``linear_probe``: the headless, non-reversible backbone the probe sits on.
    """
    m, size, kwargs = cfg["model"], cfg["data"]["input_size"], cfg["model"].get("kwargs") or {}
    if task == "pretrain":
        return create_mim_model(
            m["name"], img_size=size, reversible=m["reversible"], mask_ratio=m["mask_ratio"],
            norm_pix_loss=m["norm_pix_loss"], drop_path_rate=m["drop_path_rate"], **kwargs,
        )
    if task == "finetune":
        return timm.create_model(
            m["name"], num_classes=num_classes, drop_path_rate=m["drop_path_rate"],
            head_init_scale=m["head_init_scale"], reversible=m["reversible"], img_size=size, **kwargs,
        )
    if task == "linear_probe":
        return timm.create_model(m["name"], num_classes=0, reversible=False, img_size=size, **kwargs)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def compile_if_asked(model: nn.Module, args: argparse.Namespace, info: DistInfo) -> None:
    """``--compile``: :func:`revcolv2.model.compile_for_training` on ``model``, after the
    recompile limit that ``compile_levels()`` needs is raised (a process-wide switch: the
    entry point's to set). Call it once the model is complete and copied (EMA)."""
    if not args.compile:
        return
    allow_level_recompiles()
    for line in compile_for_training(model):
        if info.is_main:
            print(f"--compile: {line}")


def start_classification(argv: Optional[List[str]], description: str, task: str, schema: Dict[str, Any]
                         ) -> Tuple[argparse.Namespace, dict, DistInfo, str]:
    """The start of fine-tuning or linear probing: the parsed command line (``--num-workers``
    filled with the machine's default), the recipe (every value checked against the tool's
    ``schema`` before anything runs),
    the process group, and the output folder (``--output-dir``, default
    ``output/<task>/<config name>``)."""
    args = training_parser(description, task).parse_args(argv)
    if args.num_workers is None:
        args.num_workers = num_workers_default()
    cfg = load_config(args.config, args.opts)
    validate_config(cfg, schema, args.config)
    info = init_distributed(args.device)
    out_dir = args.output_dir or os.path.join("output", task, Path(args.config).stem)
    return args, cfg, info, out_dir


def evaluate_only(model: nn.Module, args: argparse.Namespace, cfg: dict, out_dir: str, val_set: ImageFolder,
                  info: DistInfo) -> Dict[str, Any]:
    """``--eval``: top-1/top-5 of the ``--resume`` checkpoint (a path, or ``auto`` for the latest
    in ``out_dir``) on ``val_set``, with its EMA weights unless ``--no-ema``; in bf16 when the
    recipe trains in bf16, else fp32."""
    ckpt = find_resume_checkpoint(args.resume, out_dir, verbose=info.is_main)
    if ckpt is None:
        raise SystemExit("--eval needs a checkpoint: --resume PATH (or auto with an existing run)")
    t_cfg = cfg["train"]
    amp = t_cfg["amp"] if t_cfg["amp"] == "bf16" else None  # evaluation: bf16 or fp32
    return {"results": evaluate_checkpoint(model, ckpt, val_set, info, t_cfg["eval_batch"], args.num_workers,
                                           lambda: autocast(info.device, amp), ema=not args.no_ema)}


def checked_train_split(root: Path, transform, val_set: ImageFolder, strict: bool) -> RobustImageFolder:
    """``root/train``, whose class folders must be the validation split's (scores are by
    class index); ``strict`` fails on unreadable images instead of skipping them."""
    train_set = RobustImageFolder(str(root / "train"), transform=transform, strict=strict)
    check_same_classes(train_set, val_set)
    return train_set


def resume_and_fit(trainer, args: argparse.Namespace, out_dir: str, info: DistInfo) -> Dict[str, Any]:
    """Continue ``trainer`` from ``--resume`` when given, train to the end of the schedule (or
    ``--stop-at-step``); returns the history, the output folder, the trainer and its best
    evaluation."""
    resume = find_resume_checkpoint(args.resume, out_dir, verbose=info.is_main)
    if resume:
        trainer.resume(resume)
    history = trainer.fit(stop_at_step=args.stop_at_step)
    return {"history": history, "output_dir": out_dir, "trainer": trainer, "best": trainer.best}
