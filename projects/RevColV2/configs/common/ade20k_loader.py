"""ADE20K semantic-segmentation loaders, the usual UperNet recipe (docs/SEGMENTATION.md).

Training: resize so the image fits a random 0.5-2.0 multiple of 2048x512 (long x short
edge, aspect kept), random 512x512 crop in which no single class covers more than 75% of
the labelled pixels (10 tries), horizontal flip, photometric distortion (brightness,
contrast, saturation, hue). Batches are padded to a multiple of 32 (labels with 255).
Test: fit into 2048x512, predict (sliding window in the model), evaluate at the original
resolution with SemSegEvaluator (mIoU, fwIoU, mACC, pACC) on ``ade20k_sem_seg_val``.

Label PNGs are checked by the mapper: same size as the image, values < 150 or 255.
Datasets: ``$DETECTRON2_DATASETS/ADEChallengeData2016`` with ``annotations_detectron2``
(docs/SEGMENTATION.md, tools/prepare_ade20k_sem_seg.py).
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES
from detectron2.evaluation import SemSegEvaluator
from omegaconf import OmegaConf

from revcolv2_d2.data.ade20k import PhotometricDistortion, ResizeLongShortScale, SemSegDatasetMapper
from revcolv2_d2.data.loader import build_train_loader
from revcolv2_d2.tta import ADE20K_SCALES

num_classes = len(ADE20K_SEM_SEG_CATEGORIES)  # 150
ignore_label = 255
crop_size = 512
scale = (512, 2048)  # (short, long) edge of the resize target
ratio_range = (0.5, 2.0)
single_category_max_area = 0.75

dataloader = OmegaConf.create()

# detectron2's build_detection_train_loader, with workers that ignore stop signals
dataloader.train = L(build_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_train"),
    mapper=L(SemSegDatasetMapper)(
        is_train=True,
        augmentations=[
            L(ResizeLongShortScale)(
                min_scale=ratio_range[0], max_scale=ratio_range[1], target_height=scale[0], target_width=scale[1]
            ),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute",
                crop_size=(crop_size, crop_size),
                single_category_max_area=single_category_max_area,
                ignored_category=ignore_label,
            ),
            L(T.RandomFlip)(horizontal=True),
            L(PhotometricDistortion)(),
        ],
        image_format="RGB",
        num_classes=num_classes,
        ignore_label=ignore_label,
    ),
    total_batch_size=16,
    num_workers=4,
)

dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_val", filter_empty=False),
    mapper=L(SemSegDatasetMapper)(
        is_train=False,
        augmentations=[
            L(ResizeLongShortScale)(min_scale=1.0, max_scale=1.0, target_height=scale[0], target_width=scale[1]),
        ],
        image_format="RGB",
        num_classes=num_classes,
        ignore_label=ignore_label,
    ),
    num_workers=4,
)

dataloader.evaluator = L(SemSegEvaluator)(dataset_name="${..test.dataset.names}")

# multi-scale + flip evaluation (BEiT's / mmsegmentation's ADE20K protocol): off;
# `test.aug.enabled=True` evaluates single-scale and at these factors of the test size, each
# also flipped, with the class probabilities averaged, and reports both mIoUs
test = dict(aug=dict(enabled=False, scales=list(ADE20K_SCALES), flip=True))
