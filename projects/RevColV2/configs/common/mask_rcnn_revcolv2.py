"""Mask R-CNN with a RevColV2 backbone: the last top-down column's four levels at strides
4, 8, 16, 32 feed an FPN (LayerNorm, p2-p6, square padding to 1024). Heads as detectron2's
ViTDet (LN convs, 2-conv RPN head, 4conv1fc box head). RevColV2-B; the L config changes the
size fields.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from revcolv2_d2.backbone import LEVEL_NAMES, RevColV2Backbone

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model  # RGB, ImageNet mean/std

model.backbone = L(FPN)(
    bottom_up=L(RevColV2Backbone)(
        variant="revcolv2_base",
        # ViTDet: 14x14 windows at 1024 (64x64 tokens) with a few global blocks spread through
        # depth; indexes count blocks in execution order (12 for B: 2 BU + 1 TD columns x 4)
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
        drop_path_rate=0.2,
        reversible=True,
        square_pad=1024,
    ),
    in_features=list(LEVEL_NAMES),
    out_channels=256,
    norm="LN",
    top_block=L(LastLevelMaxPool)(),
    square_pad=1024,
)
