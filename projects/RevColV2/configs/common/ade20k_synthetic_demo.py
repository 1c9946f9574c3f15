"""What the UperNet and Mask2Former CPU demos share: the ADE20K loaders and schedule
(``ade20k_160k.py``) on the built-in ``synthetic_ade`` dataset (generated on first use under
``$DETECTRON2_DATASETS``), on the CPU in fp32 with one loader worker. Each demo sets its
augmentations, batch, iterations and output folder.
"""
from revcolv2_d2.data.synthetic_ade20k import SYNTHETIC_ADE_CLASSES

from .ade20k_160k import dataloader, test, train

num_classes = len(SYNTHETIC_ADE_CLASSES)

dataloader.train.dataset.names = "synthetic_ade_train"
dataloader.train.mapper.num_classes = num_classes
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "synthetic_ade_val"
dataloader.test.mapper.num_classes = num_classes
dataloader.test.num_workers = 1

train.device = "cpu"
train.amp.enabled = False
train.log_period = 20
