"""Checkpoint I/O: atomic saves and loads that report every key they could not use."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn

# Tensors that exist only in MIM pre-training; fine-tuning may leave them unused.
PRETRAIN_ONLY_PREFIXES = ("mask_token", "decoder_pred", "decoder_norm")


def unwrap_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """Accept a raw state dict or the common wrappers ({'model': ...}, {'state_dict': ...}),
    strip a DDP ``module.`` prefix."""
    sd = checkpoint
    for key in ("model_ema", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint holds a {type(sd).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: unwrap and drop the pre-training-only tensors."""
    sd = unwrap_state_dict(state_dict)
    return {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unused from checkpoint ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        return "\n".join(lines)


def load_checkpoint(
    model: nn.Module,
    checkpoint: Any,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    verbose: bool = True,
) -> LoadReport:
    """Load a path or state dict into ``model`` and report what matched.

    A tensor whose shape differs from the model's raises ``ValueError`` naming it (a
    checkpoint of another size). Missing/unexpected keys are errors unless they start with
    one of the ``allow_*`` prefixes; either way they are listed in the returned report.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    sd = unwrap_state_dict(checkpoint)
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and own[k].shape != v.shape:
            raise ValueError(
                f"checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)}: the checkpoint is for a different model size"
            )
    report = LoadReport(
        loaded=[k for k in own if k in sd],
        missing=[k for k in own if k not in sd],
        unexpected=[k for k in sd if k not in own],
    )
    bad_missing = [k for k in report.missing if not k.startswith(tuple(allow_missing))]
    bad_unexpected = [k for k in report.unexpected if not k.startswith(tuple(allow_unexpected))]
    if bad_missing or bad_unexpected:
        raise ValueError(f"checkpoint does not match the model:\n{report}")
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    if verbose:
        print(report)
    return report


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
