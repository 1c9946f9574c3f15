"""Live tensor bytes over time, on any device, from a ``TorchDispatchMode``.

:class:`LiveBytes` sees every op dispatched while it is active (forward, backward on the
calling thread, and the ops inside custom autograd Functions), records each tensor storage
the first time an op outputs it, and drops it when the storage is freed (a weak reference
on the storage object, which PyTorch keeps unique per storage). Tensors that existed
before the mode started (weights, inputs, gradient buffers that later steps accumulate
into in place) are not counted, nor are outputs that share an input's storage.

:func:`activation_peak_per_image` turns it into the figure the tests and benchmarks use:
the peak of live bytes during one forward + backward at batch 6 minus that at batch 2,
divided by 4. The difference cancels everything that does not scale with the batch
(weight gradients, optimizer state, the head's constants), leaving activations, the
gradients flowing between layers and the temporaries alive at the peak.

:class:`OpTraffic` counts, in the same way, the ops launched and the bytes they read and
write, matrix products and attention apart from the rest; :func:`traffic_per_image` gives
the per-image bytes by the same batch difference. They are the benchmarks' device-free
measure of the element-wise work that sets an eager GPU step's time besides its FLOPs.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as m: ...`` then ``m.peak`` / ``m.live`` (bytes)."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: Dict[int, int] = {}  # id(storage object) -> bytes

    def _free(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._alive:
            return
        nbytes = st.nbytes()
        if nbytes == 0:
            return
        try:
            weakref.finalize(st, self._free, key)
        except TypeError:  # storage kinds without weak references: cannot be tracked
            return
        self._alive[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output that shares an input's storage (in-place op, view) allocated nothing
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and not t.is_meta}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta and id(t.untyped_storage()) not in inputs:
                self._track(t)
        return out


def _at_two_batches(mode: Callable[[], TorchDispatchMode], step: Callable[[int], None], small: int,
                    large: int) -> Dict[int, TorchDispatchMode]:
    """Warm up with ``step(small)`` (lazily created buffers, gradient tensors, kernels), then
    run ``step(small)`` and ``step(large)`` each under a fresh ``mode()``; {batch: mode}."""
    step(small)
    runs = {}
    for b in (small, large):
        with mode() as m:
            step(b)
        runs[b] = m
    return runs


def activation_peak_per_image(step: Callable[[int], None], small: int = 2, large: int = 6) -> float:
    """(peak at batch ``large`` - peak at batch ``small``) / (large - small), in bytes.

    ``step(batch)`` runs one forward + backward at that batch size; the caller builds its
    inputs outside the timed part or inside, as it likes (inputs are a few KB per image).
    """
    runs = _at_two_batches(LiveBytes, step, small, large)
    return (runs[large].peak - runs[small].peak) / (large - small)


# matrix products and attention: compute-bound kernels, counted apart from the rest
_GEMM_OPS = ("mm", "addmm", "_addmm_activation", "bmm", "baddbmm", "convolution", "convolution_backward",
             "_scaled_dot_product", "scaled_dot_product", "_efficient_attention", "_flash_attention",
             "_cudnn_attention")
_NO_TRAFFIC = ("empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense")


class OpTraffic(TorchDispatchMode):
    """Kernels and memory traffic of everything dispatched inside ``with``.

    Each op that is not a view counts once (one kernel launch in eager mode) and moves
    the bytes of its tensor inputs (read) plus its tensor outputs (written). Matrix
    products and attention (:data:`_GEMM_OPS`) are counted apart: they are bound by
    compute, the rest (element-wise updates, norms, casts, reductions, copies) by memory
    bandwidth. On a GPU the second group's bytes are what eager element-wise work costs.
    """

    def __init__(self):
        super().__init__()
        self.ops = {"gemm": 0, "other": 0}
        self.bytes = {"gemm": 0, "other": 0}

    @staticmethod
    def _kind(func) -> str:
        name = func.overloadpacket.__name__
        return "gemm" if name.startswith(_GEMM_OPS) else "other"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_TRAFFIC:
            return out
        # an ``out=`` tensor is written, not read: it is counted once, as the op's output
        read = (args, {k: v for k, v in kwargs.items() if k != "out"})
        moved = sum(t.numel() * t.element_size() for t in tree_leaves((read, out))
                    if isinstance(t, torch.Tensor))
        kind = self._kind(func)
        self.ops[kind] += 1
        self.bytes[kind] += moved
        return out


def traffic_per_image(step: Callable[[int], None], small: int = 2, large: int = 6) -> Dict[str, float]:
    """Per-image memory traffic and per-step kernel count of ``step(batch)`` (forward + backward).

    Bytes are (traffic at batch ``large`` - traffic at batch ``small``) / (large - small),
    which cancels the work that does not grow with the batch (weight casts, weight
    gradients). Returns ``non_gemm_bytes`` and ``gemm_bytes`` per image and ``ops`` (kernels
    launched, views excluded) at batch ``small``.
    """
    runs = _at_two_batches(OpTraffic, step, small, large)
    per = large - small
    return {
        "non_gemm_bytes": (runs[large].bytes["other"] - runs[small].bytes["other"]) / per,
        "gemm_bytes": (runs[large].bytes["gemm"] - runs[small].bytes["gemm"]) / per,
        "ops": runs[small].ops["other"] + runs[small].ops["gemm"],
    }
