"""Every value of every recipe file (``configs/**/*.yaml``) and detectron2 LazyConfig
(``projects/RevColV2/configs/**/*.py``) is pinned by a table row naming its source.

The expected values below were copied from the sources they name, not read from the config
files: the paper's supplementary (Tables 1-4, section 1.4 and the text; see
``docs/TRAINING.md``, recipe sources), MAE (its pre-training, fine-tuning and linear-probing
scripts and appendix Tables 9 / 11), ViTDet (detectron2's ViTDet project configs),
detectron2's model zoo (its ``common`` configs), mmsegmentation (the ADE20K dataset, UperNet
model and 160k schedule configs), BEiT's UperNet configs, Mask2Former's ADE20K semantic
configs; each row names the file as ``owner/repository:path``. Values
that are this project's own choice say ``ours``; the CPU demos' shrunk values ``demo``;
settings of a run rather than of the recipe ``run-time``.

- A YAML recipe, with its ``_base_`` files merged, must equal its table exactly: a changed,
  added or dropped value fails.
- A LazyConfig value must equal its row; and every value of the loaded config must either
  have a row or be inherited unchanged from the detectron2 model-zoo config it starts from
  (``common/models/mask_rcnn_vitdet.py``, ``common/data/coco.py``, ``common/train.py``,
  ``common/optim.py``), checked against detectron2's own file at test time.

(``test_recipes.py``, ``test_coco_configs.py``, ``test_ade20k_configs.py`` and
``test_mask2former_configs.py`` check the recipes' meaning: built models, schedules, layer
decay; this file pins each number to its source.)
"""
import copy
import functools
import os

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from revcolv2.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_DIR = os.path.join(ROOT, "configs")
D2_DIR = os.path.join(ROOT, "projects", "RevColV2", "configs")

# ----------------------------------------------------------------------------- sources
T1, T2, T3, T4 = ("paper: supplementary Table 1 (MIM pre-training)", "paper: supplementary Table 2 (IN-22K)",
                  "paper: supplementary Table 3 (IN-1K after MIM)", "paper: supplementary Table 4 (IN-1K after 22K)")
PAPER_TEXT = "paper: text (supervised baseline EMA 0.999; linear probing LARS 90 epochs)"
MAE = "facebookresearch/mae:"
MAE_PRE = f"MAE ({MAE}main_pretrain.py defaults, {MAE}PRETRAIN.md)"
MAE_FT = f"MAE ({MAE}main_finetune.py defaults, {MAE}util/datasets.py build_transform)"
MAE_SUP = "MAE: appendix Table 11 (supervised ViT from scratch)"
MAE_LIN = f"MAE ({MAE}main_linprobe.py defaults, {MAE}util/lars.py; appendix Table 9)"
OURS, DEMO, RUN_TIME = "ours", "demo", "run-time"
TRAIN_LOADER = OURS + ": detectron2's build_detection_train_loader, its workers ignoring stop signals"

PAPER_COCO = "paper: COCO recipe (supplementary; docs/TRAINING.md)"
PAPER_ADE = "paper: ADE20K UperNet recipe (supplementary; docs/TRAINING.md)"
PAPER_M2F = "paper: supplementary section 1.4 (Mask2Former)"
D2 = "facebookresearch/detectron2:"
VITDET_LSJ = f"ViTDet ({D2}projects/ViTDet/configs/common/coco_loader_lsj.py)"
VITDET_B = f"ViTDet ({D2}projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py)"
VITDET_L = f"ViTDet ({D2}projects/ViTDet/configs/COCO/mask_rcnn_vitdet_l_100ep.py)"
VITDET_CASCADE = f"ViTDet ({D2}projects/ViTDet/configs/COCO/cascade_mask_rcnn_vitdet_b_100ep.py)"
D2_VITDET_MODEL = f"detectron2 ({D2}configs/common/models/mask_rcnn_vitdet.py)"
D2_OPTIM = f"detectron2 ({D2}configs/common/optim.py, AdamW)"
D2_DEFAULTS = f"detectron2 ({D2}detectron2/config/defaults.py)"
MMSEG = "open-mmlab/mmsegmentation:"
MMSEG_ADE = f"mmseg ({MMSEG}configs/_base_/datasets/ade20k.py)"
MMSEG_UPERNET = f"mmseg ({MMSEG}configs/_base_/models/upernet_r50.py)"
MMSEG_160K = (f"mmseg 0.x ({MMSEG}configs/_base_/schedules/schedule_160k.py, {MMSEG}configs/_base_/default_runtime.py; "
              "inherited by BEiT's UperNet configs)")
BEIT = "microsoft/unilm:beit/semantic_segmentation/configs/beit/upernet/"
BEIT_B = f"BEiT ({BEIT}upernet_beit_base_12_512_slide_160k_ade20k_pt2ft.py)"
BEIT_L = f"BEiT ({BEIT}upernet_beit_large_24_640_slide_160k_ade20k_pt2ft.py)"
M2F = "facebookresearch/Mask2Former:configs/ade20k/semantic-segmentation/"
M2F_BASE = f"Mask2Former ({M2F}Base-ADE20K-SemanticSegmentation.yaml)"
M2F_R50 = f"Mask2Former ({M2F}maskformer2_R50_bs16_160k.yaml)"
M2F_640 = f"Mask2Former ({M2F}swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml)"
M2F_CODE = "Mask2Former (facebookresearch/Mask2Former:mask2former/config.py; MSDeformAttnPixelDecoder.from_config)"

RANDAUG = "rand-m9-mstd0.5-inc1"  # RandAug(9, 0.5) in timm's spelling, as MAE writes it
COCO_TRAIN_IMAGES = 118287  # COCO train2017
IMAGENET_MEAN_255, IMAGENET_STD_255 = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


# ----------------------------------------------------------------------------- YAML recipes
def _rows(**sections):
    """{"section.key": (value, source)} from section=dict(key=(value, source))."""
    return {f"{s}.{k}": row for s, keys in sections.items() for k, row in keys.items()}


