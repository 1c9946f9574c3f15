"""Mask2Former on the RevColV2 column outputs, as a detectron2 semantic-segmentation model.

    RevColV2Backbone  td0 (stride 4, D/4) td1 (8, D/2) td2 (16, D) td3 (32, D)
      pixel decoder   6 multi-scale deformable-attention encoder layers on td1-td3, an FPN
                      step to td0 -> mask features at stride 4 + three scales for the decoder
      transformer     100 learned queries, 9 masked-attention layers (cross-attention limited
                      to each query's mask from the previous layer), round-robin over the
                      three scales; a class (K + 1, last = no object) and a mask prediction
                      after the initial layer norm and after every layer (deep supervision)
      criterion       Hungarian matching (class + point-sampled BCE + dice cost), then class
                      CE (no-object weight 0.1) and point-sampled BCE + dice on the matches
    RevColV2Mask2Former
                      normalise, pad, backbone, head; ``sem_seg`` targets become one binary
                      mask per class present; inference combines class and mask probabilities
                      into per-class scores (K, H, W) at the original image size

The pixel decoder, masked-attention decoder, matcher and losses are Hugging Face
``transformers``' port of Mask2Former (``transformers.models.mask2former.modeling_mask2former``,
pinned in requirements.txt), configured through its ``Mask2FormerConfig``; this file only
wires them to the RevColV2 backbone and to detectron2's data and evaluation contract.
``transformers`` is imported here only: ``import revcolv2_d2`` (and the UperNet and COCO
models) work without it.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from .backbone import LEVEL_NAMES

try:
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerLoss,
        Mask2FormerPixelDecoder,
        Mask2FormerPreTrainedModel,
        Mask2FormerTransformerModule,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "revcolv2_d2.mask2former needs Hugging Face transformers (pinned in requirements.txt: "
        "pip install -r requirements.txt)"
    ) from e

__all__ = [
    "Mask2FormerHead",
    "ProcessAveragedMask2FormerLoss",
    "RevColV2Mask2Former",
    "FullModelGradClipAdamW",
    "mask2former_optimizer_params",
    "semantic_inference",
    "sem_seg_to_targets",
]

logger = logging.getLogger(__name__)


def semantic_inference(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Mask2Former's semantic inference: per-class scores of one image.

    ``mask_cls`` (Q, K + 1) class logits, last column "no object"; ``mask_pred`` (Q, H, W)
    mask logits. Returns (K, H, W) = sum over queries of softmax class probability (without
    no-object) x sigmoid mask probability.
    """
    probs = mask_cls.softmax(dim=-1)[:, :-1]  # (Q, K)
    return torch.einsum("qk,qhw->khw", probs, mask_pred.sigmoid())


def sem_seg_to_targets(sem_seg: Tensor, ignore_value: int) -> Dict[str, Tensor]:
    """One binary mask per class present in a (H, W) label map (``ignore_value`` excluded).

    Returns ``{"labels": (N,) int64, "masks": (N, H, W) float}``; N = 0 for an image
    without a labelled pixel. Ignored pixels are negatives of every mask, as in
    Mask2Former's semantic dataset mapper.
    """
    classes = torch.unique(sem_seg)
    classes = classes[classes != ignore_value]
    masks = (sem_seg[None] == classes[:, None, None]).float()
    return {"labels": classes.long(), "masks": masks}


