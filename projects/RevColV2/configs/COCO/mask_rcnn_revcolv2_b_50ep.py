"""RevColV2-B Mask R-CNN on COCO, 50 epochs (paper's COCO recipe: docs/TRAINING.md, recipe sources).

batch 32, AdamW lr 1e-4, LSJ 1024 with scale [0.1, 2.0], drop path 0.2, layer decay 0.9;
warm-up and step decay as detectron2's ViTDet.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file projects/RevColV2/configs/COCO/mask_rcnn_revcolv2_b_50ep.py \
        train.init_checkpoint=/path/to/revcolv2_base_mim.pth
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from revcolv2_d2.backbone import revcolv2_optimizer_params

from ..common.coco_loader_lsj import dataloader, test
from ..common.mask_rcnn_revcolv2 import model

model.backbone.bottom_up.drop_path_rate = 0.2

# A RevColV2 MIM (or ImageNet fine-tuned) checkpoint of the same size; its keys are mapped
# to backbone.bottom_up.net.* by the RevColV2Checkpointer. No public weights exist.
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = ""
train.compile = False  # True: torch.compile the backbone (compile_levels() when reversible), docs/DETECTION.md
train.amp.enabled = True
train.amp.precision = "bf16"  # or "fp16"; mixed precision is switched off on CPU
train.ddp.fp16_compression = True
train.checkpointer.max_to_keep = 3  # every 5000 iterations, the newest 3 (detectron2 keeps 100)

dataloader.train.total_batch_size = 32
# 50 epochs x 118,287 images / 32 images per iteration = 184,823 iterations
train.max_iter = 184823

# ViTDet's schedule: 250 warm-up iterations from 0.001x, then x0.1 at 8/9 and x0.01 at
# 26/27 of training (163,889 and 177,546 of ViTDet's 184,375 iterations)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01],
        milestones=[164287, 177978],  # round(184823 * 8 / 9), round(184823 * 26 / 27)
        num_updates=train.max_iter,
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-4
# layer decay 0.9 through the shared RevCol layer-id rule (revcolv2/layer_decay.py), with the
# layer ids of the built model (the training script sets optimizer.params.model)
optimizer.params = L(revcolv2_optimizer_params)(
    base_lr="${..lr}",
    layer_decay=0.9,
    weight_decay_norm=0.0,
    overrides={"alphas": {"weight_decay": 0.0}},  # reversible-unit scales
)
