"""Classification fine-tuning and linear probing on top of :class:`revcolv2.trainer.Trainer`.

- :func:`load_pretrained`: a MIM (or earlier fine-tuning) checkpoint into a classifier,
  with a printed report; only pre-training-only tensors may be left unused.
- :class:`LinearProbe`: frozen backbone, head on the last level of the bottom-up columns
  (global average pool -> BatchNorm without affine -> Linear), as the paper's Table 5.
- :class:`ClassificationTrainer`: per-step loss with optional Mixup/CutMix, optional EMA,
  top-1/top-5 on the validation folder after every epoch, ``checkpoint-best.pth`` and
  ``checkpoint-last.pth``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .atomic_io import save_atomic
from .checkpoint import (
    PRETRAIN_ONLY_PREFIXES,
    CheckpointError,
    LoadReport,
    check_shapes,
    load_checkpoint,
    load_file,
    select_weights,
    strip_ddp_prefix,
)
from .evaluation import evaluate
from .run_checkpoints import read_best
from .trainer import Trainer

# Present in a classifier, absent from a MIM checkpoint (the MIM model has no classifier).
CLASSIFIER_ONLY_PREFIXES = ("head.", "fc_norm.")


class ClassMismatchError(SystemExit):
    """A classifier checkpoint trained on other classes than the data's. A ``SystemExit``:
    the tools stop with this one-line message (status 1), which names the file and both
    lists, instead of reporting a score of one set of classes measured on another."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _names(classes: Sequence[str], shown: int = 10) -> str:
    listed = list(classes)[:shown]
    return f"{len(classes)} classes {listed!r}" + (f" (first {shown} shown)" if len(classes) > shown else "")


def class_difference(recorded: Sequence[str], here: Sequence[str]) -> str:
    """'' when the two lists are equal; else the two lists (up to ten names each) and the
    first index at which they differ (a class index means that class of that list)."""
    recorded, here = list(recorded), list(here)
    if recorded == here:
        return ""
    first = next((i for i, (a, b) in enumerate(zip(recorded, here)) if a != b), min(len(recorded), len(here)))
    at = (f"first difference at index {first}: {recorded[first]!r} in the checkpoint, {here[first]!r} here"
          if first < min(len(recorded), len(here)) else f"the lists differ in length after index {first - 1}")
    return f"it was trained on {_names(recorded)}, the data has {_names(here)}; {at}"