PRETRAIN = _rows(
    model=dict(name=(None, RUN_TIME), reversible=(True, OURS), kwargs=({}, RUN_TIME),
               mask_ratio=(0.75, MAE_PRE + " --mask_ratio"), norm_pix_loss=(True, MAE_PRE + " --norm_pix_loss"),
               drop_path_rate=(0.0, T1)),
    data=dict(input_size=(224, MAE_PRE), crop_scale=([0.2, 1.0], MAE_PRE + " RandomResizedCrop(scale=(0.2, 1.0))"),
              hflip=(0.5, MAE_PRE + " RandomHorizontalFlip()")),
    optim=dict(betas=([0.9, 0.95], T1), base_lr=(1.5e-4, T1), weight_decay=(0.05, T1), batch_size=(4096, T1)),
    schedule=dict(epochs=(1600, T1), warmup_epochs=(40, T1), min_lr=(0.0, MAE_PRE + " --min_lr")),
    train=dict(batch_per_gpu=(64, RUN_TIME), amp=("bf16", RUN_TIME), save_every=(20, RUN_TIME),
               keep_last=(2, RUN_TIME), keep_every=(200, RUN_TIME), vis_every=(20, RUN_TIME),
               vis_images=(4, RUN_TIME), log_every=(20, RUN_TIME)),
)
FINETUNE_T3 = _rows(
    model=dict(name=(None, RUN_TIME), num_classes=(None, RUN_TIME), reversible=(True, OURS), kwargs=({}, RUN_TIME),
               drop_path_rate=(0.1, T3), head_init_scale=(0.001, T3)),
    data=dict(input_size=(224, MAE_FT), crop_scale=([0.08, 1.0], MAE_FT + " (timm's RandomResizedCrop scale)"),
              auto_augment=(RANDAUG, T3 + ": RandAug(9, 0.5)"), interpolation=("bicubic", MAE_FT),
              re_prob=(0.25, MAE_FT + " --reprob"), crop_pct=(0.875, MAE_FT + ": 224 / 256")),
    mixup=dict(mixup=(0.8, T3), cutmix=(1.0, T3), label_smoothing=(0.1, T3)),
    optim=dict(betas=([0.9, 0.999], T3), base_lr=(5e-4, T3), weight_decay=(0.05, T3), layer_decay=(0.75, T3),
               batch_size=(1024, T3), clip_grad=(None, MAE_FT + " --clip_grad")),
    schedule=dict(epochs=(100, T3 + " (B)"), warmup_epochs=(5, T3), min_lr=(1e-6, MAE_FT + " --min_lr")),
    ema=dict(decay=(0.9999, T3)),
    train=dict(batch_per_gpu=(64, RUN_TIME), eval_batch=(128, RUN_TIME), amp=("bf16", RUN_TIME),
               log_every=(20, RUN_TIME)),
)
FINETUNE_T2 = {**FINETUNE_T3, **_rows(
    optim=dict(base_lr=(2.5e-4, T2), weight_decay=(0.05, T2), layer_decay=(0.8, T2), batch_size=(4096, T2)),
    schedule=dict(epochs=(90, T2), warmup_epochs=(5, T2)),
    ema=dict(decay=(None, T2 + ": no EMA")),
)}
FINETUNE_T4 = {**FINETUNE_T3, **_rows(
    mixup=dict(mixup=(0.0, T4 + ": none"), cutmix=(0.0, T4 + ": none"), label_smoothing=(0.1, T4)),
    optim=dict(base_lr=(2.5e-5, T4), weight_decay=(0.01, T4), layer_decay=(0.9, T4), batch_size=(512, T4)),
    schedule=dict(epochs=(30, T4), warmup_epochs=(0, T4 + ": no warm-up")),
    ema=dict(decay=(0.9999, T4)),
)}
SUPERVISED = {**FINETUNE_T3, **_rows(
    optim=dict(betas=([0.9, 0.95], MAE_SUP), base_lr=(1e-4, MAE_SUP), weight_decay=(0.3, MAE_SUP),
               layer_decay=(1.0, MAE_SUP + ": no layer decay from scratch"), batch_size=(4096, MAE_SUP)),
    schedule=dict(epochs=(300, MAE_SUP + " (B)"), warmup_epochs=(20, MAE_SUP)),
    ema=dict(decay=(0.999, PAPER_TEXT)),
)}
LINEAR_PROBE = _rows(
    model=dict(name=(None, RUN_TIME), num_classes=(None, RUN_TIME), kwargs=({}, RUN_TIME)),
    data=dict(input_size=(224, MAE_LIN), crop_scale=([0.08, 1.0], MAE_LIN + " RandomResizedCrop default scale"),
              interpolation=("bicubic", MAE_LIN), crop_pct=(0.875, MAE_LIN + ": Resize(256) + CenterCrop(224)")),
    optim=dict(base_lr=(0.1, MAE_LIN + " --blr"), weight_decay=(0.0, MAE_LIN), momentum=(0.9, MAE_LIN + " LARS"),
               trust_coeff=(0.001, MAE_LIN + " LARS trust_coefficient"), batch_size=(16384, MAE_LIN)),
    schedule=dict(epochs=(90, PAPER_TEXT), warmup_epochs=(10, MAE_LIN), min_lr=(0.0, MAE_LIN)),
    train=dict(batch_per_gpu=(256, RUN_TIME), eval_batch=(256, RUN_TIME), amp=("bf16", RUN_TIME),
               log_every=(20, RUN_TIME)),
)


def _with(table, **changes):
    """``table`` with ``changes`` ({"section__key": (value, source)}) applied."""
    return {**table, **{k.replace("__", "."): v for k, v in changes.items()}}


