"""RevColV2-L Cascade Mask R-CNN on COCO, 100 epochs: the B recipe with drop path 0.3."""
from .cascade_mask_rcnn_revcolv2_b_100ep import dataloader, lr_multiplier, model, optimizer, test, train

model.backbone.bottom_up.variant = "revcolv2_large"
model.backbone.bottom_up.global_attn_indexes = (5, 11, 17, 23)
model.backbone.bottom_up.drop_path_rate = 0.3
