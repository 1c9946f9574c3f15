"""Parameter and FLOP counts with fvcore, in the paper's convention (1 multiply-add = 1 FLOP)."""
from __future__ import annotations

from typing import Any, List

import torch
from torch import nn


def _sdpa_flop(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: Q K^T plus attn V multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, nq, d = q
    nk, dv = k[-2], v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * nq * nk * (d + dv)


class _EveryOutput(nn.Module):
    """Returns the logits and the newest value of every level.

    A model that builds every level (``out_levels='all'``) runs all of them although its
    classifier reads only the top one; tracing ``model(x)`` alone would drop the rest as
    dead code and under-count.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        levels, _ = self.model.forward_levels(x)
        return (self.model.forward_head(levels[-1]), *levels)


def count_flops(model: nn.Module, img_size=(224, 224), in_chans: int = 3) -> float:
    """GFLOPs of one eager forward at batch 1 (eval mode, no masking), fvcore convention.

    Every block the model builds counts: for a RevColV2 built with ``out_levels='all'`` all
    levels of every column (the paper's count); for a classifier (the default
    ``out_levels='top'``) what its forward runs, without the levels that cannot reach the
    top one, which it does not build.
    """
    from fvcore.nn import FlopCountAnalysis

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, h, w, device=next(model.parameters()).device)
    with torch.no_grad():
        target = _EveryOutput(model) if hasattr(model, "forward_levels") else model
        fca = FlopCountAnalysis(target, x)
        fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        total = fca.total()
    model.train(was_training)
    return total / 1e9


def count_params(model: nn.Module) -> float:
    """Parameters in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


class _NoModuleTracking:
    """Stand-in for FlopCounterMode's ModuleTracker: everything counts under 'Global'."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def global_flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` without its per-module breakdown.

    The module tracker registers gradient hooks that cannot run inside ``torch.autograd.grad``,
    which the reversible engine's backward uses; the total count is unaffected.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    return counter


def training_step_gflops(fwd_bwd, per: int = 1) -> float:
    """GFLOPs of ``fwd_bwd()`` (forward + backward) divided by ``per`` (the batch, say), in
    FlopCounterMode's convention: one multiply-add = 2 FLOPs (the paper's count is half)."""
    with global_flop_counter() as counter:
        fwd_bwd()
    return counter.get_total_flops() / per / 1e9