B, L = "revcolv2_base", "revcolv2_large"
YAML_TABLES = {
    "pretrain/_table1.yaml": PRETRAIN,
    "pretrain/revcolv2_base.yaml": _with(PRETRAIN, model__name=(B, OURS)),
    "pretrain/revcolv2_large.yaml": _with(PRETRAIN, model__name=(L, OURS)),
    "pretrain/revcolv2_tiny_demo.yaml": _with(
        PRETRAIN, model__name=("revcolv2_tiny", DEMO), data__input_size=(96, DEMO), optim__base_lr=(1e-3, DEMO),
        optim__batch_size=(64, DEMO), schedule__epochs=(8, DEMO), schedule__warmup_epochs=(1, DEMO),
        train__batch_per_gpu=(64, RUN_TIME), train__save_every=(2, RUN_TIME), train__vis_every=(2, RUN_TIME),
        train__log_every=(5, RUN_TIME)),
    "finetune/_table3_in1k_after_mim.yaml": FINETUNE_T3,
    "finetune/_table2_in22k.yaml": FINETUNE_T2,
    "finetune/_table4_in1k_after_in22k.yaml": FINETUNE_T4,
    "finetune/_supervised_baseline.yaml": SUPERVISED,
    "finetune/revcolv2_base_in1k.yaml": _with(FINETUNE_T3, model__name=(B, OURS)),
    "finetune/revcolv2_large_in1k.yaml": _with(FINETUNE_T3, model__name=(L, OURS), schedule__epochs=(50, T3 + " (L)")),
    "finetune/revcolv2_base_in22k.yaml": _with(FINETUNE_T2, model__name=(B, OURS), model__drop_path_rate=(0.1, T2)),
    "finetune/revcolv2_large_in22k.yaml": _with(FINETUNE_T2, model__name=(L, OURS),
                                                model__drop_path_rate=(0.2, T2 + " (L)")),
    "finetune/revcolv2_base_in1k_after_in22k.yaml": _with(FINETUNE_T4, model__name=(B, OURS),
                                                          model__drop_path_rate=(0.1, T4 + " (B)")),
    "finetune/revcolv2_large_in1k_after_in22k.yaml": _with(FINETUNE_T4, model__name=(L, OURS),
                                                           model__drop_path_rate=(0.2, T4 + " (L)")),
    "finetune/revcolv2_base_supervised.yaml": _with(SUPERVISED, model__name=(B, OURS),
                                                    model__drop_path_rate=(0.1, MAE_SUP + " (B)")),
    "finetune/revcolv2_large_supervised.yaml": _with(SUPERVISED, model__name=(L, OURS),
                                                     model__drop_path_rate=(0.2, MAE_SUP + " (L)"),
                                                     schedule__epochs=(200, MAE_SUP + " (L)")),
    "finetune/revcolv2_tiny_demo.yaml": _with(
        FINETUNE_T3, model__name=("revcolv2_tiny", DEMO), data__input_size=(96, DEMO),
        data__crop_scale=([0.35, 1.0], DEMO), optim__base_lr=(8e-3, DEMO), optim__batch_size=(64, DEMO),
        schedule__epochs=(8, DEMO), schedule__warmup_epochs=(1, DEMO), ema__decay=(0.99, DEMO)),
    "linear_probe/_mae_protocol.yaml": LINEAR_PROBE,
    "linear_probe/revcolv2_base.yaml": _with(LINEAR_PROBE, model__name=(B, OURS)),
    "linear_probe/revcolv2_large.yaml": _with(LINEAR_PROBE, model__name=(L, OURS)),
    "linear_probe/revcolv2_tiny_demo.yaml": _with(
        LINEAR_PROBE, model__name=("revcolv2_tiny", DEMO), data__input_size=(96, DEMO), optim__base_lr=(0.4, DEMO),
        optim__batch_size=(256, DEMO), schedule__epochs=(10, DEMO), schedule__warmup_epochs=(1, DEMO),
        train__batch_per_gpu=(128, RUN_TIME)),
}


def _flat(node, prefix=""):
    """{"a.b": value} of a nested dict; an empty dict is a value."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(actual, expected) -> bool:
    return type(actual) is type(expected) and actual == expected or (
        isinstance(expected, float) and isinstance(actual, float) and actual == pytest.approx(expected, rel=1e-12))


def test_every_yaml_recipe_has_a_table():
    files = sorted(os.path.relpath(os.path.join(d, n), YAML_DIR)
                   for d, _, names in os.walk(YAML_DIR) for n in names if n.endswith(".yaml"))
    assert files == sorted(YAML_TABLES)


@pytest.mark.parametrize("rel", sorted(YAML_TABLES))
def test_yaml_recipe_equals_its_table(rel):
    actual = _flat(load_config(os.path.join(YAML_DIR, rel)))
    table = YAML_TABLES[rel]
    wrong = [f"{k}: {actual[k]!r}, its source ({src}) says {v!r}" for k, (v, src) in table.items()
             if k in actual and not _same(actual[k], v)]
    missing = sorted(set(table) - set(actual))
    unpinned = sorted(set(actual) - set(table))
    assert not (wrong or missing or unpinned), (
        f"{rel}:\n" + "\n".join(wrong) + (f"\nmissing: {missing}" if missing else "")
        + (f"\nvalues no table row pins (add a row naming the source): {unpinned}" if unpinned else ""))


# ----------------------------------------------------------------------------- LazyConfigs
def aug(target, **kwargs):
    """A LazyCall in a table: its arguments and the name of what it calls."""
    return {**kwargs, "_target_": target}


def short_edges(crop):
    """Mask2Former's MIN_SIZE_TRAIN: [int(x * 0.1 * crop) for x in range(5, 21)], 0.5x-2.0x of the crop."""
    return [int(x * 0.1 * crop) for x in range(5, 21)]


OPT_PARAMS_COCO = aug("revcolv2_optimizer_params", base_lr="${..lr}", layer_decay=0.9, weight_decay_norm=0.0,
                      overrides={"alphas": {"weight_decay": 0.0}})


