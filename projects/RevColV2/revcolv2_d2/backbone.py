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

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from detectron2.modeling import Backbone
from detectron2.solver import get_default_optimizer_params
from torch import nn

from revcolv2.layer_decay import lr_factor_func
from revcolv2.model import create_revcolv2

__all__ = ["RevColV2Backbone", "LEVEL_NAMES", "LEVEL_STRIDES", "revcolv2_level_shapes", "revcolv2_optimizer_params"]

LEVEL_NAMES = ("td0", "td1", "td2", "td3")
LEVEL_STRIDES = (4, 8, 16, 32)
_UPSAMPLINGS = (2, 1, 0, 0)  # 2x transposed convs per level in ``to_strides``


def revcolv2_optimizer_params(
    model: Optional[nn.Module] = None, layer_decay: float = 1.0, **kwargs: Any
) -> list:
    """detectron2's ``get_default_optimizer_params`` with the shared layer-decay rule.

    The layer ids come from the RevColV2 module inside the built ``model`` (which the
    training script sets as ``cfg.optimizer.params.model``), so a config that overrides the
    column or level counts decays by the model it trains. Backbone names such as
    ``backbone.bottom_up.net.columns.3.levels.0.blocks.0.attn.qkv.weight`` get
    ``layer_decay ** (max_id + 1 - id)``; the pyramid adapters, FPN and heads get 1.
    ``kwargs`` go to ``get_default_optimizer_params`` (``weight_decay_norm``, ``overrides``).
    """
    if model is None:
        raise ValueError("revcolv2_optimizer_params needs the built model (cfg.optimizer.params.model = model)")
    factor = lr_factor_func(layer_decay, model) if layer_decay != 1.0 else None
    return get_default_optimizer_params(model, lr_factor_func=factor, **kwargs)


def revcolv2_level_shapes(variant: str = "revcolv2_base", **net_kwargs: Any) -> Dict[str, ShapeSpec]:
    """Output shapes of the :class:`RevColV2Backbone` built from these arguments.

    For head configs (detectron2 LazyConfig style, the head's ``input_shape`` is a config
    field): the backbone is constructed on the meta device (no memory, no init cost) and
    asked for its ``output_shape()``, so the shapes follow any size override.
    """
    net_kwargs = {k: v for k, v in net_kwargs.items() if v is not None}  # None: the preset's value
    with torch.device("meta"):
        return RevColV2Backbone(variant, **net_kwargs).output_shape()


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
        variant: a preset of ``revcolv2.model.MODEL_CFGS``; built by ``create_revcolv2``, the
            path ``timm.create_model`` takes, with ``net_kwargs`` overriding its sizes.
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
        self.variant = variant  # recorded in checkpoints (revcolv2_d2.checkpoint.backbone_record)
        if net_kwargs.get("num_levels", 4) != 4:
            raise ValueError("the detectron2 backbone maps exactly 4 levels to strides 4, 8, 16, 32")
        self.net = create_revcolv2(
            variant,
            num_classes=0,
            out_levels="all",  # the pyramid reads every level of the last TD column
            fc_norm=False,  # the classifier's norm has no use in dense prediction
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
            drop_path_rate=drop_path_rate,
            reversible=reversible,
            **net_kwargs,
        )
        dim = self.net.embed_dim
        self.to_strides = nn.ModuleList(
            [_upsample(dim, 2), _upsample(dim, 1), nn.Identity(), nn.MaxPool2d(kernel_size=2, stride=2)]
        )
        # each 2x transposed conv halves the channels of the level it upsamples
        channels = [info["num_chs"] // 2 ** up for info, up in zip(self.net.feature_info, _UPSAMPLINGS)]
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
        levels = self.net.forward_intermediates(x, intermediates_only=True)  # 4 x (B, D, H/16, W/16)
        return {
            name: adapt(level)
            for name, adapt, level in zip(LEVEL_NAMES, self.to_strides, levels)
            if name in self._out_features
        }
