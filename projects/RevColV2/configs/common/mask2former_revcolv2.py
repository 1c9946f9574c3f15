"""Mask2Former on RevColV2-B: the last top-down column's four levels (strides 4-32) feed
Mask2Former's multi-scale deformable-attention pixel decoder and masked-attention
transformer decoder (Hugging Face transformers' modules, revcolv2_d2/mask2former.py).
Global attention in every block (512 crops give 32x32 tokens). Whole-image inference.

Values from Mask2Former's ADE20K semantic config
(facebookresearch/Mask2Former:configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml,
"R50 yaml" below)
unless marked [paper] (RevColV2 supplementary section 1.4). The L config changes the sizes.
"""
from detectron2.config import LazyCall as L

from revcolv2_d2.backbone import RevColV2Backbone
from revcolv2_d2.mask2former import Mask2FormerHead, RevColV2Mask2Former
from revcolv2_d2.upernet import revcolv2_level_shapes

model = L(RevColV2Mask2Former)(
    backbone=L(RevColV2Backbone)(
        variant="revcolv2_base",
        window_size=0,  # global attention
        drop_path_rate=0.3,  # [paper]
        reversible=True,
    ),
    sem_seg_head=L(Mask2FormerHead)(
        # the level shapes of the backbone built from these fields (on the meta device), so
        # they follow its preset and any embed_dim / num_heads override
        input_shape=L(revcolv2_level_shapes)(
            variant="${...backbone.variant}",
            embed_dim="${oc.select:...backbone.embed_dim,null}",
            num_heads="${oc.select:...backbone.num_heads,null}",
        ),
        num_classes=150,  # R50 yaml SEM_SEG_HEAD.NUM_CLASSES
        conv_dim=256,  # SEM_SEG_HEAD.CONVS_DIM
        mask_dim=256,  # SEM_SEG_HEAD.MASK_DIM
        hidden_dim=256,  # MASK_FORMER.HIDDEN_DIM
        num_queries=100,  # MASK_FORMER.NUM_OBJECT_QUERIES
        num_heads=8,  # MASK_FORMER.NHEADS
        encoder_layers=6,  # SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS (MSDeformAttnPixelDecoder on strides 8/16/32)
        encoder_feedforward_dim=1024,  # fixed in Mask2Former's MSDeformAttnPixelDecoder.from_config
        decoder_layers=9,  # MASK_FORMER.DEC_LAYERS 10 = 9 masked-attention layers + the initial prediction
        dim_feedforward=2048,  # MASK_FORMER.DIM_FEEDFORWARD
        pre_norm=False,  # MASK_FORMER.PRE_NORM
        dropout=0.0,  # MASK_FORMER.DROPOUT
        enforce_input_projection=False,  # MASK_FORMER.ENFORCE_INPUT_PROJ
        class_weight=2.0,  # MASK_FORMER.CLASS_WEIGHT
        mask_weight=5.0,  # MASK_FORMER.MASK_WEIGHT
        dice_weight=5.0,  # MASK_FORMER.DICE_WEIGHT
        no_object_weight=0.1,  # MASK_FORMER.NO_OBJECT_WEIGHT
        train_num_points=12544,  # MASK_FORMER.TRAIN_NUM_POINTS
        oversample_ratio=3.0,  # MASK_FORMER.OVERSAMPLE_RATIO
        importance_sample_ratio=0.75,  # MASK_FORMER.IMPORTANCE_SAMPLE_RATIO
        deep_supervision=True,  # MASK_FORMER.DEEP_SUPERVISION
    ),
    pixel_mean=[123.675, 116.28, 103.53],  # Base-ADE20K-SemanticSegmentation.yaml, RGB 0-255
    pixel_std=[58.395, 57.12, 57.375],
    ignore_value=255,  # SEM_SEG_HEAD.IGNORE_VALUE
    size_divisibility=32,  # MASK_FORMER.SIZE_DIVISIBILITY
)
