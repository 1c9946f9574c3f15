"""UperNet, RevColV2-B (the ADE20K recipe), on your own semantic-segmentation data: a folder
of images and a folder of label PNGs per split, matched by file name, and a class list.

Each label PNG holds, per pixel, the index of its class in the list (0..K-1), or the
ignore value (255 by default) where a pixel counts nowhere. The number of classes is the
list's length; ``train.max_iter`` sets the schedule (1500 warm-up iterations, then poly):

    python tools/lazyconfig_train_net.py --num-gpus 8 \
        --config-file projects/RevColV2/configs/custom/upernet_revcolv2_b_sem_seg_folders.py \
        dataset.train_images=/data/roads/images/train dataset.train_labels=/data/roads/labels/train \
        dataset.val_images=/data/roads/images/val dataset.val_labels=/data/roads/labels/val \
        dataset.classes=/data/roads/classes.txt \
        train.init_checkpoint=/path/to/revcolv2_base_mim.pth train.max_iter=40000

``dataset.classes`` is a text file (one name a line: line i is label value i) or a list
(``dataset.classes=[road,car,sky]``); ``dataset.image_ext`` / ``dataset.label_ext`` (default
``.jpg`` / ``.png``) pick the files. Walk-through: docs/SEGMENTATION.md, "Train on your own
data".
"""
from detectron2.config import LazyCall as L

from revcolv2_d2.data.custom import register_sem_seg_folders, sem_seg_num_classes
from revcolv2_d2.schedules import warmup_poly

from ..ADE20K.upernet_revcolv2_b_160k import dataloader, model, optimizer, test, train

# the data: set the paths and the class list on the command line
dataset = L(register_sem_seg_folders)(
    name="custom",
    train_images="",
    train_labels="",
    val_images="",
    val_labels="",
    classes="",  # a text file, one class name a line, or [name0,name1,...]
    ignore_label=255,
    image_ext=".jpg",
    label_ext=".png",
)
dataloader.train.dataset.names = "${dataset.name}_train"
dataloader.test.dataset.names = "${dataset.name}_val"
# as many classes as the list has; the mappers stop at a label above them (naming the file)
model.sem_seg_head.num_classes = L(sem_seg_num_classes)(classes="${dataset.classes}")
model.sem_seg_head.ignore_value = "${dataset.ignore_label}"
for _mapper in (dataloader.train.mapper, dataloader.test.mapper):
    _mapper.num_classes = "${model.sem_seg_head.num_classes}"
    _mapper.ignore_label = "${dataset.ignore_label}"
dataloader.train.mapper.augmentations[1].ignored_category = "${dataset.ignore_label}"  # the class-area crop

train.output_dir = "output/custom_upernet_revcolv2_b"
train.max_iter = 40000
train.eval_period = "${train.max_iter}"
train.checkpointer.period = 8000
lr_multiplier = L(warmup_poly)(max_iter="${train.max_iter}", warmup_iters=1500)
