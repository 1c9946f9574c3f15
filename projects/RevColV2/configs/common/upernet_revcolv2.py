"""UperNet on RevColV2-B: the last top-down column's four levels (strides 4-32) feed a
UperNet head (PPM scales 1, 2, 3, 6; 512 channels; FPN fusion) with an auxiliary FCN head
on the stride-16 level (loss weight 0.4). Global attention in every block (512 crops give
32x32 tokens). Inference slides 512x512 windows with stride 341 (``test_mode="whole"``
runs the resized image in one pass). The L config changes the size fields.
"""
from detectron2.config import LazyCall as L

from revcolv2_d2.backbone import RevColV2Backbone
from revcolv2_d2.upernet import RevColV2SemanticSegmentor, UPerHead, revcolv2_level_shapes

model = L(RevColV2SemanticSegmentor)(
    backbone=L(RevColV2Backbone)(
        variant="revcolv2_base",
        window_size=0,  # global attention
        drop_path_rate=0.1,
        reversible=True,
    ),
    sem_seg_head=L(UPerHead)(
        # the level shapes of the backbone built from these fields (on the meta device), so
        # they follow its preset and any embed_dim / num_heads override
        input_shape=L(revcolv2_level_shapes)(
            variant="${...backbone.variant}",
            embed_dim="${oc.select:...backbone.embed_dim,null}",
            num_heads="${oc.select:...backbone.num_heads,null}",
        ),
        num_classes=150,
        channels=512,
        pool_scales=(1, 2, 3, 6),
        norm="SyncBN",
        dropout=0.1,
        ignore_value=255,
        aux_in_feature="td2",
        aux_channels=256,
        aux_loss_weight=0.4,
    ),
    pixel_mean=[123.675, 116.28, 103.53],  # ImageNet, RGB, 0-255
    pixel_std=[58.395, 57.12, 57.375],
    test_mode="slide",
    crop_size=(512, 512),
    stride=(341, 341),
)