def recorded_classes(checkpoint: Any) -> Optional[List[str]]:
    """The class names a classifier checkpoint of ours records (``classes``), or None."""
    classes = checkpoint.get("classes") if isinstance(checkpoint, dict) else None
    return [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None


def check_classes(checkpoint: Any, path: str, classes: Sequence[str], what: str, log=print) -> None:
    """Refuse (:class:`ClassMismatchError`) a checkpoint whose recorded class names are not
    ``classes``, in order; a checkpoint without names (written before they were recorded)
    passes with a note through ``log``."""
    recorded = recorded_classes(checkpoint)
    if recorded is None:
        if log is not None:
            log(f"note: {path} records no class names (written before checkpoints recorded them): its classifier "
                f"outputs are taken to be the data's {_names(classes)}, in this order")
        return
    difference = class_difference(recorded, classes)
    if difference:
        raise ClassMismatchError(f"{what} {path}: {difference}. Give the data it was trained on (or, to "
                                 "fine-tune it on these classes, --finetune, which leaves its classifier out)")


def load_pretrained(model: nn.Module, path: str, verbose: bool = True, ema: bool = True,
                    classes: Optional[Sequence[str]] = None) -> LoadReport:
    """Initialise ``model`` (a RevColV2 classifier) from a pre-training or fine-tuning checkpoint.

    The weights follow the one rule of :func:`revcolv2.checkpoint.select_weights`: the EMA
    weights where the checkpoint has them, unless ``ema=False`` (``--no-ema``); the choice is
    printed. Allowed to differ: the pre-training-only tensors (mask token, reconstruction
    head) and the levels the classifier does not build (``model.plan.pruned_prefixes()``) may stay
    unused, and the classifier (``head``, ``fc_norm``) may be missing; a classifier for
    another number of classes (e.g. IN-22K -> IN-1K) is dropped with a note, and so is one
    whose recorded class names (``classes`` of our checkpoints) are not ``classes``, the
    data's (both lists are printed). Every tensor left out is listed in the printed report.
    Anything else unmatched raises ``ValueError``.
    """
    if verbose:
        print(f"loading {path}")
    checkpoint = load_file(path)
    sd, _ = select_weights(checkpoint, ema=ema, source=path, log=print if verbose else None)
    own = model.state_dict()
    stale = [k for k in sd if k.startswith("head.") and (k not in own or own[k].shape != sd[k].shape)]
    if stale:
        if verbose:
            print(f"not loading the checkpoint's classifier ({', '.join(stale)}): other number of classes")
        sd = {k: v for k, v in sd.items() if k not in stale}
    head = [k for k in sd if k.startswith("head.") and k in own]
    recorded = recorded_classes(checkpoint)
    if head and classes is not None and recorded is not None and class_difference(recorded, classes):
        if verbose:
            print(f"not loading the checkpoint's classifier ({', '.join(head)}): "
                  f"{class_difference(recorded, classes)}")
        sd = {k: v for k, v in sd.items() if k not in head}
    elif head and classes is not None and recorded is None and verbose:
        print(f"note: {path} records no class names (written before checkpoints recorded them): its classifier is "
              f"loaded as one for the data's {_names(classes)}, in this order")
    plan = getattr(model, "plan", None)
    not_built = plan.pruned_prefixes() if plan is not None else ()
    left_out = [k for k in sd if k.startswith(not_built)]
    if verbose and left_out:
        n = sum(sd[k].numel() for k in left_out)
        print(f"not loading {len(left_out)} tensors ({n / 1e6:.1f}M parameters) of levels this model does not "
              f"build ({', '.join(p.rstrip('.') for p in not_built)}): no output of the classifier reads them")
    return load_checkpoint(model, sd, allow_missing=CLASSIFIER_ONLY_PREFIXES,
                           allow_unexpected=PRETRAIN_ONLY_PREFIXES + not_built, verbose=verbose, source=path)


def describe_built_levels(model: nn.Module) -> str:
    """One line on the levels ``model`` does not build (a classifier reads the top level only),
    or '' when it builds every level."""
    plan = getattr(model, "plan", None)
    pruned = plan.pruned_levels() if plan is not None else []
    if not pruned:
        return ""
    where = ", ".join(f"columns.{j}.levels.{l}" for j, l in pruned)
    n = sum(p.numel() for p in model.parameters())
    return (f"model: {n / 1e6:.1f}M parameters; not built, as no output reads them: {where} "
            "(every built parameter is trained; DDP needs no find_unused_parameters)")


class LinearProbe(nn.Module):
    """Frozen RevColV2 + trainable head on the last level of the bottom-up columns.

    Only the BU columns run (the TD columns do not feed this head). The backbone stays in
    eval mode whatever ``train()`` says: no drop path, no statistics to update.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        dim = backbone.embed_dim
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # MAE linear probing
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Global average of the last BU level, (B, D); the TD columns do not run."""
        return self.backbone.forward_bottom_up(x)[-1].mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).float())


