"""RevColV2 as a detectron2 backbone: the last top-down column's levels at strides 4-32.

The four levels of the last TD column are token maps at stride 16. Following the
disentanglement (low-level detail at level 0, semantics at the top) they become a
pyramid:

    level 0 -> two 2x transposed convs -> stride 4,  D/4 channels
    level 1 -> one 2x transposed conv  -> stride 8,  D/2 channels
    level 2 -> identity                -> stride 16, D channels
    level 3 -> 2x2 max-pool            -> stride 32, D channels

which detectron2's FPN (p2-p6) or the UperNet head consume.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling import Backbone
from torch import nn

from revcolv2.layer_decay import lr_factor_func
from revcolv2.model import MODEL_CFGS, RevColV2

__all__ = ["RevColV2Backbone", "LEVEL_NAMES", "LEVEL_STRIDES", "revcolv2_lr_factor_func"]

LEVEL_NAMES = ("td0", "td1", "td2", "td3")
LEVEL_STRIDES = (4, 8, 16, 32)


def revcolv2_lr_factor_func(decay: float, variant: str = "revcolv2_base", **net_kwargs) -> Callable[[str], float]:
    """The shared layer-decay rule (``revcolv2.layer_decay``) for a backbone of this preset.

    Returns detectron2's ``lr_factor_func`` (parameter name -> lr scale): backbone names such
    as ``backbone.bottom_up.net.columns.3.levels.0.blocks.0.attn.qkv.weight`` get
    ``decay ** (max_id + 1 - id)``; the pyramid adapters, FPN and heads get 1.
    ``net_kwargs`` are the same size overrides given to :class:`RevColV2Backbone`.
    """
    cfg = dict(MODEL_CFGS[variant], **net_kwargs)
    return lr_factor_func(
        decay,
        num_levels=cfg.get("num_levels", 4),
        blocks_per_level=cfg.get("blocks_per_level", 1),
        num_bu_columns=cfg["num_bu_columns"],
        num_td_columns=cfg["num_td_columns"],
    )


def _upsample(dim: int, times: int) -> nn.Module:
    """``times`` 2x transposed convs, halving channels each time (LN + GELU in between)."""
    layers = []
    for i in range(times):
        layers.append(nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        dim //= 2
        if i < times - 1:
            layers += [LayerNorm(dim), nn.GELU()]
    return nn.Sequential(*layers)


class RevColV2Backbone(Backbone):
    """detectron2 ``Backbone`` around :class:`revcolv2.model.RevColV2`.

    Args:
        variant: a preset of ``revcolv2.model.MODEL_CFGS`` (sizes come from there).
        window_size: windowed attention for every block except ``global_attn_indexes``.
        global_attn_indexes: blocks (execution order) that keep global attention.
        square_pad: pad inputs to this square size (0: only to a multiple of 32).
        net_kwargs: any other :class:`RevColV2` argument (drop_path_rate, reversible, ...,
            or size overrides such as embed_dim for tiny test models).
    """

    def __init__(
        self,
        variant: str = "revcolv2_base",
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (),
        drop_path_rate: float = 0.0,
        reversible: bool = True,
        square_pad: int = 0,
        out_features: Sequence[str] = LEVEL_NAMES,
        **net_kwargs,
    ):
        super().__init__()
        if variant not in MODEL_CFGS:
            raise ValueError(f"unknown RevColV2 variant {variant!r}; choose from {sorted(MODEL_CFGS)}")
        if net_kwargs.get("num_levels", 4) != 4:
            raise ValueError("the detectron2 backbone maps exactly 4 levels to strides 4, 8, 16, 32")
        cfg = dict(MODEL_CFGS[variant], **net_kwargs)
        self.net = RevColV2(
            num_classes=0,
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
            drop_path_rate=drop_path_rate,
            reversible=reversible,
            **cfg,
        )
        # the classifier norm is unused in dense prediction
        self.net.fc_norm = nn.Identity()
        dim = self.net.embed_dim
        self.to_strides = nn.ModuleList(
            [_upsample(dim, 2), _upsample(dim, 1), nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2)]
        )
        channels = (dim // 4, dim // 2, dim, dim)
        unknown = set(out_features) - set(LEVEL_NAMES)
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; available: {LEVEL_NAMES}")
        self._out_features = list(out_features)
        self._out_feature_channels = {n: c for n, c in zip(LEVEL_NAMES, channels) if n in out_features}
        self._out_feature_strides = {n: s for n, s in zip(LEVEL_NAMES, LEVEL_STRIDES) if n in out_features}
        self._square_pad = square_pad

    @property
    def size_divisibility(self) -> int:
        return 32

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # spelled correctly here (detectron2's SimpleFeaturePyramid has 'size_divisiblity')
        return {"size_divisibility": 32, "square_size": self._square_pad}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
            for n in self._out_features
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {name: (B, C, ceil(H/32)*32/stride, ceil(W/32)*32/stride)}.

        Inputs whose sides are not multiples of 32 are zero-padded at the bottom/right, as
        detectron2's ``ImageList`` would (it already pads images by ``size_divisibility``).
        """
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.size_divisibility, (-w) % self.size_divisibility
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        levels = self.net.forward_levels(x)  # 4 x (B, D, H/16, W/16)
        return {
            name: adapt(level)
            for name, adapt, level in zip(LEVEL_NAMES, self.to_strides, levels)
            if name in self._out_features
        }
