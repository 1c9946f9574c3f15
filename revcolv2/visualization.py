"""Pictures of what the MIM model reconstructs (MAE's visualisation), for logs and docs."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid

from .mim import RevColV2MIM

__all__ = ["reconstruction_grid"]


@torch.no_grad()
def reconstruction_grid(
    model: RevColV2MIM,
    images: torch.Tensor,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """One row per image: original | masked | reconstruction | reconstruction + visible.

    ``images`` (B, 3, H, W) are normalised with ``mean`` / ``std``. The mask comes from its
    own generator, so drawing it leaves the training RNG alone, and the model's train/eval
    mode is restored. Returns a (3, H', W') image in [0, 1] (masked patches grey).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = images.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model(x, generator=g)
    recon = model.prediction_to_pixels(out["pred"], x)
    p = model.patch_size
    mask = out["mask"].reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p)
    mask = mask.repeat_interleave(p, 1).repeat_interleave(p, 2).unsqueeze(1)  # (B, 1, H, W), 1 = masked
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def to_rgb(t: torch.Tensor) -> torch.Tensor:
        return (t * std_t + mean_t).clamp(0, 1)

    original, reconstruction = to_rgb(x), to_rgb(recon)
    masked = original * (1 - mask) + 0.5 * mask
    pasted = original * (1 - mask) + reconstruction * mask
    rows = torch.stack([original, masked, reconstruction, pasted], dim=1).flatten(0, 1)  # (4B, 3, H, W)
    model.train(was_training)
    return make_grid(rows.cpu(), nrow=4, padding=2, pad_value=1.0)