def coco_rows(epochs, batch, variant, drop_path, global_blocks, cascade):
    max_iter = round(epochs * COCO_TRAIN_IMAGES / batch)
    rows = {
        # data: ViTDet's LSJ loaders
        "dataloader.train._target_": ("build_train_loader", TRAIN_LOADER),
        "dataloader.train.mapper._target_": ("CheckedDatasetMapper", OURS + ": DatasetMapper naming a missing image"),
        "dataloader.train.mapper.augmentations": ([
            aug("RandomFlip", horizontal=True),
            aug("ResizeScale", min_scale=0.1, max_scale=2.0, target_height=1024, target_width=1024),
            aug("FixedSizeCrop", crop_size=[1024, 1024], pad=False)],
            VITDET_LSJ + "; " + PAPER_COCO + ": LSJ [0.1, 2.0]"),
        "dataloader.train.mapper.image_format": ("RGB", VITDET_LSJ),
        "dataloader.train.mapper.recompute_boxes": (True, VITDET_LSJ),
        "dataloader.train.total_batch_size": (batch, PAPER_COCO),
        "dataloader.test.mapper._target_": ("CheckedDatasetMapper", OURS),
        "dataloader.test.mapper.augmentations": ([aug("ResizeShortestEdge", short_edge_length=1024, max_size=1024)],
                                                 VITDET_LSJ),
        # backbone: RevColV2 in ViTDet's place, an FPN on its four levels
        "model.backbone._target_": ("FPN", OURS + ": four levels feed an FPN"),
        "model.backbone.bottom_up": (aug("RevColV2Backbone", variant=variant, window_size=14,
                                         global_attn_indexes=global_blocks, drop_path_rate=drop_path,
                                         reversible=True, square_pad=1024),
                                     f"{D2_VITDET_MODEL} (window 14, square pad 1024); "
                                     f"{VITDET_B if variant == B else VITDET_L} (global blocks); {PAPER_COCO} "
                                     f"(drop path); {OURS} (reversible)"),
        "model.backbone.in_features": (["td0", "td1", "td2", "td3"], OURS + ": the last TD column's levels"),
        "model.backbone.out_channels": (256, D2_VITDET_MODEL),
        "model.backbone.norm": ("LN", D2_VITDET_MODEL),
        "model.backbone.top_block": (aug("LastLevelMaxPool"), D2_VITDET_MODEL),
        "model.backbone.square_pad": (1024, D2_VITDET_MODEL),
        # schedule and optimizer
        "train.max_iter": (max_iter, f"{PAPER_COCO}: {epochs} epochs at batch {batch}"),
        "train.init_checkpoint": ("", RUN_TIME),
        "train.amp.enabled": (True, VITDET_B),
        "train.amp.precision": ("bf16", RUN_TIME),
        "train.ddp.fp16_compression": (True, VITDET_B),
        "train.checkpointer.max_to_keep": (3, OURS),
        "lr_multiplier": (aug("WarmupParamScheduler", scheduler=aug(
            "MultiStepParamScheduler", values=[1.0, 0.1, 0.01],
            milestones=[round(max_iter * 8 / 9), round(max_iter * 26 / 27)], num_updates=max_iter),
            warmup_length=250 / max_iter, warmup_factor=0.001),
            VITDET_B + ": x0.1 at 163889 and x0.01 at 177546 of 184375 (8/9, 26/27); "
            "250 warm-up iterations from 0.001"),
        "optimizer._target_": ("AdamW", D2_OPTIM),
        "optimizer.lr": (1e-4, PAPER_COCO),
        "optimizer.betas": ([0.9, 0.999], D2_OPTIM),
        "optimizer.weight_decay": (0.1, D2_OPTIM + " as ViTDet uses it"),
        "optimizer.params": (OPT_PARAMS_COCO, PAPER_COCO + ": layer decay 0.9; " + D2_OPTIM
                             + ": no decay on norms; ours: none on the reversible alphas"),
    }
    if cascade:
        rows["model.roi_heads._target_"] = ("CascadeROIHeads", VITDET_CASCADE)
        rows["model.roi_heads.box_heads"] = ([aug(
            "FastRCNNConvFCHead", input_shape=dict(channels=256, height=7, width=7, stride=None),
            conv_dims=[256, 256, 256, 256], fc_dims=[1024], conv_norm="LN")] * 3, VITDET_CASCADE)
        rows["model.roi_heads.box_predictors"] = ([aug(
            "FastRCNNOutputLayers", input_shape=dict(channels=1024, height=None, width=None, stride=None),
            test_score_thresh=0.05, box2box_transform=aug("Box2BoxTransform", weights=[w1, w1, w2, w2]),
            cls_agnostic_bbox_reg=True, num_classes="${...num_classes}") for w1, w2 in [(10, 5), (20, 10), (30, 15)]],
            VITDET_CASCADE + " (plain NMS: no soft-NMS, " + PAPER_COCO + ")")
        rows["model.roi_heads.proposal_matchers"] = ([aug(
            "Matcher", thresholds=[t], labels=[0, 1], allow_low_quality_matches=False) for t in (0.5, 0.6, 0.7)],
            VITDET_CASCADE)
    return rows


SEM_SEG_MAPPER = dict(image_format=("RGB", MMSEG_ADE + " to_rgb=True"),
                      ignore_label=(255, MMSEG_ADE + " reduce_zero_label: 'other' ignored"))


def ade_loader_rows(num_classes=150, classes_source="ADE20K's 150 classes", train_names="ade20k_sem_seg_train",
                    test_names="ade20k_sem_seg_val", names_source="detectron2's built-in ADE20K datasets",
                    workers=(4, MMSEG_ADE + " num_workers 4"),
                    batch=(16, PAPER_ADE + "; " + M2F_BASE + " IMS_PER_BATCH")):
    """The ADE20K loaders of common/ade20k_loader.py (the UperNet recipe's augmentations)."""
    return {
        "dataloader.train._target_": ("build_train_loader", TRAIN_LOADER),
        "dataloader.train.dataset": (aug("get_detection_dataset_dicts", names=train_names), names_source),
        "dataloader.train.mapper._target_": ("SemSegDatasetMapper", OURS + ": checks every label PNG"),
        "dataloader.train.mapper.is_train": (True, OURS),
        "dataloader.train.mapper.num_classes": (num_classes, classes_source),
        **{f"dataloader.{split}.mapper.{k}": v for split in ("train", "test") for k, v in SEM_SEG_MAPPER.items()},
        "dataloader.train.total_batch_size": batch,
        "dataloader.train.num_workers": workers,
        "dataloader.test._target_": ("build_detection_test_loader", names_source),
        "dataloader.test.dataset": (aug("get_detection_dataset_dicts", names=test_names, filter_empty=False),
                                    names_source + " (every image evaluated)"),
        "dataloader.test.mapper._target_": ("SemSegDatasetMapper", OURS),
        "dataloader.test.mapper.is_train": (False, OURS),
        "dataloader.test.mapper.num_classes": (num_classes, classes_source),
        "dataloader.test.num_workers": workers,
        "dataloader.evaluator": (aug("SemSegEvaluator", dataset_name="${..test.dataset.names}"),
                                 "mIoU over the test dataset (mmseg IoUMetric)"),
    }


def upernet_augs(crop, scale=(512, 2048), cat_max=0.75, source=MMSEG_ADE):
    return {
        "dataloader.train.mapper.augmentations": ([
            aug("ResizeLongShortScale", min_scale=0.5, max_scale=2.0, target_height=scale[0], target_width=scale[1]),
            aug("RandomCrop_CategoryAreaConstraint", crop_type="absolute", crop_size=[crop, crop],
                single_category_max_area=cat_max, ignored_category=255),
            aug("RandomFlip", horizontal=True), aug("PhotometricDistortion")],
            source + ": RandomResize (2048, 512) ratio 0.5-2.0, RandomCrop cat_max_ratio 0.75, RandomFlip, "
            "PhotoMetricDistortion"),
        "dataloader.test.mapper.augmentations": ([aug("ResizeLongShortScale", min_scale=1.0, max_scale=1.0,
                                                      target_height=scale[0], target_width=scale[1])],
                                                 source + ": Resize (2048, 512), keep ratio"),
    }


UPERNET_HEAD = dict(num_classes=150, channels=512, pool_scales=[1, 2, 3, 6], norm="SyncBN", dropout=0.1,
                    ignore_value=255, aux_in_feature="td2", aux_channels=256, aux_loss_weight=0.4)
LEVEL_SHAPES = aug("revcolv2_level_shapes", variant="${...backbone.variant}",
                   embed_dim="${oc.select:...backbone.embed_dim,null}",
                   num_heads="${oc.select:...backbone.num_heads,null}")
ADE_TRAIN = {
    "train.init_checkpoint": ("", RUN_TIME),
    "train.max_iter": (160000, PAPER_ADE + "; " + M2F_BASE + " MAX_ITER"),
    "train.amp.enabled": (True, M2F_BASE + " AMP.ENABLED; for UperNet ours"),
    "train.amp.precision": ("bf16", RUN_TIME),
    "train.ddp.fp16_compression": (True, OURS),
    "train.checkpointer.max_to_keep": (3, OURS),
    "train.log_period": (50, MMSEG_160K + " log interval 50"),
}


