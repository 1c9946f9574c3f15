#!/usr/bin/env python
"""Train / evaluate a RevColV2 detectron2 LazyConfig, the way detectron2 users know it.

    python tools/lazyconfig_train_net.py --config-file projects/RevColV2/configs/COCO/mask_rcnn_revcolv2_b_50ep.py
    python tools/lazyconfig_train_net.py --config-file CFG --num-gpus 8 train.amp.precision=bf16
    python tools/lazyconfig_train_net.py --config-file CFG --resume          # continue from output_dir
    python tools/lazyconfig_train_net.py --config-file CFG --eval-only train.init_checkpoint=model.pth

Besides detectron2's own tool: RevColV2 checkpoints (MIM or classification) load through
``train.init_checkpoint`` (their EMA weights where they have them, unless ``--no-ema``);
no file is loaded in a way that can run code (checkpoints with ``weights_only``, ``.pkl``
with a restricted unpickler, YAML configs with a safe loader; ``.py`` configs are code);
checkpoints are written atomically; ``train.amp.precision`` picks bf16 or fp16 (mixed
precision is switched off on CPU); the project's built-in datasets are registered.
"""
import json
import logging
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "projects", "RevColV2")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.engine import (  # noqa: E402
    AMPTrainer,
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model  # noqa: E402
from detectron2.evaluation import inference_on_dataset, print_csv_format  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from revcolv2_d2.checkpoint import RevColV2Checkpointer  # noqa: E402
from revcolv2_d2.safe_config import load_lazy_config  # noqa: E402
from revcolv2_d2.data import register_all  # noqa: E402

logger = logging.getLogger("detectron2")

PRECISIONS = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    if comm.is_main_process() and cfg.train.get("output_dir"):
        # the latest evaluation, machine-readable (also in metrics.json when training)
        os.makedirs(cfg.train.output_dir, exist_ok=True)
        with open(os.path.join(cfg.train.output_dir, "last_eval.json"), "w") as f:
            json.dump(ret, f, indent=1)
    return ret


def _amp_settings(cfg):
    """(enabled, dtype): AMP only on CUDA, with the precision the config asks for."""
    amp = cfg.train.get("amp", {})
    enabled = bool(amp.get("enabled", False))
    precision = str(amp.get("precision", "bf16")).lower()
    if precision not in PRECISIONS:
        raise ValueError(f"train.amp.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if enabled and not str(cfg.train.device).startswith("cuda"):
        logger.info("Mixed precision switched off: train.device=%s is not CUDA", cfg.train.device)
        enabled = False
    return enabled, PRECISIONS[precision]


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    amp_enabled, amp_dtype = _amp_settings(cfg)
    if amp_enabled:
        # fp16 needs loss scaling; bf16 has fp32's range and needs none
        grad_scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        trainer = AMPTrainer(model, train_loader, optim, grad_scaler=grad_scaler, precision=amp_dtype)
    else:
        trainer = SimpleTrainer(model, train_loader, optim)
    checkpointer = RevColV2Checkpointer(model, cfg.train.output_dir, ema=not args.no_ema, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if comm.is_main_process()
            else None,
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    register_all()
    cfg = load_lazy_config(args.config_file)  # YAML: plain data only (detectron2 would unsafe_load it)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if str(cfg.train.get("device", "cuda")).startswith("cuda") and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    default_setup(cfg, args)

    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        # train.init_checkpoint, or with --resume the last checkpoint in train.output_dir
        RevColV2Checkpointer(model, cfg.train.output_dir, ema=not args.no_ema).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, model)
    do_train(args, cfg)


def invoke_main() -> None:
    parser = default_argument_parser()
    parser.add_argument("--no-ema", action="store_true",
                        help="from a checkpoint with EMA weights (model_ema), take the raw ones ('model')")
    args = parser.parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
