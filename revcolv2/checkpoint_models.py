"""Models built from, or started from, any checkpoint of the project.

One reading of a checkpoint for the tools that look inside one or continue from one:
MIM pre-training, fine-tuning and linear-probe checkpoints of ``tools/*.py`` (their
``config`` names the preset and its size overrides), raw RevColV2 state dicts, and
detectron2 checkpoints of ``projects/RevColV2`` (the RevColV2 model below their
``backbone.bottom_up.net.`` / ``backbone.net.`` prefix, found by the patch embedding's key,
:func:`revcolv2.export.backbone_state_dict`; they record their preset too). Files are read
with the project's safe loader, and the weights follow its one rule (EMA where present,
unless ``ema=False``).

- :func:`init_from_checkpoint`: ``tools/pretrain.py --init``, a new pre-training run
  starting from a checkpoint's weights, with a report of what was loaded and left out.
- :func:`mim_model_from_checkpoint`: the MIM model of a pre-training checkpoint, with its
  reconstruction head (``tools/reconstruct.py``).
- :func:`revcolv2.export.model_from_checkpoint` (used by ``tools/analyze_levels.py``): the
  RevColV2 model any checkpoint holds, with the levels it has.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

from .checkpoint import (
    PRETRAIN_ONLY_PREFIXES,
    CheckpointError,
    LoadReport,
    check_shapes,
    group_keys,
    load_checkpoint,
    load_file,
    select_weights,
)
from .export import backbone_state_dict
from .mim import RevColV2MIM, create_mim_model

__all__ = ["init_from_checkpoint", "mim_model_from_checkpoint", "recorded_config"]


def recorded_config(checkpoint: Any) -> Dict[str, Any]:
    """The ``config`` a training checkpoint of ours recorded ({} when none)."""
    cfg = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return cfg if isinstance(cfg, dict) else {}


def init_from_checkpoint(model: nn.Module, path: str, ema: bool = True,
                         log: Optional[Callable[[str], None]] = print) -> LoadReport:
    """Load the weights of the checkpoint ``path`` that fit ``model`` (a MIM model) and
    report the rest.

    A MIM checkpoint of the same size fills every tensor (encoder, mask token, decoder).
    A fine-tuning checkpoint gives the columns it holds (a classifier has no levels 0-2 in
    its last column), a detectron2 checkpoint its backbone; the mask token and decoder then
    keep their initial values. Left out and listed: tensors the model does not have (a
    classifier's head, detectron2's pyramid, FPN and heads). A tensor of another shape (a
    checkpoint of another size) is a :class:`~revcolv2.checkpoint.ShapeMismatchError`
    naming it.
    """
    checkpoint = load_file(path)
    full, taken = select_weights(checkpoint, ema=ema, source=path, log=log)
    try:
        sd, prefix = backbone_state_dict(full)
    except ValueError as e:
        raise CheckpointError(f"{path}: not a RevColV2 checkpoint ({e})") from None
    own = model.state_dict()
    check_shapes(sd, own, path)
    report = LoadReport(loaded=[k for k in own if k in sd], missing=[k for k in own if k not in sd],
                        unexpected=[k for k in sd if k not in own] + [k for k in full if not k.startswith(prefix)])
    if not report.loaded:
        raise CheckpointError(f"{path}: none of its tensors fits the model")
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    if log is not None:
        where = f" (the RevColV2 model below '{prefix}')" if prefix else ""
        log(f"--init {path}{where}: loaded {len(report.loaded)} of the model's {len(own)} tensors")
        if report.missing:
            log(f"  not in the checkpoint, left at their initial values ({len(report.missing)}): "
                f"{group_keys(report.missing)}")
        if report.unexpected:
            log(f"  in the checkpoint, left out ({len(report.unexpected)}): {group_keys(report.unexpected)}")
        log("  a new run: fresh optimizer, schedule from step 0")
    return report


def mim_model_from_checkpoint(path: str, ema: bool = True, verbose: bool = True
                              ) -> Tuple[RevColV2MIM, Dict[str, Any]]:
    """The MIM model of a pre-training checkpoint, every tensor loaded (eval mode), and the
    checkpoint's recorded config. Its preset, size overrides, input size and loss
    (normalized pixels or not) come from that config; a checkpoint without a reconstruction
    head (fine-tuned, detectron2) is a :class:`~revcolv2.checkpoint.CheckpointError`."""
    checkpoint = load_file(path)
    cfg = recorded_config(checkpoint)
    m = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    full, _ = select_weights(checkpoint, ema=ema, source=path, log=print if verbose else None)
    if not any(k.startswith(PRETRAIN_ONLY_PREFIXES) for k in full) or not m.get("name"):
        raise CheckpointError(f"{path} is not a MIM pre-training checkpoint (no reconstruction head, or no "
                              "recorded model): reconstructions need one written by tools/pretrain.py")
    size = int((cfg.get("data") or {}).get("input_size", 224))
    model = create_mim_model(m["name"], img_size=size, reversible=False, mask_ratio=m.get("mask_ratio", 0.75),
                             norm_pix_loss=m.get("norm_pix_loss", True), **(m.get("kwargs") or {}))
    load_checkpoint(model, full, verbose=False, source=os.fspath(path))  # every tensor must match
    return model.eval(), cfg