def upernet_rows(variant, size, crop, stride, source_l=None):
    rows = {
        **ade_loader_rows(), **upernet_augs(512), **ADE_TRAIN,
        "model._target_": ("RevColV2SemanticSegmentor", OURS),
        "model.backbone": (aug("RevColV2Backbone", variant=variant, window_size=0, drop_path_rate=0.1, reversible=True),
                           PAPER_ADE + " (drop path 0.1); ours (global attention, as BEiT; reversible)"),
        "model.sem_seg_head": ({**UPERNET_HEAD, "input_shape": LEVEL_SHAPES, "_target_": "UPerHead"},
                               MMSEG_UPERNET + ": UPerHead pool_scales (1, 2, 3, 6), channels 512, dropout 0.1, "
                               "SyncBN; FCNHead in_index 2 (stride 16), channels 256, loss_weight 0.4"),
        "model.pixel_mean": (IMAGENET_MEAN_255, MMSEG_ADE + " img_norm_cfg"),
        "model.pixel_std": (IMAGENET_STD_255, MMSEG_ADE + " img_norm_cfg"),
        "model.test_mode": ("slide", BEIT_B + " test_cfg mode"),
        "model.crop_size": ([crop, crop], source_l or BEIT_B),
        "model.stride": ([stride, stride], (source_l or BEIT_B) + " test_cfg stride"),
        "train.output_dir": (f"output/ade20k_upernet_revcolv2_{size}", OURS),
        "train.eval_period": (16000, MMSEG_160K + " evaluation interval"),
        "train.checkpointer.period": (16000, MMSEG_160K + " checkpoint interval"),
        "lr_multiplier": (aug("WarmupParamScheduler", scheduler=aug("PolynomialDecayParamScheduler", base_value=1.0,
                                                                    power=1.0),
                              warmup_length=1500 / 160000, warmup_factor=1e-6, rescale_interval=True),
                          BEIT_B + " lr_config: poly power 1.0 after 1500 linear warm-up iterations from 1e-6; "
                          "ours: the poly runs over the remaining iterations, as mmseg"),
        "optimizer._target_": ("AdamW", BEIT_B),
        "optimizer.lr": (4e-5, PAPER_ADE),
        "optimizer.betas": ([0.9, 0.999], BEIT_B),
        "optimizer.weight_decay": (0.05, BEIT_B),
        "optimizer.params": (aug("revcolv2_optimizer_params", base_lr="${..lr}", layer_decay=0.65,
                                 weight_decay_norm=0.0, overrides={"alphas": {"weight_decay": 0.0}}),
                             PAPER_ADE + ": layer decay 0.65; " + BEIT_B + ": no decay on norms; ours: alphas"),
    }
    if crop != 512:
        rows["dataloader.train.mapper.augmentations"][0][1]["crop_size"] = [crop, crop]
    return rows


M2F_HEAD = dict(num_classes=150, conv_dim=256, mask_dim=256, hidden_dim=256, num_queries=100, num_heads=8,
                encoder_layers=6, encoder_feedforward_dim=1024, decoder_layers=9, dim_feedforward=2048,
                pre_norm=False, dropout=0.0, enforce_input_projection=False, class_weight=2.0, mask_weight=5.0,
                dice_weight=5.0, no_object_weight=0.1, train_num_points=12544, oversample_ratio=3.0,
                importance_sample_ratio=0.75, deep_supervision=True)
M2F_OPTIMIZER = aug("FullModelGradClipAdamW", params=aug(
    "mask2former_optimizer_params", base_lr="${..lr}", weight_decay_norm=0.0, weight_decay_embed=0.0, layer_decay=0.9,
    overrides={"alphas": {"weight_decay": 0.0}}), lr=2e-5, betas=[0.9, 0.999], weight_decay=0.05, clip_norm=0.01,
    norm_type=2.0)


def m2f_augs(crop, max_size, source):
    return {
        "dataloader.train.mapper.augmentations": ([
            aug("ResizeShortestEdge", short_edge_length=short_edges(crop), max_size=max_size, sample_style="choice"),
            aug("RandomCrop_CategoryAreaConstraint", crop_type="absolute", crop_size=[crop, crop],
                single_category_max_area=1.0, ignored_category=255),
            aug("PhotometricDistortion"), aug("RandomFlip", horizontal=True)],
            source + ": MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, CROP (absolute, SINGLE_CATEGORY_MAX_AREA 1.0), COLOR_AUG_SSD"),
        "dataloader.test.mapper.augmentations": ([aug("ResizeShortestEdge", short_edge_length=crop, max_size=max_size)],
                                                 source + ": MIN_SIZE_TEST, MAX_SIZE_TEST"),
    }


def m2f_rows(variant, size, crop, max_size, source):
    return {
        **ade_loader_rows(workers=(4, M2F_BASE + " NUM_WORKERS")), **m2f_augs(crop, max_size, source), **ADE_TRAIN,
        "model._target_": ("RevColV2Mask2Former", OURS),
        "model.backbone": (aug("RevColV2Backbone", variant=variant, window_size=0, drop_path_rate=0.3, reversible=True),
                           PAPER_M2F + " (drop path 0.3); ours (global attention, reversible)"),
        "model.sem_seg_head": ({**M2F_HEAD, "input_shape": LEVEL_SHAPES, "_target_": "Mask2FormerHead"},
                               M2F_R50 + " (DEC_LAYERS 10 = 9 layers + the query loss); " + M2F_CODE
                               + " (encoder feed-forward 1024)"),
        "model.pixel_mean": (IMAGENET_MEAN_255, M2F_BASE + " PIXEL_MEAN"),
        "model.pixel_std": (IMAGENET_STD_255, M2F_BASE + " PIXEL_STD"),
        "model.ignore_value": (255, M2F_R50 + " IGNORE_VALUE"),
        "model.size_divisibility": (32, M2F_R50 + " MASK_FORMER.SIZE_DIVISIBILITY"),
        "train.output_dir": (f"output/ade20k_mask2former_revcolv2_{size}", OURS),
        "train.eval_period": (5000, M2F_BASE + " TEST.EVAL_PERIOD"),
        "train.checkpointer.period": (5000, D2_DEFAULTS + " SOLVER.CHECKPOINT_PERIOD"),
        "lr_multiplier": (aug("PolynomialDecayParamScheduler", base_value=1.0, power=0.9),
                          M2F_BASE + " WarmupPolyLR, WARMUP_ITERS 0; " + D2_DEFAULTS + " POLY_LR_POWER 0.9"),
        "optimizer": (M2F_OPTIMIZER, PAPER_M2F + " (lr 2e-5, layer decay 0.9); " + M2F_BASE
                      + " (ADAMW, WEIGHT_DECAY 0.05, CLIP_GRADIENTS full_model 0.01 L2); " + M2F_CODE
                      + " (WEIGHT_DECAY_NORM / _EMBED 0.0); ours (alphas)"),
    }


