"""Demo: a tiny RevColV2 Mask R-CNN trained from scratch on the built-in synthetic shapes.

The COCO recipe in miniature, sized to learn on a 2-core CPU in a few minutes: same
backbone wrapper, FPN and ViTDet-style heads, LSJ at 256 instead of 1024, narrower heads.
The backbone is the ``revcolv2_tiny`` preset as it is, the size that
``configs/pretrain/revcolv2_tiny_demo.yaml`` pre-trains, so that checkpoint loads through
``train.init_checkpoint`` unchanged. The data (``synthetic_shapes_train`` / ``_val``) is
generated under ``$DETECTRON2_DATASETS`` on first use.

    python tools/lazyconfig_train_net.py \
        --config-file projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py
    python tools/lazyconfig_train_net.py \
        --config-file projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py \
        train.init_checkpoint=output/pretrain/revcolv2_tiny_demo/checkpoint-0008.pth
"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ..common.coco_loader_lsj import dataloader, test
from ..common.mask_rcnn_revcolv2 import model

image_size = 256
channels = 64  # FPN and head width (256 in the COCO configs)

# ---------------------------------------------------------------- model
bb = model.backbone.bottom_up
bb.variant = "revcolv2_tiny"  # the preset's size: what the pre-training demo trains
bb.window_size = 0  # 16x16 tokens at 256: global attention everywhere is cheap
bb.global_attn_indexes = ()
bb.drop_path_rate = 0.0
bb.reversible = True
bb.square_pad = image_size
model.backbone.square_pad = image_size
model.backbone.out_channels = channels

model.proposal_generator.head.in_channels = channels
model.proposal_generator.head.conv_dims = [-1]  # one conv (ViTDet: two)
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (250, 100)

roi = model.roi_heads
roi.num_classes = 4
roi.batch_size_per_image = 64
roi.box_head.input_shape = ShapeSpec(channels=channels, height=7, width=7)
roi.box_head.conv_dims = []  # 2fc box head (ViTDet: 4conv1fc)
roi.box_head.fc_dims = [256, 256]
roi.box_predictor.input_shape = ShapeSpec(channels=256)
roi.mask_head.input_shape = ShapeSpec(channels=channels, width=14, height=14)
roi.mask_head.conv_dims = [channels, channels]

# ---------------------------------------------------------------- data
dataloader.train.dataset.names = "synthetic_shapes_train"
dataloader.test.dataset.names = "synthetic_shapes_val"
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=image_size, target_width=image_size),
    L(T.FixedSizeCrop)(crop_size=(image_size, image_size), pad=False),
]
dataloader.train.mapper.instance_mask_format = "bitmask"  # ring masks are RLE
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=image_size, max_size=image_size),
]
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.num_workers = 1

# ---------------------------------------------------------------- schedule
train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.seed = 0  # reproducible demo
train.compile = False  # True: torch.compile the backbone (compile_levels() when reversible), docs/DETECTION.md
train.output_dir = "output/demo/train"
# 600 iterations x 4 images = 3 passes over the 800 training images; measured: box AP50 63.2
# (docs/DETECTION.md)
train.max_iter = 600
train.checkpointer.period = train.max_iter
train.checkpointer.max_to_keep = 3  # detectron2 keeps 100
train.eval_period = train.max_iter
train.log_period = 20

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[round(train.max_iter * 8 / 9), round(train.max_iter * 26 / 27)],
        num_updates=train.max_iter,
    ),
    warmup_length=60 / train.max_iter,
    warmup_factor=0.001,
)

# trained from scratch, so a larger lr than fine-tuning and no layer decay
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 4e-4
optimizer.weight_decay = 0.05
optimizer.params.overrides = {"alphas": {"weight_decay": 0.0}}
