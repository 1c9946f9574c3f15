"""A few-minute CPU demo of the ADE20K Mask2Former pipeline on the built-in synthetic dataset.

The B recipe's code paths (SemSegDatasetMapper with Mask2Former's ADE20K augmentations,
deformable-attention pixel decoder + masked-attention decoder, Hungarian matching and
point-sampled losses, clipped layer-decay AdamW, poly schedule, whole-image
SemSegEvaluator) at a size that trains from scratch on 2 CPU cores: the ``revcolv2_tiny``
preset (width 192, 2 BU + 1 TD columns, the B layout; the size the pre-training demo
trains, so its checkpoint loads through ``train.init_checkpoint``), a 64-wide head with 2
encoder and 3 decoder layers and 16 queries, 96x96 crops, batch 4.

    python tools/lazyconfig_train_net.py \
        --config-file projects/RevColV2/configs/demo/mask2former_revcolv2_tiny_synthetic.py
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from revcolv2_d2.data.ade20k import PhotometricDistortion

from ..ADE20K.mask2former_revcolv2_b_160k import model, optimizer
from ..common.ade20k_synthetic_demo import dataloader, num_classes, test, train

crop_size = 96
test_size = 128  # short side at test time (the synthetic scenes are 96-208 px)

model.backbone.variant = "revcolv2_tiny"
model.backbone.drop_path_rate = 0.0  # from scratch, a few hundred iterations: no regularisation needed
model.backbone.reversible = False  # same gradients; at this size the saved memory is nothing and the rebuild costs time
_head = model.sem_seg_head  # (a leading _ keeps it out of the saved config)
_head.num_classes = num_classes
_head.conv_dim = _head.mask_dim = _head.hidden_dim = 64
_head.num_heads = 4
_head.num_queries = 16
_head.encoder_layers = 2
_head.encoder_feedforward_dim = 128
_head.decoder_layers = 3
_head.dim_feedforward = 256
_head.train_num_points = 576  # the 24x24 mask logits of a 96 crop

# Mask2Former's augmentations scaled to the 96-208 px synthetic scenes (short side 48-192)
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=[int(x * 0.1 * crop_size) for x in range(5, 21)], max_size=4 * crop_size,
        sample_style="choice",
    ),
    L(T.RandomCrop_CategoryAreaConstraint)(
        crop_type="absolute", crop_size=(crop_size, crop_size), single_category_max_area=1.0, ignored_category=255
    ),
    L(PhotometricDistortion)(),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 4
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=test_size, max_size=4 * test_size)]

train.output_dir = "output/demo_mask2former_synthetic"
train.max_iter = 400
train.eval_period = 400
train.checkpointer.period = 400

# from scratch: a larger learning rate, a short warm-up and no layer decay (it is for
# pre-trained backbones)
optimizer.lr = 1e-3
optimizer.params.layer_decay = 1.0
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=0.9),
    warmup_length=20 / train.max_iter,
    warmup_factor=0.01,
)
