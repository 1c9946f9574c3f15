"""ADE20K semantic segmentation: the label-checking mapper and ADE20K's training
augmentations.

ADE20K itself (``ade20k_sem_seg_train`` / ``_val``) is registered by detectron2 from
``$DETECTRON2_DATASETS/ADEChallengeData2016`` (images + ``annotations_detectron2``, made by
``tools/prepare_ade20k_sem_seg.py``); the built-in stand-in that demos and tests use is in
:mod:`revcolv2_d2.data.synthetic_ade20k`.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "IGNORE_LABEL",
    "read_sem_seg_label",
    "check_sem_seg_label",
    "SemSegDatasetMapper",
    "ResizeLongShortScale",
    "PhotometricDistortion",
]

IGNORE_LABEL = 255

# ------------------------------------------------------------------ label checks + mapper
def read_sem_seg_label(path: str) -> np.ndarray:
    """A class-index PNG as it is stored (no colour conversion): (H, W) uint8."""
    with PathManager.open(path, "rb") as f:
        label = np.asarray(Image.open(f))
    if label.ndim != 2:
        raise ValueError(
            f"semantic-segmentation label {path} has shape {label.shape}: expected a single-channel "
            "PNG of class indices (mode L or P), not a colour image"
        )
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"semantic-segmentation label {path} holds values outside 0..255")
        label = label.astype(np.uint8)
    return label


def check_sem_seg_label(label: np.ndarray, image_hw: Sequence[int], label_file: str, image_file: str,
                        num_classes: Optional[int], ignore_label: int = IGNORE_LABEL) -> None:
    """Raise ``ValueError`` naming the file when the label does not fit its image or classes."""
    if tuple(label.shape[:2]) != tuple(image_hw):
        raise ValueError(
            f"semantic-segmentation label {label_file} is {label.shape[1]}x{label.shape[0]} (width x height) but its "
            f"image {image_file} is {image_hw[1]}x{image_hw[0]}"
        )
    if num_classes is not None:
        values = np.unique(label)
        bad = values[(values >= num_classes) & (values != ignore_label)]
        if bad.size:
            raise ValueError(
                f"semantic-segmentation label {label_file} has values {bad.tolist()}: expected class "
                f"indices 0..{num_classes - 1} or {ignore_label} (ignore). ADE20K's official "
                "annotations must be converted first (tools/prepare_ade20k_sem_seg.py)"
            )


class SemSegDatasetMapper(DatasetMapper):
    """detectron2's ``DatasetMapper`` for semantic segmentation, checking each label first.

    The label PNG is read as stored (class indices, no conversion), then checked against its
    image (same size) and the class count (values below ``num_classes`` or ``ignore_label``)
    before the augmentations run; a bad file is an error naming it.
    """

    def __init__(self, is_train: bool = True, *, augmentations: List, image_format: str = "RGB",
                 num_classes: Optional[int] = None, ignore_label: int = IGNORE_LABEL):
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)
        self.num_classes = num_classes
        self.ignore_label = ignore_label

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        label = None
        if "sem_seg_file_name" in dataset_dict:
            label_file = dataset_dict.pop("sem_seg_file_name")
            label = read_sem_seg_label(label_file)
            check_sem_seg_label(label, image.shape[:2], label_file, dataset_dict["file_name"],
                                self.num_classes, self.ignore_label)
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if aug_input.sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        return dataset_dict


# ------------------------------------------------------------------ augmentations
class ResizeLongShortScale(T.ResizeScale):
    """detectron2's ``ResizeScale`` with the target box read as (short, long) edges.

    ``ResizeScale`` fits the image into ``scale * (target_height, target_width)``; the
    ADE20K recipe ("resize to 0.5-2.0 of 2048x512", mmseg's keep-ratio rule) fits the
    *long* edge into ``scale * 2048`` and the *short* edge into ``scale * 512``, so portrait
    images are treated like landscape ones. ``min_scale == max_scale == 1`` is the test
    resize.
    """

    def _get_resize(self, image: np.ndarray, scale: float) -> T.Transform:
        h, w = image.shape[:2]
        short_t, long_t = sorted((self.target_height, self.target_width))
        factor = min(long_t * scale / max(h, w), short_t * scale / min(h, w))
        new_h, new_w = max(int(round(h * factor)), 1), max(int(round(w * factor)), 1)
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


def _photometric(image: np.ndarray, brightness: Optional[float], contrast: Optional[float],
                 contrast_first: bool, saturation: Optional[float], hue: Optional[int]) -> np.ndarray:
    img = image.astype(np.float32)
    if brightness is not None:
        img = img + brightness
    if contrast is not None and contrast_first:
        img = img * contrast
    if saturation is not None or hue is not None:
        hsv = cv2.cvtColor(img.clip(0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
        if saturation is not None:
            hsv[..., 1] = (hsv[..., 1] * saturation).clip(0, 255)
        if hue is not None:
            hsv[..., 0] = (hsv[..., 0] + hue) % 180
        img = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    if contrast is not None and not contrast_first:
        img = img * contrast
    return img.clip(0, 255).astype(np.uint8)


class PhotometricDistortion(T.Augmentation):
    """The segmentation recipes' photometric distortion, as a ``ColorTransform`` on RGB uint8.

    Each step happens with probability 0.5: brightness shift in +-``brightness_delta``;
    contrast scale in ``contrast_range`` (randomly before or after the colour steps);
    saturation scale in ``saturation_range``; hue shift in +-``hue_delta`` (OpenCV's 0..180 hue).
    """

    def __init__(self, brightness_delta: float = 32, contrast_range: Tuple[float, float] = (0.5, 1.5),
                 saturation_range: Tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        rand = np.random.rand
        params = dict(
            brightness=np.random.uniform(-self.brightness_delta, self.brightness_delta) if rand() < 0.5 else None,
            contrast=np.random.uniform(*self.contrast_range) if rand() < 0.5 else None,
            contrast_first=bool(rand() < 0.5),
            saturation=np.random.uniform(*self.saturation_range) if rand() < 0.5 else None,
            hue=int(np.random.randint(-self.hue_delta, self.hue_delta + 1)) if rand() < 0.5 else None,
        )
        return T.ColorTransform(lambda img: _photometric(img, **params))
