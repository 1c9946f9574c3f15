"""RevColV2-L Mask R-CNN on COCO, 50 epochs: the B recipe with drop path 0.3 (paper; the
recipe sources are in docs/TRAINING.md)."""
from .mask_rcnn_revcolv2_b_50ep import dataloader, lr_multiplier, model, optimizer, test, train

model.backbone.bottom_up.variant = "revcolv2_large"
# 24 blocks (4 BU + 2 TD columns x 4 levels); global attention in 4 of them, as ViTDet-L
model.backbone.bottom_up.global_attn_indexes = (5, 11, 17, 23)
model.backbone.bottom_up.drop_path_rate = 0.3
