"""Optimizer parameter groups (layer-wise lr decay, no decay on norms / biases) and the
per-step cosine schedule."""
from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import nn

from .layer_decay import lr_scale


def no_weight_decay(name: str, param: torch.Tensor, skip: Iterable[str]) -> bool:
    """Norm weights, biases and the names in ``skip`` (alphas, mask token) are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or name in set(skip)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float,
                             skip: Iterable[str] = ()) -> List[dict]:
    """Parameter groups keyed by (layer id, decay / no decay) under the one shared rule.

    Each group carries ``lr_scale = layer_decay ** (max_id + 1 - id)``
    (``revcolv2.layer_decay.lr_scale``), which timm's schedulers multiply into the lr.
    Frozen parameters are left out.
    """
    skip = set(skip)
    groups: Dict[tuple, dict] = {}
    cfg = (model.num_levels, model.blocks_per_level, model.num_bu_columns, model.num_td_columns)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = model.layer_id(name)
        decay = not no_weight_decay(name, p, skip)
        key = (lid, decay)
        if key not in groups:
            groups[key] = {
                "params": [], "param_names": [], "layer_id": lid,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": lr_scale(name, layer_decay, *cfg),
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float = 0.0):
    """Linear warm-up then half-cosine, updated every optimizer step (timm's CosineLRScheduler)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False,
    )
