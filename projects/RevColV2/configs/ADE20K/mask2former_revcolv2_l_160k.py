"""RevColV2-L Mask2Former on ADE20K, 160k iterations: the B recipe at 640x640.

Same optimizer, schedule, layer decay 0.9 and drop path 0.3 [paper]. The input sizes are
those of Mask2Former's 640-crop ADE20K configs
(facebookresearch/Mask2Former:configs/ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml):
short side 0.5x..2.0x of 640 in 0.1x steps (320..1280), long side at most 2560, 640 crops;
test short side 640, long side at most 2560.
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from .mask2former_revcolv2_b_160k import dataloader, lr_multiplier, model, optimizer, test, train

crop_size = 640
max_size = 2560
train.output_dir = "output/ade20k_mask2former_revcolv2_l"
model.backbone.variant = "revcolv2_large"
_resize, _crop = dataloader.train.mapper.augmentations[:2]  # (a leading _ keeps them out of the saved config)
_resize.short_edge_length = [int(x * 0.1 * crop_size) for x in range(5, 21)]
_resize.max_size = max_size
_crop.crop_size = (crop_size, crop_size)
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=crop_size, max_size=max_size)]
