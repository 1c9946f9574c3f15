"""The one autocast helper of the project: mixed precision on CUDA, a no-op elsewhere.

Training, evaluation and the benchmarks all enter autocast through :func:`autocast`, so
"bf16 on CUDA, fp32 on CPU" is decided in one place. ``cuda_only=False`` also autocasts
on CPU (the benchmarks' device-independent analysis columns).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Union

import torch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: Optional[str]) -> Optional[torch.dtype]:
    """``"bf16"`` / ``"fp16"`` -> the dtype; anything else (``None``, ``"off"``) -> None."""
    return AMP_DTYPES.get(amp) if isinstance(amp, str) else None


def autocast(device: Union[str, torch.device], amp: Optional[str] = "bf16", cuda_only: bool = True):
    """``torch.autocast`` in ``amp``'s dtype on ``device``; ``nullcontext()`` when ``amp`` is
    off or (with ``cuda_only``) the device is not a GPU."""
    device_type = torch.device(device).type
    dtype = amp_dtype(amp)
    if dtype is None or (cuda_only and device_type != "cuda"):
        return nullcontext()
    return torch.autocast(device_type, dtype=dtype)