SHAPES_DEMO = {
    "dataloader.train._target_": ("build_train_loader", TRAIN_LOADER),
    "dataloader.train.dataset.names": ("synthetic_shapes_train", DEMO),
    "dataloader.test.dataset.names": ("synthetic_shapes_val", DEMO),
    "dataloader.train.mapper._target_": ("CheckedDatasetMapper", OURS),
    "dataloader.train.mapper.augmentations": ([
        aug("RandomFlip", horizontal=True),
        aug("ResizeScale", min_scale=0.5, max_scale=1.5, target_height=256, target_width=256),
        aug("FixedSizeCrop", crop_size=[256, 256], pad=False)], DEMO + ": LSJ at 256"),
    "dataloader.train.mapper.image_format": ("RGB", VITDET_LSJ),
    "dataloader.train.mapper.recompute_boxes": (True, VITDET_LSJ),
    "dataloader.train.mapper.instance_mask_format": ("bitmask", DEMO + ": ring masks are RLE"),
    "dataloader.train.total_batch_size": (4, DEMO),
    "dataloader.train.num_workers": (1, DEMO),
    "dataloader.test.mapper._target_": ("CheckedDatasetMapper", OURS),
    "dataloader.test.mapper.augmentations": ([aug("ResizeShortestEdge", short_edge_length=256, max_size=256)], DEMO),
    "dataloader.test.num_workers": (1, DEMO),
    "model.backbone._target_": ("FPN", OURS),
    "model.backbone.bottom_up": (aug("RevColV2Backbone", variant="revcolv2_tiny", window_size=0,
                                     global_attn_indexes=[], drop_path_rate=0.0, reversible=True, square_pad=256),
                                 DEMO),
    "model.backbone.in_features": (["td0", "td1", "td2", "td3"], OURS),
    "model.backbone.out_channels": (64, DEMO),
    "model.backbone.norm": ("LN", D2_VITDET_MODEL),
    "model.backbone.top_block": (aug("LastLevelMaxPool"), D2_VITDET_MODEL),
    "model.backbone.square_pad": (256, DEMO),
    "model.proposal_generator.head.in_channels": (64, DEMO),
    "model.proposal_generator.head.conv_dims": ([-1], DEMO + ": one conv (ViTDet two)"),
    "model.proposal_generator.anchor_generator.sizes": ([[16], [32], [64], [128], [256]], DEMO),
    "model.proposal_generator.batch_size_per_image": (128, DEMO),
    "model.proposal_generator.pre_nms_topk": ([1000, 500], DEMO),
    "model.proposal_generator.post_nms_topk": ([250, 100], DEMO),
    "model.roi_heads.num_classes": (4, DEMO + ": the four shapes"),
    "model.roi_heads.batch_size_per_image": (64, DEMO),
    "model.roi_heads.box_head.input_shape": (dict(channels=64, height=7, width=7, stride=None), DEMO),
    "model.roi_heads.box_head.conv_dims": ([], DEMO + ": 2fc box head"),
    "model.roi_heads.box_head.fc_dims": ([256, 256], DEMO),
    "model.roi_heads.box_predictor.input_shape": (dict(channels=256, height=None, width=None, stride=None), DEMO),
    "model.roi_heads.mask_head.input_shape": (dict(channels=64, height=14, width=14, stride=None), DEMO),
    "model.roi_heads.mask_head.conv_dims": ([64, 64], DEMO),
    "train.device": ("cpu", DEMO),
    "train.seed": (0, DEMO),
    "train.output_dir": ("output/demo/train", DEMO),
    "train.max_iter": (600, DEMO),
    "train.checkpointer.period": (600, DEMO),
    "train.checkpointer.max_to_keep": (3, OURS),
    "train.eval_period": (600, DEMO),
    "train.log_period": (20, DEMO),
    "lr_multiplier": (aug("WarmupParamScheduler", scheduler=aug(
        "MultiStepParamScheduler", values=[1.0, 0.1, 0.01], milestones=[533, 578], num_updates=600),
        warmup_length=60 / 600, warmup_factor=0.001), DEMO + ": ViTDet's steps at 8/9 and 26/27 of 600"),
    "optimizer._target_": ("AdamW", D2_OPTIM),
    "optimizer.lr": (4e-4, DEMO),
    "optimizer.weight_decay": (0.05, DEMO),
    "optimizer.params.overrides": ({"alphas": {"weight_decay": 0.0}}, OURS),
}

_SYNTH = dict(num_classes=6, classes_source=DEMO + ": the synthetic scenes' 6 classes",
              train_names="synthetic_ade_train", test_names="synthetic_ade_val", names_source=DEMO,
              workers=(1, DEMO))
_SYNTH_TRAIN = {**ADE_TRAIN, "train.amp.enabled": (False, DEMO + ": CPU"), "train.device": ("cpu", DEMO),
                "train.log_period": (20, DEMO)}
