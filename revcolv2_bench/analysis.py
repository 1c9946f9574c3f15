"""The device-independent figures of one training step (forward + backward): activation peak
per image, GFLOPs per image, block evaluations per step, non-GEMM traffic per image and ops
per step, from :mod:`revcolv2_bench.memory` and :mod:`revcolv2_bench.flops`."""
from __future__ import annotations

from typing import Callable, Dict

import torch

from .flops import training_step_gflops
from .memory import activation_peak_per_image, traffic_per_image

# the columns of analyze_training_step
ANALYSIS_COLUMNS = ["act peak (MB/img)", "GFLOPs/img (fwd+bwd)", "block evals/step", "non-GEMM MB/img", "ops/step"]


def analyze_training_step(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor]) -> Dict:
    """Device-independent figures of one training step (forward + backward, no optimizer):

    - activation peak per image (MB): :func:`revcolv2_bench.memory.activation_peak_per_image`;
    - GFLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward
      at batch 2 (one multiply-add = 2 FLOPs, its convention);
    - block forward evaluations per step: calls of every module whose class is ``Block``
      (ours and timm's), recomputations in backward included;
    - non-GEMM MB per image and ops per step: :func:`revcolv2_bench.memory.traffic_per_image`,
      the bytes read and written by every op that is not a matrix product or attention
      (element-wise updates, norms, casts, reductions), and the ops launched, views excluded.
      On a GPU those bytes, not FLOPs, set the time of that part of an eager step.

    ``loss_at(batch)`` runs the forward (under the caller's autocast) and returns the loss.
    """

    def fwd_bwd(batch: int) -> None:
        loss_at(batch).backward()

    peak = activation_peak_per_image(fwd_bwd)
    model.zero_grad(set_to_none=True)
    gflops = training_step_gflops(lambda: fwd_bwd(2), per=2)
    model.zero_grad(set_to_none=True)
    calls = []
    # pre-hooks: checkpointing's recomputation stops early inside the block's forward, so
    # forward (post) hooks would not see it
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules()
             if type(m).__name__ == "Block"]
    fwd_bwd(1)
    for h in hooks:
        h.remove()

    def fresh(batch: int) -> None:  # as a training step after zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        fwd_bwd(batch)

    traffic = traffic_per_image(fresh)
    model.zero_grad(set_to_none=True)
    return {"act peak (MB/img)": round(peak / 2 ** 20, 3), "GFLOPs/img (fwd+bwd)": round(gflops, 1),
            "block evals/step": len(calls), "non-GEMM MB/img": round(traffic["non_gemm_bytes"] / 2 ** 20, 1),
            "ops/step": traffic["ops"]}