class ClassificationTrainer(Trainer):
    """Fine-tuning / linear probing loop with evaluation after every epoch."""

    def __init__(self, *, val_dataset, criterion: nn.Module, mixup: Optional[Callable] = None,
                 ema: Optional[nn.Module] = None, eval_batch: int = 128, **kwargs):
        super().__init__(**kwargs)
        self.val_dataset = val_dataset
        # recorded in every checkpoint (best, last, on a stop) and checked by whatever reads its head
        self.classes = [str(c) for c in getattr(val_dataset, "classes", [])]
        self.criterion = criterion
        self.mixup = mixup
        self.ema = ema
        self.eval_batch = eval_batch
        # a checkpoint-best.pth already in the folder (an earlier run) is replaced only by a better model
        self.best: Dict[str, Any] = read_best(self.output_dir) or {"top1": -1.0}

    def forward_loss(self, batch) -> Tensor:
        images, target = batch
        images = images.to(self.info.device, non_blocking=True)
        target = target.to(self.info.device, non_blocking=True)
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        return self.criterion(self.ddp_model(images), target)

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def evaluate(self) -> Dict[str, float]:
        metrics = {}
        models = [("", self.model)] + ([("ema_", self.ema.module)] if self.ema is not None else [])
        for prefix, m in models:
            m.eval()
            r = evaluate(m, self.val_dataset, self.info, self.eval_batch, self.num_workers, self.autocast)
            metrics.update({prefix + k: v for k, v in r.items()})
        self.model.train()
        return metrics

    def end_of_epoch(self, epoch: int) -> Dict[str, float]:
        metrics = self.evaluate()
        best_key = "ema_top1" if self.ema is not None and metrics["ema_top1"] > metrics["top1"] else "top1"
        if metrics[best_key] > self.best["top1"]:
            self.best = {"top1": metrics[best_key], "epoch": epoch + 1, "weights": best_key.replace("top1", "model")}
            state = {"model": self.model.state_dict(), "epoch": epoch + 1, "metrics": metrics, "config": self.config,
                     "classes": self.classes}
            if self.ema is not None:
                state["model_ema"] = self.ema.module.state_dict()
            if self.info.is_main:
                save_atomic(state, os.path.join(self.output_dir, "checkpoint-best.pth"))
        if self.info.is_main:
            ema = f", EMA top-1 {metrics['ema_top1']:.2f}" if self.ema is not None else ""
            print(f"epoch {epoch + 1}: val top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}{ema} "
                  f"(best {self.best['top1']:.2f} at epoch {self.best['epoch']})")
        return dict(metrics, best_top1=self.best["top1"])

    def save_epoch_checkpoint(self, epochs_done: int) -> bool:
        self.save("checkpoint-last.pth")
        return True

    def extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"best": self.best, "classes": self.classes}
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def _check_resumable(self, ckpt: Dict[str, Any], path: str, changed: List[str]) -> None:
        recorded = recorded_classes(ckpt)
        if recorded is not None and class_difference(recorded, self.classes):
            raise ClassMismatchError(f"cannot resume {path}: {class_difference(recorded, self.classes)}. Resume on "
                                     "the data it was trained on")
        super()._check_resumable(ckpt, path, changed)

    def load_extra_state(self, ckpt: Dict[str, Any]) -> None:
        self.best = ckpt.get("best", self.best)
        if self.ema is not None and "model_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["model_ema"])


def evaluate_checkpoint(model: nn.Module, path: str, val_dataset, info, batch: int, num_workers: int,
                        autocast, ema: bool = True) -> List[Dict[str, float]]:
    """``--eval``: top-1/top-5 of a checkpoint's weights, and of its EMA weights if it has them
    (unless ``ema=False``). Each result names the weights it measured. A checkpoint whose
    recorded class names are not ``val_dataset.classes`` is refused naming both lists
    (:class:`ClassMismatchError`); one without names is measured, with a note."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint")
    check_classes(ckpt, path, [str(c) for c in val_dataset.classes], "--eval of",
                  log=print if info.is_main else None)
    keys = [k for k in ("model", "model_ema") if isinstance(ckpt.get(k), dict) and (ema or k == "model")]
    if not keys:  # a raw or otherwise wrapped state dict
        sd, key = select_weights(ckpt, ema=ema, source=path, log=None)
        weights = [(key, sd)]
    else:
        weights = [(k, strip_ddp_prefix(ckpt[k], path)) for k in keys]
    results = []
    own = model.state_dict()
    for key, sd in weights:
        check_shapes(sd, own, path)
        model.load_state_dict(sd)
        model.eval()
        r = evaluate(model, val_dataset, info, batch, num_workers, autocast)
        r["weights"] = key
        results.append(r)
        if info.is_main:
            print(f"{path} [{key}]: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  loss {r['loss']:.4f} "
                  f"on {len(val_dataset)} images")
    return results