UPERNET_DEMO = {
    **upernet_rows("revcolv2_tiny", "tiny", 128, 85), **ade_loader_rows(batch=(8, DEMO), **_SYNTH),
    **upernet_augs(128, scale=(128, 256), source=DEMO + " (the UperNet recipe at the synthetic scenes' size)"),
    **_SYNTH_TRAIN,
    "model.backbone": (aug("RevColV2Backbone", variant="revcolv2_tiny", window_size=0, drop_path_rate=0.0,
                           reversible=True), DEMO),
    "model.sem_seg_head": ({**UPERNET_HEAD, "num_classes": 6, "channels": 64, "aux_channels": 32, "norm": "BN",
                            "input_shape": LEVEL_SHAPES, "_target_": "UPerHead"}, DEMO + " (one process: BN)"),
    "model.crop_size": ([128, 128], DEMO),
    "model.stride": ([85, 85], DEMO),
    "train.output_dir": ("output/demo_upernet_synthetic", DEMO),
    "train.max_iter": (200, DEMO),
    "train.eval_period": (200, DEMO),
    "train.checkpointer.period": (200, DEMO),
    "optimizer.lr": (2e-3, DEMO),
    "optimizer.params": (aug("revcolv2_optimizer_params", base_lr="${..lr}", layer_decay=1.0, weight_decay_norm=0.0,
                             overrides={"alphas": {"weight_decay": 0.0}}), DEMO + ": no layer decay from scratch"),
    "lr_multiplier": (aug("WarmupParamScheduler", scheduler=aug("PolynomialDecayParamScheduler", base_value=1.0,
                                                                power=1.0),
                          warmup_length=20 / 200, warmup_factor=1e-6, rescale_interval=True), DEMO),
}
M2F_DEMO = {
    **m2f_rows("revcolv2_tiny", "tiny", 96, 384, DEMO), **ade_loader_rows(batch=(4, DEMO), **_SYNTH), **_SYNTH_TRAIN,
    "dataloader.test.mapper.augmentations": ([aug("ResizeShortestEdge", short_edge_length=128, max_size=512)], DEMO),
    "model.backbone": (aug("RevColV2Backbone", variant="revcolv2_tiny", window_size=0, drop_path_rate=0.0,
                           reversible=False), DEMO),
    "model.sem_seg_head": ({**M2F_HEAD, "num_classes": 6, "conv_dim": 64, "mask_dim": 64, "hidden_dim": 64,
                            "num_heads": 4, "num_queries": 16, "encoder_layers": 2, "encoder_feedforward_dim": 128,
                            "decoder_layers": 3, "dim_feedforward": 256, "train_num_points": 576,
                            "input_shape": LEVEL_SHAPES, "_target_": "Mask2FormerHead"}, DEMO),
    "train.output_dir": ("output/demo_mask2former_synthetic", DEMO),
    "train.max_iter": (400, DEMO),
    "train.eval_period": (400, DEMO),
    "train.checkpointer.period": (400, DEMO),
    "optimizer": ({**M2F_OPTIMIZER, "lr": 1e-3, "params": {**M2F_OPTIMIZER["params"], "layer_decay": 1.0}},
                  DEMO + ": from scratch, no layer decay"),
    "lr_multiplier": (aug("WarmupParamScheduler", scheduler=aug("PolynomialDecayParamScheduler", base_value=1.0,
                                                                power=0.9),
                          warmup_length=20 / 400, warmup_factor=0.01), DEMO),
}

LAZY_TABLES = {
    "COCO/mask_rcnn_revcolv2_b_50ep.py": coco_rows(50, 32, B, 0.2, [2, 5, 8, 11], cascade=False),
    "COCO/mask_rcnn_revcolv2_l_50ep.py": coco_rows(50, 32, L, 0.3, [5, 11, 17, 23], cascade=False),
    "COCO/cascade_mask_rcnn_revcolv2_b_100ep.py": coco_rows(100, 64, B, 0.2, [2, 5, 8, 11], cascade=True),
    "COCO/cascade_mask_rcnn_revcolv2_l_100ep.py": coco_rows(100, 64, L, 0.3, [5, 11, 17, 23], cascade=True),
    "ADE20K/upernet_revcolv2_b_160k.py": upernet_rows(B, "b", 512, 341),
    "ADE20K/upernet_revcolv2_l_160k.py": upernet_rows(L, "l", 640, 426, source_l=BEIT_L),
    "ADE20K/mask2former_revcolv2_b_160k.py": m2f_rows(B, "b", 512, 2048, M2F_BASE),
    "ADE20K/mask2former_revcolv2_l_160k.py": m2f_rows(L, "l", 640, 2560, M2F_640),
    "demo/mask_rcnn_revcolv2_tiny_shapes.py": SHAPES_DEMO,
    "demo/upernet_revcolv2_tiny_synthetic.py": UPERNET_DEMO,
    "demo/mask2former_revcolv2_tiny_synthetic.py": M2F_DEMO,
}

# your own data (configs/custom/): the paper's B recipes with the paths left to the command
# line, the class count read from the data and the schedule following train.max_iter
_CUSTOM_OURS = OURS + ": your own data (docs/DETECTION.md, docs/SEGMENTATION.md)"
_CUSTOM_NAMES = {"dataloader.train.dataset.names": ("${dataset.name}_train", _CUSTOM_OURS),
                 "dataloader.test.dataset.names": ("${dataset.name}_val", _CUSTOM_OURS)}
LAZY_TABLES["custom/mask_rcnn_revcolv2_b_coco_format.py"] = {
    **{k: v for k, v in LAZY_TABLES["COCO/mask_rcnn_revcolv2_b_50ep.py"].items()
       if k not in ("lr_multiplier", "train.max_iter", "train.eval_period", "train.checkpointer.period",
                    "model.roi_heads.num_classes", "train.output_dir")
       and not k.startswith(("dataloader.train.dataset.names", "dataloader.test.dataset.names"))},
    **_CUSTOM_NAMES,
    "dataset": (aug("register_coco_format", name="custom", train_json="", train_images="", val_json="",
                    val_images=""), _CUSTOM_OURS + ": paths from the command line"),
    "model.roi_heads.num_classes": (aug("coco_num_classes", train_json="${dataset.train_json}",
                                        val_json="${dataset.val_json}"), _CUSTOM_OURS + ": the files' categories"),
    "train.output_dir": ("output/custom_mask_rcnn_revcolv2_b", _CUSTOM_OURS),
    "train.max_iter": (20000, _CUSTOM_OURS + ": set it for the data"),
    "train.eval_period": ("${train.max_iter}", _CUSTOM_OURS + ": evaluate at the end"),
    "train.checkpointer.period": (5000, _CUSTOM_OURS),
    "lr_multiplier": (aug("vitdet_multistep", max_iter="${train.max_iter}", warmup_iters=250),
                      VITDET_B + ": warm-up 250, x0.1 at 8/9 and x0.01 at 26/27 of max_iter"),
}
def _replaced(table, **rows):
    """``table`` with ``rows`` ({"section__key": (value, source)}) in place: a row of the table
    that holds one of them as a part (a whole head, a list of augmentations) keeps its own
    source, with the replaced part and its source named after it."""
    out = copy.deepcopy(table)
    for key, (value, source) in ((k.replace("__", "."), v) for k, v in rows.items()):
        outer = next((k for k in out if key.startswith(k + ".")), None)
        if outer is None:
            out[key] = (value, source)
            continue
        expected, outer_source = out[outer]
        *path, last = key[len(outer) + 1:].split(".")
        node = expected
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value
        out[outer] = (expected, f"{outer_source}; {key[len(outer) + 1:]}: {source}")
    return out