class ProcessAveragedMask2FormerLoss(Mask2FormerLoss):
    """transformers' ``Mask2FormerLoss`` with Mask2Former's loss normaliser: the number of
    target masks averaged over the ``torch.distributed`` processes (the library averages
    only over processes started by ``accelerate``, which detectron2 does not use)."""

    def get_num_masks(self, class_labels: List[Tensor], device: torch.device) -> Tensor:
        """Target masks per process, averaged over processes, at least 1."""
        num = torch.as_tensor(float(sum(len(c) for c in class_labels)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / dist.get_world_size()
        return num.clamp(min=1.0)


class Mask2FormerHead(nn.Module):
    """Mask2Former's pixel decoder, masked-attention transformer decoder and criterion.

    Defaults are Mask2Former's ADE20K semantic recipe (``maskformer2_R50_bs16_160k.yaml``).

    Args:
        input_shape: backbone output shapes; ``in_features`` are read from it, finest first
            (strides 4, 8, 16, 32: the last three feed the deformable encoder).
        num_classes: K (ADE20K: 150); the class head predicts K + 1 (no object).
        conv_dim: pixel-decoder width (CONVS_DIM); must be a multiple of 32 (GroupNorm(32)).
        mask_dim: mask-feature width (MASK_DIM).
        hidden_dim: query width of the transformer decoder (HIDDEN_DIM).
        num_queries: learned queries (NUM_OBJECT_QUERIES).
        num_heads: attention heads of the encoder and decoder (NHEADS).
        encoder_layers: deformable-attention encoder layers (TRANSFORMER_ENC_LAYERS).
        encoder_feedforward_dim: their MLP width (1024, fixed in Mask2Former's code).
        decoder_layers: masked-attention layers; the library counts the initial prediction
            as one more (Mask2Former's DEC_LAYERS = decoder_layers + 1).
        dim_feedforward: decoder MLP width.
        pre_norm, dropout, enforce_input_projection: as in Mask2Former.
        class_weight, mask_weight, dice_weight: loss (and matching-cost) weights.
        no_object_weight: class-CE weight of the no-object class.
        train_num_points, oversample_ratio, importance_sample_ratio: point sampling of the
            mask losses (PointRend-style, uncertain points first).
        deep_supervision: also supervise the prediction after every decoder layer.
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Sequence[str] = LEVEL_NAMES,
        conv_dim: int = 256,
        mask_dim: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        encoder_layers: int = 6,
        encoder_feedforward_dim: int = 1024,
        decoder_layers: int = 9,
        dim_feedforward: int = 2048,
        pre_norm: bool = False,
        dropout: float = 0.0,
        enforce_input_projection: bool = False,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
    ):
        super().__init__()
        in_features = list(in_features)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(f"Mask2FormerHead inputs {missing} are not in the backbone outputs {sorted(input_shape)}")
        if len(in_features) != 4:
            raise ValueError(f"Mask2FormerHead reads 4 levels (strides 4-32), got in_features={in_features}")
        strides = [input_shape[f].stride for f in in_features]
        if strides != sorted(strides):
            raise ValueError(f"in_features must go from fine to coarse, got strides {strides}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if conv_dim % 32:
            raise ValueError(f"conv_dim must be a multiple of 32 (GroupNorm(32) in the pixel decoder), got {conv_dim}")
        if mask_dim < 1:
            raise ValueError(f"mask_dim must be positive, got {mask_dim}")
        if decoder_layers < 1:
            raise ValueError(f"decoder_layers must be at least 1, got {decoder_layers}")
        self.in_features = in_features
        self.input_shape = {f: input_shape[f] for f in in_features}
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        self.config = Mask2FormerConfig(
            num_labels=num_classes,
            feature_size=conv_dim,
            mask_feature_size=mask_dim,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            num_attention_heads=num_heads,
            encoder_layers=encoder_layers,
            encoder_feedforward_dim=encoder_feedforward_dim,
            decoder_layers=decoder_layers + 1,  # + the prediction from the initial queries
            dim_feedforward=dim_feedforward,
            pre_norm=pre_norm,
            dropout=dropout,
            enforce_input_projection=enforce_input_projection,
            common_stride=strides[0],
            feature_strides=strides,
            class_weight=class_weight,
            mask_weight=mask_weight,
            dice_weight=dice_weight,
            no_object_weight=no_object_weight,
            train_num_points=train_num_points,
            oversample_ratio=oversample_ratio,
            importance_sample_ratio=importance_sample_ratio,
            use_auxiliary_loss=deep_supervision,
        )
        self.pixel_decoder = Mask2FormerPixelDecoder(
            self.config, feature_channels=[input_shape[f].channels for f in in_features]
        )
        self.transformer = Mask2FormerTransformerModule(in_features=conv_dim, config=self.config)
        self.class_predictor = nn.Linear(hidden_dim, num_classes + 1)
        self.weight_dict = {"loss_cross_entropy": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.criterion = ProcessAveragedMask2FormerLoss(self.config, weight_dict=self.weight_dict)
        self._init_weights()

    def _init_weights(self) -> None:
        """The library's Mask2Former initialisation (its ``_init_weights``, module by module;
        a module's own rule runs after its children's, so it has the last word)."""
        initializer = Mask2FormerPreTrainedModel(self.config)
        for part in (self.pixel_decoder, self.transformer, self.class_predictor):
            part.apply(initializer._init_weights)

    def layers(self, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Class logits (B, Q, K + 1) and mask logits (B, Q, H/4, W/4) after every decoder
        layer (the initial prediction first, the final one last)."""
        x = [features[f] for f in self.in_features]
        pixel = self.pixel_decoder(x)
        decoded = self.transformer(list(pixel.multi_scale_features), pixel.mask_features)
        class_logits = [self.class_predictor(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]
        return class_logits, list(decoded.masks_queries_logits)

    def forward(
        self, features: Dict[str, Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
    ) -> Tuple[Optional[Tuple[Tensor, Tensor]], Dict[str, Tensor]]:
        """Training: ``(None, losses)``; inference: ``((class logits, mask logits), {})``
        of the last layer, (B, Q, K + 1) and (B, Q, H/4, W/4)."""
        class_logits, mask_logits = self.layers(features)
        if not self.training:
            return (class_logits[-1], mask_logits[-1]), {}
        if targets is None:
            raise ValueError("Mask2FormerHead needs targets in training")
        return None, self.losses(class_logits, mask_logits, targets)

    def losses(
        self, class_logits: List[Tensor], mask_logits: List[Tensor], targets: List[Dict[str, Tensor]]
    ) -> Dict[str, Tensor]:
        """Weighted Mask2Former losses: ``loss_cross_entropy``, ``loss_mask``, ``loss_dice``
        for the last layer and ``..._i`` for intermediate prediction i (deep supervision).

        An image without targets (no labelled pixel) is matched to nothing: all its queries
        learn "no object" and it adds nothing to the mask losses; a batch of such images has
        zero mask losses (normaliser clamped to 1).
        """
        aux = None
        if self.deep_supervision:
            aux = [{"masks_queries_logits": m, "class_queries_logits": c}
                   for m, c in zip(mask_logits[:-1], class_logits[:-1])]
        labels = [t["labels"] for t in targets]
        masks = [t["masks"].to(mask_logits[-1].dtype) for t in targets]
        losses = self.criterion(mask_logits[-1], class_logits[-1], masks, labels, auxiliary_predictions=aux)
        for key in list(losses):
            base = key.rsplit("_", 1)[0] if key[-1].isdigit() else key
            losses[key] = losses[key] * self.weight_dict[base]
        return losses


class RevColV2Mask2Former(nn.Module):
    """Mask2Former semantic segmentation on a detectron2 backbone (MaskFormer meta-architecture).

    Training: normalise, pad to the backbone's size divisibility, backbone, head losses
    against one binary mask per class present in each (padded) ``sem_seg``. Inference:
    whole image, per-class scores from :func:`semantic_inference` at the padded input size,
    cropped and resized to the original size (``{"sem_seg": (K, H, W)}``, what detectron2's
    ``SemSegEvaluator`` and ``tools/visualize.py`` read).

    Args:
        backbone: e.g. :class:`revcolv2_d2.backbone.RevColV2Backbone`.
        sem_seg_head: a :class:`Mask2FormerHead`.
        pixel_mean, pixel_std: RGB normalisation (0-255 inputs).
        ignore_value: label of unlabelled pixels.
        size_divisibility: pad inputs to a multiple of this (0: the backbone's).
    """

    # what inference returns per class: the query-summed class x mask probabilities, which
    # test-time augmentation averages as they are (revcolv2_d2.tta)
    sem_seg_output = "probabilities"

    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: Mask2FormerHead,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        ignore_value: int = 255,
        size_divisibility: int = 0,
    ):
        super().__init__()
        actual = backbone.output_shape()
        wrong = {
            f: (s.channels, actual[f].channels if f in actual else None)
            for f, s in sem_seg_head.input_shape.items()
            if f not in actual or actual[f].channels != s.channels or actual[f].stride != s.stride
        }
        if wrong:
            raise ValueError(
                "the head's input_shape does not match the backbone's outputs ({feature: (head channels, "
                f"backbone channels)}}: {wrong}); for RevColV2 give the head input_shape="
                "revcolv2_level_shapes(variant, embed_dim) of the backbone"
            )
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.ignore_value = ignore_value
        self.size_divisibility = size_divisibility or backbone.size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self._empty_images = 0

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, batched_inputs: List[dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(
            images, self.size_divisibility, padding_constraints=getattr(self.backbone, "padding_constraints", None)
        )

    def targets(self, batched_inputs: List[dict], padded_hw: Tuple[int, int]) -> List[Dict[str, Tensor]]:
        """Per-class binary masks of each ``sem_seg``, padded (as ignored) to the input size."""
        out = []
        for x in batched_inputs:
            if "sem_seg" not in x:
                raise ValueError("RevColV2Mask2Former needs 'sem_seg' in every training input")
            sem_seg = x["sem_seg"].to(self.device)
            h, w = sem_seg.shape[-2:]
            sem_seg = F.pad(sem_seg, (0, padded_hw[1] - w, 0, padded_hw[0] - h), value=self.ignore_value)
            out.append(sem_seg_to_targets(sem_seg, self.ignore_value))
        return out

    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess(batched_inputs)
        features = self.backbone(images.tensor)
        if self.training:
            targets = self.targets(batched_inputs, images.tensor.shape[-2:])
            empty = sum(len(t["labels"]) == 0 for t in targets)
            if empty:
                self._empty_images += empty
                logger.warning(
                    "%d image(s) in this batch have no labelled pixel (all %d): their queries learn 'no object' "
                    "only (%d such images so far)", empty, self.ignore_value, self._empty_images
                )
                try:
                    get_event_storage().put_scalar("mask2former/empty_images", self._empty_images, smoothing_hint=False)
                except AssertionError:  # outside a trainer
                    pass
            _, losses = self.sem_seg_head(features, targets)
            return losses
        (class_logits, mask_logits), _ = self.sem_seg_head(features)
        results = []
        for i, x in enumerate(batched_inputs):
            masks = F.interpolate(mask_logits[i:i + 1], size=images.tensor.shape[-2:], mode="bilinear",
                                  align_corners=False)[0]  # (Q, Hp, Wp)
            scores = semantic_inference(class_logits[i], masks)  # (K, Hp, Wp)
            h, w = images.image_sizes[i]
            results.append({"sem_seg": sem_seg_postprocess(scores, (h, w), x.get("height", h), x.get("width", w))})
        return results


class FullModelGradClipAdamW(torch.optim.AdamW):
    """AdamW that first clips the global L2 norm of all its gradients to ``clip_norm``
    (Mask2Former's ``CLIP_GRADIENTS.CLIP_TYPE: full_model``).

    Under fp16 AMP, detectron2's ``AMPTrainer`` calls ``GradScaler.step``, which unscales the
    gradients before ``step``: the clip sees true gradients.
    """

    def __init__(self, params, *, clip_norm: float, norm_type: float = 2.0, **kwargs):
        if clip_norm <= 0:
            raise ValueError(f"clip_norm must be positive, got {clip_norm}")
        super().__init__(params, **kwargs)
        self.clip_norm = clip_norm
        self.norm_type = norm_type

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.clip_norm, norm_type=self.norm_type)
        return super().step(closure)


def mask2former_optimizer_params(
    model: nn.Module, *, weight_decay_embed: float = 0.0, layer_decay: float = 1.0, **kwargs
) -> List[dict]:
    """detectron2's ``get_default_optimizer_params`` with the shared layer-decay rule (layer
    ids of the RevColV2 module inside the built ``model``, as ``revcolv2_optimizer_params``)
    plus Mask2Former's embedding rule: the parameters of ``nn.Embedding`` modules (learned
    queries, level embeddings) get ``weight_decay_embed`` (``SOLVER.WEIGHT_DECAY_EMBED``, 0.0)."""
    from detectron2.solver.build import get_default_optimizer_params, reduce_param_groups

    from revcolv2.layer_decay import lr_factor_func

    if layer_decay != 1.0:
        kwargs["lr_factor_func"] = lr_factor_func(layer_decay, model)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups = []
    for group in get_default_optimizer_params(model, **kwargs):
        inside = [p for p in group["params"] if id(p) in embeds]
        outside = [p for p in group["params"] if id(p) not in embeds]
        if outside:
            groups.append(dict(group, params=outside))
        if inside:
            groups.append(dict(group, params=inside, weight_decay=weight_decay_embed))
    return reduce_param_groups(groups)
