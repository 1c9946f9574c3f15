"""RevColV2-B Mask2Former on ADE20K, 160k iterations (the paper's second ADE20K framework).

[paper] (RevColV2 supplementary section 1.4): 160k iterations, batch 16, AdamW lr 2e-5,
drop path 0.3 (in the model config), layer decay 0.9. Everything else is Mask2Former's
ADE20K semantic recipe,
facebookresearch/Mask2Former:configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml
("Base yaml") and maskformer2_R50_bs16_160k.yaml (model, common/mask2former_revcolv2.py).
The paper's layer decay replaces Mask2Former's BACKBONE_MULTIPLIER 0.1.

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file projects/RevColV2/configs/ADE20K/mask2former_revcolv2_b_160k.py \
        train.init_checkpoint=/path/to/revcolv2_base_mim.pth
    python tools/lazyconfig_train_net.py --eval-only --config-file ... \
        train.init_checkpoint=output/ade20k_mask2former_revcolv2_b/model_final.pth
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from revcolv2_d2.data.ade20k import PhotometricDistortion
from revcolv2_d2.mask2former import FullModelGradClipAdamW, mask2former_optimizer_params

from ..common.ade20k_160k import dataloader, test, train
from ..common.ade20k_loader import ignore_label
from ..common.mask2former_revcolv2 import model

crop_size = 512  # Base yaml INPUT.CROP.SIZE
max_size = 2048  # Base yaml INPUT.MAX_SIZE_TRAIN / MAX_SIZE_TEST

# 160k iterations at batch 16 [paper] (Base yaml SOLVER.MAX_ITER, IMS_PER_BATCH), bf16: ../common/ade20k_160k.py
train.output_dir = "output/ade20k_mask2former_revcolv2_b"
train.eval_period = 5000  # Base yaml TEST.EVAL_PERIOD
train.checkpointer.period = 5000  # detectron2's SOLVER.CHECKPOINT_PERIOD default

# Training (Base yaml INPUT, mapper "mask_former_semantic"): short side drawn from
# 0.5x..2.0x of 512 in steps of 0.1x (256, 307, ..., 1024), long side at most 2048; a
# 512x512 crop with no class cap (SINGLE_CATEGORY_MAX_AREA 1.0); SSD colour augmentation
# (COLOR_AUG_SSD: brightness 32, contrast/saturation 0.5-1.5, hue 18, as PhotometricDistortion);
# horizontal flip. Mask2Former pads crops to 512 in its mapper (SIZE_DIVISIBILITY 512); here
# the model pads the batch to a multiple of 32 with ignored labels.
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=[int(x * 0.1 * crop_size) for x in range(5, 21)], max_size=max_size, sample_style="choice"
    ),
    L(T.RandomCrop_CategoryAreaConstraint)(
        crop_type="absolute", crop_size=(crop_size, crop_size), single_category_max_area=1.0,
        ignored_category=ignore_label,
    ),
    L(PhotometricDistortion)(),
    L(T.RandomFlip)(horizontal=True),
]
# Test: short side 512, long side at most 2048 (MIN_SIZE_TEST / MAX_SIZE_TEST), whole image.
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=crop_size, max_size=max_size)]

# Poly decay (power 0.9, detectron2's deeplab POLY_LR_POWER) from the first iteration:
# Base yaml LR_SCHEDULER_NAME WarmupPolyLR with WARMUP_ITERS 0.
lr_multiplier = L(PolynomialDecayParamScheduler)(base_value=1.0, power=0.9)

# AdamW (Base yaml OPTIMIZER ADAMW) with full-model gradient clipping at L2 norm 0.01
# (CLIP_GRADIENTS: CLIP_TYPE full_model, CLIP_VALUE 0.01, NORM_TYPE 2.0); weight decay 0.05
# (WEIGHT_DECAY), none on norms and embeddings (Mask2Former's WEIGHT_DECAY_NORM / _EMBED 0.0).
optimizer = L(FullModelGradClipAdamW)(
    params=L(mask2former_optimizer_params)(
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        weight_decay_embed=0.0,
        # layer decay 0.9 [paper] through the shared RevCol layer-id rule (revcolv2/layer_decay.py)
        # (layer ids of the built model: the training script sets optimizer.params.model)
        layer_decay=0.9,
        overrides={"alphas": {"weight_decay": 0.0}},  # reversible-unit scales
    ),
    lr=2e-5,  # [paper] (at batch 16)
    betas=(0.9, 0.999),
    weight_decay=0.05,
    clip_norm=0.01,
    norm_type=2.0,
)
