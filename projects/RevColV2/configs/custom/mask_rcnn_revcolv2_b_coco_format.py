"""Mask R-CNN, RevColV2-B (the COCO recipe), on your own COCO-format instance data.

Give the annotation files and image folders on the command line; the number of classes is
read from the files' ``categories`` (any ids: they are mapped to 0..K-1 in id order, as
detectron2 does), and ``train.max_iter`` sets the schedule (warm-up, then x0.1 at 8/9 and
x0.01 at 26/27 of training, as ViTDet):

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file projects/RevColV2/configs/custom/mask_rcnn_revcolv2_b_coco_format.py \
        dataset.train_json=/data/pets/train.json dataset.train_images=/data/pets/train \
        dataset.val_json=/data/pets/val.json dataset.val_images=/data/pets/val \
        train.init_checkpoint=/path/to/revcolv2_base_mim.pth train.max_iter=20000

The datasets are registered as ``<dataset.name>_train`` / ``_val`` (default ``custom_*``) by
the entry points, before anything is built (``revcolv2_d2.data.custom``). Walk-through:
docs/DETECTION.md, "Train on your own data".
"""
from detectron2.config import LazyCall as L

from revcolv2_d2.data.custom import coco_num_classes, register_coco_format
from revcolv2_d2.schedules import vitdet_multistep

from ..COCO.mask_rcnn_revcolv2_b_50ep import dataloader, model, optimizer, test, train

# the data: set the paths on the command line (an empty one is "not given")
dataset = L(register_coco_format)(
    name="custom",
    train_json="",  # COCO instances JSON of the training split
    train_images="",  # its image folder (each image's file_name is relative to it)
    val_json="",  # the split to evaluate on
    val_images="",
)
dataloader.train.dataset.names = "${dataset.name}_train"
dataloader.test.dataset.names = "${dataset.name}_val"
# as many classes as the files have categories (box, class and mask heads follow it)
model.roi_heads.num_classes = L(coco_num_classes)(train_json="${dataset.train_json}", val_json="${dataset.val_json}")

train.output_dir = "output/custom_mask_rcnn_revcolv2_b"
train.max_iter = 20000
train.eval_period = "${train.max_iter}"  # evaluate at the end (set a number to evaluate more often)
train.checkpointer.period = 5000
lr_multiplier = L(vitdet_multistep)(max_iter="${train.max_iter}", warmup_iters=250)
