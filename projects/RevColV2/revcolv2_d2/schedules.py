"""Learning-rate schedules whose milestones follow ``train.max_iter``.

The recipe configs compute their milestones when the config file is loaded, so a
``train.max_iter=N`` override on the command line leaves them at the recipe's iterations.
The configs for your own data (``configs/custom/``), where ``train.max_iter`` is the first
thing one changes, build their schedule from it instead: ``L(vitdet_multistep)(max_iter=
"${train.max_iter}")``.
"""
from __future__ import annotations

from typing import Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler, PolynomialDecayParamScheduler

__all__ = ["vitdet_multistep", "warmup_poly"]


def _check(max_iter: int, warmup_iters: int) -> None:
    if int(max_iter) < 1 or not 0 <= int(warmup_iters) < int(max_iter):
        raise ValueError(f"need train.max_iter >= 1 and 0 <= warm-up iterations < train.max_iter, got "
                         f"max_iter={max_iter}, warm-up {warmup_iters} (set lr_multiplier.warmup_iters)")


def vitdet_multistep(max_iter: int, warmup_iters: int = 250, warmup_factor: float = 0.001,
                     fractions: Sequence[float] = (8 / 9, 26 / 27),
                     values: Sequence[float] = (1.0, 0.1, 0.01)) -> WarmupParamScheduler:
    """ViTDet's COCO schedule for ``max_iter`` iterations: linear warm-up over
    ``warmup_iters`` from ``warmup_factor``, then the factors ``values`` with steps at the
    ``fractions`` of training (x0.1 at 8/9, x0.01 at 26/27)."""
    max_iter = int(max_iter)
    _check(max_iter, warmup_iters)
    milestones: list = []
    for f in fractions:  # a step that falls on iteration 0, the end or an earlier step is left out
        m = round(max_iter * f)
        if 0 < m < max_iter and (not milestones or m > milestones[-1]):
            milestones.append(m)
    steps = MultiStepParamScheduler(values=list(values)[:len(milestones) + 1], milestones=milestones,
                                    num_updates=max_iter)
    return WarmupParamScheduler(steps, warmup_factor=warmup_factor, warmup_length=warmup_iters / max_iter)


def warmup_poly(max_iter: int, warmup_iters: int = 1500, warmup_factor: float = 1e-6,
                power: float = 1.0) -> WarmupParamScheduler:
    """The ADE20K UperNet schedule for ``max_iter`` iterations: linear warm-up over
    ``warmup_iters`` from ``warmup_factor``, then polynomial decay (``power``) to 0 over
    the remaining iterations (mmsegmentation's LinearLR + PolyLR)."""
    max_iter = int(max_iter)
    _check(max_iter, warmup_iters)
    return WarmupParamScheduler(PolynomialDecayParamScheduler(base_value=1.0, power=power),
                                warmup_factor=warmup_factor, warmup_length=warmup_iters / max_iter,
                                rescale_interval=True)
