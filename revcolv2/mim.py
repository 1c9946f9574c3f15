"""Masked image modeling with RevColV2 (MAE-style objective, RevColV2 hand-off).

The BU columns see the visible patches only; at the hand-off every level is scattered back
to full length with a learned mask token (+ position embedding) at the masked positions;
the TD columns run on the full grid, and a linear head on level 0 of the last TD column
predicts the 16x16x3 pixels of each patch. The loss is MSE over masked patches only, on
per-patch normalized pixels by default.

Parameter names match :class:`RevColV2` exactly, plus ``mask_token`` and ``decoder_*``
(the pre-training-only tensors), so a MIM checkpoint loads into fine-tuning directly.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .model import RevColV2, create_revcolv2


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels (py, px, c)."""
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, hw: Tuple[int, int], c: int = 3) -> Tensor:
    """(B, N, p*p*c) -> (B, c, H, W); inverse of :func:`patchify`."""
    b = x.shape[0]
    h, w = hw
    x = x.reshape(b, h, w, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Patches left visible by ``mask_ratio``: round(N * (1 - ratio)). The one masking rule:
    a ratio outside (0, 1), or one that leaves no patch masked (the loss would be 0) or none
    visible (nothing to reconstruct from), is a ``ValueError``."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {mask_ratio!r}")
    visible = int(round(num_tokens * (1 - mask_ratio)))
    if not 1 <= visible < num_tokens:
        raise ValueError(
            f"mask_ratio {mask_ratio} leaves {visible} of {num_tokens} patches visible and "
            f"{num_tokens - visible} masked; both must be at least 1"
        )
    return visible


def random_masking(batch: int, num_tokens: int, mask_ratio: float, device=None, generator=None):
    """Per-sample random masking by argsort of uniform noise; :func:`num_visible` patches stay.

    Returns ``visible_ids`` (B, N_visible), sorted ascending so visible tokens keep their
    raster order, and ``mask`` (B, N) with 1 at masked positions.
    """
    n_visible = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch, num_tokens, device=device, generator=generator)
    visible_ids = noise.argsort(dim=1)[:, :n_visible].sort(dim=1).values
    mask = torch.ones(batch, num_tokens, device=device)
    mask.scatter_(1, visible_ids, 0.0)
    return visible_ids, mask


def patch_mean_std(patches: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Mean and std of each patch over its p*p*3 values, (B, N, 1) each (MAE's ``norm_pix_loss``;
    ``eps`` keeps flat patches finite)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps) ** 0.5
    return mean, std


def normalize_patches(patches: Tensor) -> Tensor:
    """(B, N, p*p*3) -> each patch normalised to zero mean and unit variance: the
    reconstruction target of the normalized-pixel loss."""
    mean, std = patch_mean_std(patches)
    return (patches - mean) / std


class RevColV2MIM(RevColV2):
    """RevColV2 with a mask token and a pixel reconstruction head on TD level 0."""

    def __init__(self, mask_ratio: float = 0.75, norm_pix_loss: bool = True, **kwargs):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("out_levels", "all")  # the reconstruction reads level 0 of the last TD column
        kwargs.setdefault("fc_norm", False)  # no classifier in pre-training: keep every parameter used
        super().__init__(**kwargs)
        num_visible((self.img_size // self.patch_size) ** 2, mask_ratio)  # fail at construction
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        in_chans = self.patch_embed.in_chans
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.decoder_norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(self.embed_dim, self.patch_size ** 2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.decoder_pred.weight)
        nn.init.zeros_(self.decoder_pred.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Alphas (from the backbone) and the mask token are not decayed (MAE convention)."""
        return super().no_weight_decay() | {"mask_token"}

    def reconstruction_target(self, imgs: Tensor) -> Tensor:
        target = patchify(imgs, self.patch_size)  # (B, N, p*p*3)
        return normalize_patches(target) if self.norm_pix_loss else target

    @staticmethod
    def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Mean over masked patches of the per-patch MSE; visible patches do not count."""
        per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    def forward(
        self, imgs: Tensor, mask_ratio: Optional[float] = None, visible_ids: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, Tensor]:
        """Returns dict(loss, pred (B, N, p*p*3), mask (B, N), visible_ids (B, Nv)).

        The mask is drawn with ``generator`` (default: the global RNG) unless ``visible_ids``
        (B, Nv), the ascending indices of the visible patches, is given.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        b, _, h, w = imgs.shape
        p = self.patch_size
        n = (h // p) * (w // p)
        if visible_ids is None:
            visible_ids, mask = random_masking(b, n, ratio, imgs.device, generator)
        else:
            mask = torch.ones(b, n, device=imgs.device).scatter_(1, visible_ids, 0.0)
        _, td, _ = self.forward_columns(imgs, visible_ids, self.mask_token)
        pred = self.decoder_pred(self.decoder_norm(td[0]))  # (B, N, p*p*3)
        loss = self.masked_mse(pred, self.reconstruction_target(imgs), mask)
        return {"loss": loss, "pred": pred, "mask": mask, "visible_ids": visible_ids}

    def prediction_to_pixels(self, pred: Tensor, imgs: Tensor) -> Tensor:
        """Predicted patches (B, N, p*p*3) -> images in the input's pixel space (B, 3, H, W).

        With the normalized-pixel loss the prediction lives in per-patch normalized units;
        it is mapped back with each patch's own mean and std (taken from ``imgs``, as MAE's
        visualisation does), so only the structure within a patch is the model's.
        """
        if self.norm_pix_loss:
            mean, std = patch_mean_std(patchify(imgs, self.patch_size))
            pred = pred * std + mean
        p = self.patch_size
        return unpatchify(pred.float(), p, (imgs.shape[2] // p, imgs.shape[3] // p), imgs.shape[1])


def create_mim_model(variant: str, **kwargs) -> RevColV2MIM:
    """MIM model of a registered size, e.g. ``create_mim_model('revcolv2_base')``.

    Built through :func:`revcolv2.model.create_revcolv2`, the same path as ``timm.create_model``.
    """
    kwargs.setdefault("num_classes", 0)  # timm would otherwise default to the preset's 1000
    return create_revcolv2(variant, model_cls=RevColV2MIM, **kwargs)
