"""Training-step and inference figures of a detectron2 model, for the detection and
segmentation benchmarks."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Dict, List, Tuple

import torch

from .measure import SavedActivations, cpu_peak_bytes, timed


def detectron2_train_infer(model: torch.nn.Module, opt: torch.optim.Optimizer, train_batch: List[Dict],
                           test_batch: List[Dict], device: str, warmup: int, iters: int,
                           record_forward: AbstractContextManager | None = None,
                           after_training: Callable[[float], Dict] | None = None,
                           infer_cpu_digits: int = 2) -> Dict:
    """Training-step and inference figures of a detectron2 model (detection, segmentation).

    A training step is forward (the sum of the model's losses on ``train_batch``) + backward +
    ``opt`` step; inference is a no-grad forward with post-processing of ``test_batch``; both
    under bf16 autocast on CUDA, fp32 elsewhere, inside detectron2's event storage (its losses
    log there). One untimed step first allocates the optimizer state. Columns, in order:

    - ``train s/step``, ``saved activations (MB)`` (:class:`SavedActivations` over one training
      forward, which runs inside ``record_forward`` when given), and on CPU ``train CPU-s/step``;
    - ``train peak GPU mem (GiB)`` on CUDA, ``fwd+bwd adds (MB)`` (:func:`cpu_peak_bytes` of one
      forward + backward, gradient buffers already there) on CPU;
    - whatever ``after_training(wall seconds per step)`` returns (the model is still training);
    - ``infer img/s``, and ``infer peak GPU mem (GiB)`` on CUDA or ``infer img/CPU-s`` (rounded
      to ``infer_cpu_digits``) on CPU.
    """
    from detectron2.utils.events import EventStorage

    from revcolv2.amp import autocast

    cuda = device.startswith("cuda")
    images = len(test_batch)

    def losses() -> torch.Tensor:
        with autocast(device, "bf16"):
            return sum(model(train_batch).values())

    def train_step() -> None:
        losses().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        with autocast(device, "bf16"):
            model(test_batch)

    def timed_with_peak(fn: Callable[[], None]) -> Tuple[float, float, float | None]:
        """:func:`timed`, plus on CUDA the peak GiB allocated while it ran (None elsewhere)."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sec, cpu_sec = timed(fn, device, warmup, iters)
        return sec, cpu_sec, round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None

    out: Dict = {}
    with EventStorage(0):
        model.train()
        train_step()  # allocate the optimizer state before measuring
        with record_forward or nullcontext(), SavedActivations(model) as saved:
            loss = losses()
        loss.backward()
        opt.zero_grad(set_to_none=True)
        sec, cpu_sec, peak_gib = timed_with_peak(train_step)
        out.update({"train s/step": round(sec, 3), "saved activations (MB)": round(saved.total / 2 ** 20, 1)})
        if cuda:
            out["train peak GPU mem (GiB)"] = peak_gib
        else:
            out["train CPU-s/step"] = round(cpu_sec, 2)
            losses().backward()  # gradient buffers exist (and stay) from here on
            opt.zero_grad(set_to_none=False)
            out["fwd+bwd adds (MB)"] = round(cpu_peak_bytes(lambda: losses().backward()) / 2 ** 20, 1)
        if after_training is not None:
            out.update(after_training(sec))

        model.eval()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        sec, cpu_sec, peak_gib = timed_with_peak(infer)
        out["infer img/s"] = round(images / sec, 2)
        if cuda:
            out["infer peak GPU mem (GiB)"] = peak_gib
        else:
            out["infer img/CPU-s"] = round(images / cpu_sec, infer_cpu_digits)
    return out
