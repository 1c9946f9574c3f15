"""RevColV2-B Cascade Mask R-CNN on COCO, 100 epochs (docs/TRAINING.md, recipe sources).

batch 64, AdamW lr 1e-4, LSJ, drop path 0.2, layer decay 0.9, no soft-NMS (plain NMS in
every stage). Cascade heads as detectron2's ViTDet cascade configs (4conv1fc, LN).
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .mask_rcnn_revcolv2_b_50ep import dataloader, lr_multiplier, model, optimizer, test, train

# arguments that Cascade R-CNN does not take
[model.roi_heads.pop(k) for k in ["box_head", "box_predictor", "proposal_matcher"]]
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in range(3)
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False)
        for th in [0.5, 0.6, 0.7]
    ],
)

dataloader.train.total_batch_size = 64
# 100 epochs x 118,287 images / 64 images per iteration = 184,823 iterations
train.max_iter = 184823
lr_multiplier.scheduler.milestones = [164287, 177978]  # 8/9 and 26/27 of training, as ViTDet
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 250 / train.max_iter
