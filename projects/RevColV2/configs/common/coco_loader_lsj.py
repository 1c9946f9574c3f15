"""COCO 2017 loaders with large-scale jitter (LSJ), as detectron2's ViTDet trains.

Training: random flip, resize by a random factor in [0.1, 2.0] of 1024x1024, crop to at
most 1024x1024 (boxes recomputed from the cropped masks); the model pads to a 1024 square
(the FPN's ``square_pad``). Test: longest side 1024. Evaluation: COCOEvaluator on
``coco_2017_val``. The mappers name a missing or unreadable image file in their error.
The training loader is detectron2's, built by ``revcolv2_d2.data.loader.build_train_loader``
so that its workers ignore stop signals (the trainer saves a checkpoint first).
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from revcolv2_d2.data.coco_checks import CheckedDatasetMapper
from revcolv2_d2.data.loader import build_train_loader
from revcolv2_d2.tta import COCO_SCALES

image_size = 1024
lsj_scale = (0.1, 2.0)  # paper: large-scale jitter scale range (docs/TRAINING.md)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train._target_ = build_train_loader  # detectron2's loader, workers ignoring stop signals
dataloader.train.mapper._target_ = CheckedDatasetMapper
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),  # flip first, as ViTDet
    L(T.ResizeScale)(
        min_scale=lsj_scale[0], max_scale=lsj_scale[1], target_height=image_size, target_width=image_size
    ),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.recompute_boxes = True  # boxes of cropped objects come from their masks
dataloader.train.total_batch_size = 64

dataloader.test.mapper._target_ = CheckedDatasetMapper
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]

# test-time augmentation (detectron2's GeneralizedRCNNWithTTA): off; `test.aug.enabled=True`
# evaluates single-scale and at these factors of the test size (detectron2's TEST.AUG.MIN_SIZES
# 400-1200 over its test size 800), each also flipped, and reports both
test = dict(aug=dict(enabled=False, scales=list(COCO_SCALES), flip=True))
