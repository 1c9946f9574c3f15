"""A few-minute CPU demo of the ADE20K UperNet pipeline on the built-in synthetic dataset.

The B recipe's code paths (SemSegDatasetMapper with the ADE20K augmentations, UperNet +
aux head, layer-decay AdamW, warm-up + poly schedule, sliding-window SemSegEvaluator) at a
size that trains from scratch on 2 CPU cores: the ``revcolv2_tiny`` preset (width 192, 2 BU +
1 TD columns, the B layout; the size the pre-training demo trains, so its checkpoint loads
through ``train.init_checkpoint``), 64-channel head, 128x128 crops, batch 8, 200 iterations.

    python tools/lazyconfig_train_net.py \
        --config-file projects/RevColV2/configs/demo/upernet_revcolv2_tiny_synthetic.py
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L

from revcolv2_d2.data.ade20k import PhotometricDistortion, ResizeLongShortScale

from ..ADE20K.upernet_revcolv2_b_160k import lr_multiplier, model, optimizer
from ..common.ade20k_synthetic_demo import dataloader, num_classes, test, train

crop_size = 128
scale = (128, 256)  # (short, long) resize target of the synthetic images (96-208 px)

model.backbone.variant = "revcolv2_tiny"
model.backbone.drop_path_rate = 0.0  # from scratch, 200 iterations: no regularisation needed
model.sem_seg_head.num_classes = num_classes
model.sem_seg_head.channels = 64
model.sem_seg_head.aux_channels = 32
model.sem_seg_head.norm = "BN"  # one process
model.crop_size = (crop_size, crop_size)
model.stride = (85, 85)

dataloader.train.mapper.augmentations = [
    L(ResizeLongShortScale)(min_scale=0.5, max_scale=2.0, target_height=scale[0], target_width=scale[1]),
    L(T.RandomCrop_CategoryAreaConstraint)(
        crop_type="absolute", crop_size=(crop_size, crop_size), single_category_max_area=0.75, ignored_category=255
    ),
    L(T.RandomFlip)(horizontal=True),
    L(PhotometricDistortion)(),
]
dataloader.train.total_batch_size = 8
dataloader.test.mapper.augmentations = [
    L(ResizeLongShortScale)(min_scale=1.0, max_scale=1.0, target_height=scale[0], target_width=scale[1]),
]

train.output_dir = "output/demo_upernet_synthetic"
train.max_iter = 200
train.eval_period = 200
train.checkpointer.period = 200

# from scratch: a larger learning rate and no layer decay (it is for pre-trained backbones)
optimizer.lr = 2e-3
optimizer.params.layer_decay = 1.0
lr_multiplier.warmup_length = 20 / train.max_iter
