"""RevColV2-L UperNet on ADE20K, 160k iterations: the B recipe with 640x640 crops.

Same optimizer, schedule, layer decay 0.65 and drop path 0.1 (docs/TRAINING.md, recipe sources); the
resize range stays 0.5-2.0 of 2048x512 as in the recipe (mmsegmentation's own 640-crop
configs use 2560x640: set ``dataloader.train.mapper.augmentations[0].target_width=2560``,
``target_height=640`` and the same for ``dataloader.test``).
"""
from .upernet_revcolv2_b_160k import dataloader, lr_multiplier, model, optimizer, test, train

crop_size = 640
train.output_dir = "output/ade20k_upernet_revcolv2_l"
model.backbone.variant = "revcolv2_large"
model.crop_size = (crop_size, crop_size)
model.stride = (426, 426)
dataloader.train.mapper.augmentations[1].crop_size = (crop_size, crop_size)  # the random crop