LAZY_TABLES["custom/upernet_revcolv2_b_sem_seg_folders.py"] = _replaced(
    {k: v for k, v in LAZY_TABLES["ADE20K/upernet_revcolv2_b_160k.py"].items() if k != "lr_multiplier"},
    dataloader__train__dataset__names=("${dataset.name}_train", _CUSTOM_OURS),
    dataloader__test__dataset__names=("${dataset.name}_val", _CUSTOM_OURS),
    dataset=(aug("register_sem_seg_folders", name="custom", train_images="", train_labels="", val_images="",
                 val_labels="", classes="", ignore_label=255, image_ext=".jpg", label_ext=".png"),
             _CUSTOM_OURS + ": paths and class list from the command line; 255 ignored as in ADE20K"),
    model__sem_seg_head__num_classes=(aug("sem_seg_num_classes", classes="${dataset.classes}"),
                                      _CUSTOM_OURS + ": the class list's length"),
    model__sem_seg_head__ignore_value=("${dataset.ignore_label}", _CUSTOM_OURS),
    dataloader__train__mapper__num_classes=("${model.sem_seg_head.num_classes}", _CUSTOM_OURS),
    dataloader__test__mapper__num_classes=("${model.sem_seg_head.num_classes}", _CUSTOM_OURS),
    dataloader__train__mapper__ignore_label=("${dataset.ignore_label}", _CUSTOM_OURS),
    dataloader__test__mapper__ignore_label=("${dataset.ignore_label}", _CUSTOM_OURS),
    dataloader__train__mapper__augmentations__1__ignored_category=("${dataset.ignore_label}", _CUSTOM_OURS),
    train__output_dir=("output/custom_upernet_revcolv2_b", _CUSTOM_OURS),
    train__max_iter=(40000, _CUSTOM_OURS + ": set it for the data"),
    train__eval_period=("${train.max_iter}", _CUSTOM_OURS + ": evaluate at the end"),
    train__checkpointer__period=(8000, _CUSTOM_OURS),
    lr_multiplier=(aug("warmup_poly", max_iter="${train.max_iter}", warmup_iters=1500),
                   PAPER_ADE + ": 1500 warm-up iterations, then poly, over max_iter"),
)
for _table in LAZY_TABLES.values():  # every config leaves torch.compile off (tools/lazyconfig_train_net.py)
    _table.setdefault("train.compile", (False, RUN_TIME + ": train.compile=True compiles the backbone"))
# test-time augmentation (revcolv2_d2.tta): off in every config, `test.aug.enabled=True` turns it on
_TTA_COCO = ([0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5],
             "detectron2's TEST.AUG.MIN_SIZES (400, 500, ..., 1200) over its test size 800")
_TTA_ADE = ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], MMSEG_ADE + " img_ratios (BEiT, MAE, ConvNeXt: multi-scale + flip)")
for _rel, _table in LAZY_TABLES.items():
    _scales = _TTA_COCO if "mask_rcnn" in _rel else _TTA_ADE
    _table.setdefault("test.aug.enabled", (False, RUN_TIME + ": test.aug.enabled=True evaluates with TTA"))
    _table.setdefault("test.aug.scales", _scales)
    _table.setdefault("test.aug.flip", (True, _scales[1].split(" (")[0] + ": each scale also flipped"))
# names a config file exports beside the config sections (detectron2 saves every
# DictConfig a .py config leaves at module level): the same objects under another name
ALIASES = {"demo/mask_rcnn_revcolv2_tiny_shapes.py": {"bb": "model.backbone.bottom_up", "roi": "model.roi_heads"}}


def _d2_bases(rel):
    """The detectron2 model-zoo configs a LazyConfig starts from: values it leaves as they are."""
    from detectron2 import model_zoo

    bases = {"train": model_zoo.get_config("common/train.py").train}
    if "mask2former" not in rel:
        bases["optimizer"] = model_zoo.get_config("common/optim.py").AdamW
    if "mask_rcnn" in rel:
        bases["model"] = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model
        bases["dataloader"] = model_zoo.get_config("common/data/coco.py").dataloader
    return OmegaConf.create(bases, flags={"allow_objects": True})


def _plain(node):
    """A config as plain data: interpolations unresolved, tuples as lists, and what a
    ``_target_`` (or any value) calls by its name."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    if callable(node) and hasattr(node, "__qualname__"):
        return node.__qualname__
    return node


def _at(tree, key):
    for part in key.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


def _leaves(tree, prefix=""):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@functools.lru_cache(maxsize=None)
def _load(rel):
    """The config as plain data (callers copy before changing it)."""
    from detectron2.config import LazyConfig

    return _plain(LazyConfig.load(os.path.join(D2_DIR, rel)))


def test_every_lazy_config_has_a_table():
    files = sorted(os.path.relpath(os.path.join(d, n), D2_DIR) for d, _, names in os.walk(D2_DIR)
                   for n in names if n.endswith(".py") and os.path.basename(d) != "common")
    assert files == sorted(LAZY_TABLES)


@pytest.mark.parametrize("rel", sorted(LAZY_TABLES))
def test_lazy_config_values_equal_their_sources(rel):
    cfg = _load(rel)
    wrong = []
    for key, (expected, source) in LAZY_TABLES[rel].items():
        try:
            actual = _at(cfg, key)
        except (KeyError, IndexError):
            wrong.append(f"{key}: missing, its source ({source}) says {expected!r}")
            continue
        if _plain(expected) != actual:
            wrong.append(f"{key}: {actual!r}, its source ({source}) says {expected!r}")
    assert not wrong, f"{rel}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("rel", sorted(LAZY_TABLES))
def test_every_lazy_config_value_is_pinned_or_detectron2s(rel):
    """A value without a row must be the one detectron2's model-zoo config it starts from holds."""
    cfg, table, aliases = copy.deepcopy(_load(rel)), LAZY_TABLES[rel], ALIASES.get(rel, {})
    base = _leaves(_plain(_d2_bases(rel)))
    for name, key in aliases.items():
        assert cfg.pop(name) == _at(cfg, key), f"{rel}: {name} is not {key}"
    unpinned = [f"{k} = {v!r}" + (f" (detectron2's: {base[k]!r})" if k in base else "")
                for k, v in _leaves(cfg).items()
                if not any(k == row or k.startswith(row + ".") for row in table) and base.get(k, object()) != v]
    assert not unpinned, f"{rel}: values no row pins and detectron2's config does not hold:\n" + "\n".join(unpinned)


# values of the shared files in configs/common that every config using them sets again (so
# no loaded config above shows them): pinned in the shared file itself
COMMON_TABLES = {
    "common/coco_loader_lsj.py": {"dataloader.train.total_batch_size": (64, VITDET_LSJ)},
    "common/ade20k_loader.py": {"dataloader.train.total_batch_size": (16, PAPER_ADE)},
    "common/mask_rcnn_revcolv2.py": {"model.backbone.bottom_up.drop_path_rate": (0.2, PAPER_COCO + " (B)")},
}


@pytest.mark.parametrize("rel", sorted(COMMON_TABLES))
def test_shared_config_values_that_every_user_overrides(rel):
    cfg = _load(rel)
    for key, (expected, source) in COMMON_TABLES[rel].items():
        assert _at(cfg, key) == expected, f"{rel}: {key} is {_at(cfg, key)!r}, its source ({source}) says {expected!r}"
