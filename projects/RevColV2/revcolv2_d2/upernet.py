"""UperNet on the RevColV2 column outputs, as a detectron2 semantic-segmentation model.

    RevColV2Backbone  td0 (stride 4, D/4) td1 (8, D/2) td2 (16, D) td3 (32, D)
      UPerHead        PPM (scales 1, 2, 3, 6) on td3, 1x1 laterals on td0-td2, top-down
                      FPN fusion, all four levels upsampled to stride 4 and fused -> logits
      aux FCN head    one 3x3 conv on td2 -> logits, loss weight 0.4 (training only)
    RevColV2SemanticSegmentor
                      detectron2's SemanticSegmentor plus sliding-window inference
                      (crop size / stride as in the mmsegmentation ADE20K recipes) or
                      whole-image inference

The head follows detectron2's sem-seg head contract: ``forward(features, targets)``
returns ``(logits at the padded input resolution, {})`` in inference and
``(None, losses)`` in training; ``ignore_value`` pixels (255) take no part in the loss.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .backbone import LEVEL_NAMES, revcolv2_level_shapes

__all__ = ["UPerHead", "RevColV2SemanticSegmentor", "revcolv2_level_shapes"]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> Conv2d:
    """Conv (no bias when normed) + norm + ReLU, Kaiming-initialised (mmcv ConvModule)."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet pooling: average-pool to s x s for each scale, 1x1 conv, upsample back.

    Returns the input concatenated with every pooled branch: (B, C_in + len(scales) * C, H, W).
    """

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm: str):
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList([conv_norm_act(in_channels, channels, 1, norm) for _ in self.scales])

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [resize(branch(F.adaptive_avg_pool2d(x, s)), size) for s, branch in zip(self.scales, self.branches)]
        return torch.cat([x] + pooled, dim=1)


class UPerHead(nn.Module):
    """UperNet decode head (Xiao et al. 2018) with an auxiliary FCN head.

    Args:
        input_shape: backbone output shapes; ``in_features`` are read from it, finest first.
        num_classes: number of classes K (ADE20K: 150).
        in_features: the four pyramid levels, stride 4 to 32.
        channels: width of the PPM branches, laterals and fusion convs (512 in UperNet).
        pool_scales: PPM output grids.
        norm: detectron2 norm name ("SyncBN" for multi-GPU, "BN" for one process).
        dropout: Dropout2d before both classifiers.
        ignore_value: label excluded from the loss.
        loss_weight: weight of the main cross-entropy loss.
        aux_in_feature: level of the auxiliary FCN head (None: no auxiliary head).
        aux_channels: width of the auxiliary head's conv.
        aux_loss_weight: weight of its cross-entropy loss (0.4 in UperNet recipes).
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Sequence[str] = LEVEL_NAMES,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "SyncBN",
        dropout: float = 0.1,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        aux_in_feature: Optional[str] = "td2",
        aux_channels: int = 256,
        aux_loss_weight: float = 0.4,
    ):
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if missing or (aux_in_feature is not None and aux_in_feature not in input_shape):
            raise ValueError(
                f"UPerHead inputs {list(in_features)} / aux {aux_in_feature!r} not all in the "
                f"backbone outputs {sorted(input_shape)}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.in_features = list(in_features)
        self.input_shape = {f: input_shape[f] for f in self.in_features}
        if aux_in_feature is not None:
            self.input_shape[aux_in_feature] = input_shape[aux_in_feature]
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.aux_in_feature = aux_in_feature
        self.aux_loss_weight = aux_loss_weight
        self.common_stride = input_shape[self.in_features[0]].stride
        in_channels = [input_shape[f].channels for f in self.in_features]

        # top level: pyramid pooling, then a 3x3 bottleneck back to `channels`
        self.ppm = PyramidPooling(in_channels[-1], channels, pool_scales, norm)
        self.ppm_bottleneck = conv_norm_act(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm)
        # other levels: 1x1 lateral, top-down sum, 3x3 smoothing
        self.lateral_convs = nn.ModuleList([conv_norm_act(c, channels, 1, norm) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([conv_norm_act(channels, channels, 3, norm) for _ in in_channels[:-1]])
        self.fpn_bottleneck = conv_norm_act(len(in_channels) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = classifier(channels, num_classes)

        if aux_in_feature is not None:
            self.aux_conv = conv_norm_act(input_shape[aux_in_feature].channels, aux_channels, 3, norm)
            self.aux_dropout = nn.Dropout2d(dropout)
            self.aux_predictor = classifier(aux_channels, num_classes)

    def layers(self, features: Dict[str, Tensor]) -> Tensor:
        """Pyramid -> logits at the finest level's stride: (B, K, H/4, W/4)."""
        x = [features[f] for f in self.in_features]
        laterals: List[Tensor] = [conv(t) for conv, t in zip(self.lateral_convs, x[:-1])]
        laterals.append(self.ppm_bottleneck(self.ppm(x[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(t) for conv, t in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(t, size) for t in outs[1:]], dim=1))
        return self.predictor(self.dropout(fused))

    def aux_layers(self, features: Dict[str, Tensor]) -> Tensor:
        """Auxiliary FCN logits at the aux level's stride: (B, K, h, w)."""
        return self.aux_predictor(self.aux_dropout(self.aux_conv(features[self.aux_in_feature])))

    def forward(
        self, features: Dict[str, Tensor], targets: Optional[Tensor] = None
    ) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
        logits = self.layers(features)
        if self.training:
            if targets is None:
                raise ValueError("UPerHead needs sem_seg targets in training")
            aux = self.aux_layers(features) if self.aux_in_feature is not None else None
            return None, self.losses(logits, targets, aux)
        # (B, K, H, W) at the (padded) input resolution, like detectron2's SemSegFPNHead
        return F.interpolate(logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False), {}

    def losses(self, logits: Tensor, targets: Tensor, aux_logits: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Cross-entropy at the label resolution, averaged over the non-ignored pixels."""
        size = targets.shape[-2:]
        losses = {
            "loss_sem_seg": self.loss_weight
            * F.cross_entropy(resize(logits, size), targets, ignore_index=self.ignore_value)
        }
        if aux_logits is not None:
            losses["loss_sem_seg_aux"] = self.aux_loss_weight * F.cross_entropy(
                resize(aux_logits, size), targets, ignore_index=self.ignore_value
            )
        return losses


class RevColV2SemanticSegmentor(SemanticSegmentor):
    """detectron2 ``SemanticSegmentor`` with sliding-window or whole-image inference.

    Training is the parent's: normalise, pad to the backbone's size divisibility (labels
    padded with ``ignore_value``), backbone, head losses.

    Args:
        test_mode: "slide" (crops of ``crop_size`` every ``stride`` pixels, overlapping
            logits averaged) or "whole" (the resized image in one pass).
        crop_size, stride: (h, w) of the sliding window and its step.
        crop_batch_size: crops of one image run through the network together.
    """

    # what inference returns per class: logits (test-time augmentation takes their softmax)
    sem_seg_output = "logits"

    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        test_mode: str = "slide",
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
        crop_batch_size: int = 8,
    ):
        super().__init__(backbone=backbone, sem_seg_head=sem_seg_head, pixel_mean=pixel_mean, pixel_std=pixel_std)
        if test_mode not in ("slide", "whole"):
            raise ValueError(f"test_mode must be 'slide' or 'whole', got {test_mode!r}")
        if min(crop_size) < 1 or min(stride) < 1:
            raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
        expected = getattr(sem_seg_head, "input_shape", None)
        if expected is not None:
            actual = backbone.output_shape()
            wrong = {
                f: (s.channels, actual[f].channels if f in actual else None)
                for f, s in expected.items()
                if f not in actual or actual[f].channels != s.channels
            }
            if wrong:
                raise ValueError(
                    "the head's input_shape does not match the backbone's outputs "
                    f"({{feature: (head channels, backbone channels)}}: {wrong}); for RevColV2 give the head "
                    "input_shape=revcolv2_level_shapes(**backbone arguments)"
                )
        self.test_mode = test_mode
        self.crop_size = tuple(int(v) for v in crop_size)
        self.stride = tuple(int(v) for v in stride)
        self.crop_batch_size = crop_batch_size

    def forward(self, batched_inputs):
        if self.training or self.test_mode == "whole":
            return super().forward(batched_inputs)
        return [{"sem_seg": self.slide_inference(x)} for x in batched_inputs]

    @staticmethod
    def window_boxes(height: int, width: int, crop: Tuple[int, int],
                     stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
        """(y0, y1, x0, x1) of the sliding windows covering an image; the last ones are
        shifted back to end at the border, images smaller than a crop give one window."""
        (ch, cw), (sh, sw) = crop, stride
        rows = max(math.ceil((height - ch) / sh), 0) + 1
        cols = max(math.ceil((width - cw) / sw), 0) + 1
        boxes = []
        for r in range(rows):
            y0 = max(min(r * sh, height - ch), 0)
            for c in range(cols):
                x0 = max(min(c * sw, width - cw), 0)
                boxes.append((y0, min(y0 + ch, height), x0, min(x0 + cw, width)))
        return boxes

    @torch.no_grad()
    def slide_inference(self, batched_input: dict) -> Tensor:
        """Averaged window logits of one image, resized to its (height, width): (K, H, W)."""
        image = (batched_input["image"].to(self.device) - self.pixel_mean) / self.pixel_std  # (C, h, w)
        h, w = image.shape[-2:]
        boxes = self.window_boxes(h, w, self.crop_size, self.stride)
        logits = None
        count = image.new_zeros((1, h, w))
        for i in range(0, len(boxes), self.crop_batch_size):
            chunk = boxes[i:i + self.crop_batch_size]
            crops = ImageList.from_tensors(
                [image[:, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk],
                self.backbone.size_divisibility,
                padding_constraints=self.backbone.padding_constraints,
            )
            out, _ = self.sem_seg_head(self.backbone(crops.tensor), None)  # (n, K, Hp, Wp)
            if logits is None:
                logits = out.new_zeros((out.shape[1], h, w))
            for (y0, y1, x0, x1), o in zip(chunk, out):
                logits[:, y0:y1, x0:x1] += o[:, : y1 - y0, : x1 - x0]
                count[:, y0:y1, x0:x1] += 1
        logits = logits / count
        return sem_seg_postprocess(logits, (h, w), batched_input.get("height", h), batched_input.get("width", w))
