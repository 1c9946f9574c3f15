"""Test-time augmentation: evaluation at several scales of the test size, with flips, as
papers report it next to the single-scale numbers.

- :class:`ScaleFlipTTAMapper`: detectron2's ``DatasetMapperTTA`` contract (a test dict ->
  one dict per augmentation, each with its ``transforms``), with the scales taken relative
  to the test size, the ADE20K protocol of BEiT and mmsegmentation (``img_ratios`` 0.5-1.75
  of the test resize: each scale resizes the test-resized image by that factor, so
  "fit into 2048x512" becomes "fit into r x (2048x512)"). ``DatasetMapperTTA`` itself resizes
  the short edge to absolute sizes under one maximum, which cannot say that.
- COCO: detectron2's ``GeneralizedRCNNWithTTA`` (boxes from every augmentation, mapped back,
  merged by NMS; masks predicted for the merged boxes on every augmentation and averaged)
  with that mapper: :func:`build_tta_model`.
- Semantic segmentation: :class:`SemanticSegmentorWithTTA` (detectron2 has none): each
  augmented image runs through the model's own inference (UperNet slides its windows
  within each scale, Mask2Former runs the whole image), the per-class output at the
  original size is turned into probabilities (a softmax of UperNet's logits; Mask2Former's
  scores are already its class-times-mask probabilities), flipped back, and averaged.

Configs hold a ``test.aug`` node (``enabled``, ``scales``, ``flip``), like detectron2's
``TEST.AUG``; ``test.aug.enabled=True`` on the command line makes ``tools/lazyconfig_train_net.py``
evaluate both ways and report both (the augmented results under ``<task>_TTA``).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, GeneralizedRCNNWithTTA
from fvcore.transforms import HFlipTransform, NoOpTransform
from torch import nn

__all__ = ["ADE20K_SCALES", "COCO_SCALES", "ScaleFlipTTAMapper", "SemanticSegmentorWithTTA",
           "RCNNWithTTA", "build_tta_model", "enabled_test_aug"]

# BEiT / MAE / mmsegmentation ADE20K multi-scale test: img_ratios of the test resize
ADE20K_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# detectron2's TEST.AUG.MIN_SIZES (400, 500, ..., 1200) relative to its test size 800
COCO_SCALES = (0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5)


def _scaled(n: int, s: float) -> int:
    return max(1, int(n * s + 0.5))  # mmcv's rescale_size rounding


class ScaleFlipTTAMapper:
    """A test dict (``image`` (C, h, w) after the test resize, ``height``/``width`` of the
    original) -> one dict per scale (and flip), ``image`` resized by that factor (and
    flipped), with ``transforms``: original image -> this image, as ``DatasetMapperTTA``."""

    def __init__(self, scales: Sequence[float], flip: bool = True):
        scales = [float(s) for s in scales]
        if not scales or min(scales) <= 0:
            raise ValueError(f"test.aug.scales must be positive factors of the test size, got {scales}")
        self.scales, self.flip = scales, bool(flip)

    def __call__(self, dataset_dict: Dict[str, Any]) -> List[Dict[str, Any]]:
        image = dataset_dict["image"].permute(1, 2, 0).numpy()
        h, w = image.shape[:2]
        orig = (dataset_dict.get("height", h), dataset_dict.get("width", w))
        pre = T.ResizeTransform(orig[0], orig[1], h, w) if (h, w) != tuple(orig) else NoOpTransform()
        out = []
        for s in self.scales:
            size = (_scaled(h, s), _scaled(w, s))
            resize = [T.Resize(size)] if size != (h, w) else []
            for flip in (False, True) if self.flip else (False,):
                augs = resize + ([T.RandomFlip(prob=1.0)] if flip else [])
                new, tfms = T.apply_augmentations(augs, np.copy(image))
                d = copy.copy(dataset_dict)
                d["image"] = torch.from_numpy(np.ascontiguousarray(new.transpose(2, 0, 1)))
                d["transforms"] = pre + tfms
                out.append(d)
        return out


def _flipped(transforms) -> bool:
    return any(isinstance(t, HFlipTransform) for t in transforms.transforms)


@contextlib.contextmanager
def square_pad_at_least(model: nn.Module, size: int) -> Iterator[None]:
    """Raise the square padding of ``model.backbone`` (the FPN's and RevColV2's
    ``square_pad``) to fit ``size`` while inside: an image larger than the padded square
    would be cropped by ``ImageList`` (a negative padding)."""
    backbone = getattr(model, "backbone", None)
    old = getattr(backbone, "_square_pad", 0)
    if not old or size <= old:
        yield
        return
    backbone._square_pad = -(-size // 32) * 32
    try:
        yield
    finally:
        backbone._square_pad = old


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class SemanticSegmentorWithTTA(nn.Module):
    """A semantic-segmentation model (``[{"image", "height", "width"}] -> [{"sem_seg": (K,
    height, width)}]``) with test-time augmentation: the average over the augmentations of
    the class probabilities, flips undone. ``model.sem_seg_output`` says what the model
    returns: ``"logits"`` (detectron2's default; softmax taken here) or ``"probabilities"``
    (averaged as they are). One augmented image per forward (``batch_size``): padding a
    batch to its largest image would change whole-image predictions."""

    def __init__(self, model: nn.Module, tta_mapper: ScaleFlipTTAMapper, batch_size: int = 1):
        super().__init__()
        self.model = _unwrap(model)
        self.tta_mapper = tta_mapper
        self.batch_size = batch_size
        output = getattr(self.model, "sem_seg_output", "logits")
        if output not in ("logits", "probabilities"):
            raise ValueError(f"sem_seg_output must be 'logits' or 'probabilities', got {output!r}")
        self.probabilities = output == "probabilities"
        self.train(self.model.training)  # inference_on_dataset restores this mode, also on the model

    def forward(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, torch.Tensor]]:
        return [{"sem_seg": self.average(x)} for x in batched_inputs]

    @torch.no_grad()
    def average(self, dataset_dict: Dict[str, Any]) -> torch.Tensor:
        """(K, height, width): the mean class probabilities of every augmentation."""
        augmented = self.tta_mapper(dataset_dict)
        total, count = None, 0
        for i in range(0, len(augmented), self.batch_size):
            chunk = augmented[i:i + self.batch_size]
            tfms = [d.pop("transforms") for d in chunk]
            with square_pad_at_least(self.model, max(max(d["image"].shape[-2:]) for d in chunk)):
                outputs = self.model(chunk)
            for out, tfm in zip(outputs, tfms):
                p = out["sem_seg"].float()
                p = p if self.probabilities else p.softmax(dim=0)
                p = p.flip(dims=[-1]) if _flipped(tfm) else p
                total = p if total is None else total + p
                count += 1
        return total / count


class RCNNWithTTA(GeneralizedRCNNWithTTA):
    """detectron2's ``GeneralizedRCNNWithTTA`` for a LazyConfig model: the few config
    values it reads come from the model itself, and the square padding follows the largest
    augmented image."""

    def __init__(self, model: nn.Module, tta_mapper: ScaleFlipTTAMapper, batch_size: int = 1):
        model = _unwrap(model)
        if not isinstance(model, GeneralizedRCNN):
            raise TypeError(f"RCNNWithTTA needs a GeneralizedRCNN, got {type(model).__name__}")
        roi = model.roi_heads
        predictor = roi.box_predictor[-1] if isinstance(roi.box_predictor, nn.ModuleList) else roi.box_predictor
        cfg = get_cfg()
        cfg.MODEL.MASK_ON = bool(getattr(roi, "mask_on", False))
        cfg.MODEL.KEYPOINT_ON = bool(getattr(roi, "keypoint_on", False))
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(roi.num_classes)
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = float(predictor.test_nms_thresh)
        cfg.TEST.DETECTIONS_PER_IMAGE = int(predictor.test_topk_per_image)
        super().__init__(cfg, model, tta_mapper=tta_mapper, batch_size=batch_size)
        self.train(model.training)  # inference_on_dataset restores this mode, also on the model

    def _batch_inference(self, batched_inputs, detected_instances=None):
        size = max(max(d["image"].shape[-2:]) for d in batched_inputs)
        with square_pad_at_least(self.model, size):
            return super()._batch_inference(batched_inputs, detected_instances)


def build_tta_model(model: nn.Module, scales: Sequence[float], flip: bool = True) -> nn.Module:
    """The model with test-time augmentation: ``RCNNWithTTA`` for Mask / Cascade Mask R-CNN,
    :class:`SemanticSegmentorWithTTA` for a model with a ``sem_seg_head``."""
    inner = _unwrap(model)
    mapper = ScaleFlipTTAMapper(scales, flip)
    if isinstance(inner, GeneralizedRCNN):
        return RCNNWithTTA(inner, mapper)
    if hasattr(inner, "sem_seg_head"):
        return SemanticSegmentorWithTTA(inner, mapper)
    raise TypeError(f"no test-time augmentation for a {type(inner).__name__} (R-CNN and semantic segmentation "
                    "models have one)")


def enabled_test_aug(cfg) -> Optional[Dict[str, Any]]:
    """The config's ``test.aug`` node when ``enabled`` (``scales``, ``flip``), else None."""
    test = cfg.get("test", None)
    aug = test.get("aug", None) if test is not None and hasattr(test, "get") else None
    if aug is None or not aug.get("enabled", False):
        return None
    return {"scales": list(aug.get("scales")), "flip": bool(aug.get("flip", True))}
