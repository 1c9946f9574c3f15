"""The ADE20K UperNet configs: recipe values, build with a tiny backbone, layer-decay groups
(the same layer ids as the COCO configs), and the training mapper on real-format data."""
import math
import os

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T

from revcolv2.layer_decay import layer_id, lr_factor_func
from revcolv2.model import MODEL_CFGS
from revcolv2_d2.data.ade20k import PhotometricDistortion, ResizeLongShortScale, SemSegDatasetMapper
from revcolv2_d2.upernet import RevColV2SemanticSegmentor, UPerHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")
ADE = {"b": ("ADE20K/upernet_revcolv2_b_160k.py", "revcolv2_base", 512),
       "l": ("ADE20K/upernet_revcolv2_l_160k.py", "revcolv2_large", 640)}
COCO = {"b": "COCO/mask_rcnn_revcolv2_b_50ep.py", "l": "COCO/mask_rcnn_revcolv2_l_50ep.py"}


def load(rel):
    return LazyConfig.load(os.path.join(CONFIGS, rel))


def tiny(cfg, dim=32):
    """Shrink the width only: the column layout (and so the layer ids) stays the config's."""
    cfg.model.backbone.embed_dim = dim
    cfg.model.backbone.num_heads = 2
    cfg.model.sem_seg_head.channels = 16
    cfg.model.sem_seg_head.aux_channels = 8
    return cfg


@pytest.mark.parametrize("size", ["b", "l"])
def test_recipe_values(size):
    rel, variant, crop = ADE[size]
    cfg = load(rel)
    assert cfg.model.backbone.variant == variant
    assert cfg.model.backbone.drop_path_rate == 0.1
    assert instantiate(cfg.model.sem_seg_head.input_shape)["td3"].channels == MODEL_CFGS[variant]["embed_dim"]
    head = cfg.model.sem_seg_head
    assert (head.channels, tuple(head.pool_scales), head.num_classes) == (512, (1, 2, 3, 6), 150)
    assert (head.aux_in_feature, head.aux_loss_weight, head.ignore_value) == ("td2", 0.4, 255)
    assert cfg.optimizer.lr == 4e-5 and cfg.optimizer.params.layer_decay == 0.65
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert cfg.dataloader.train.total_batch_size == 16
    assert cfg.train.max_iter == 160000
    assert round(cfg.lr_multiplier.warmup_length * cfg.train.max_iter) == 1500
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) < 1e-5 and sched(1500 / 160000) == pytest.approx(1.0)
    assert sched(0.5) == pytest.approx(1 - (80000 - 1500) / (160000 - 1500), abs=1e-6)  # poly, power 1
    # training augmentation: resize 0.5-2.0 of 2048x512, crop with a 0.75 class cap, flip, photometric
    resize, crop_aug, flip, photo = cfg.dataloader.train.mapper.augmentations
    assert resize._target_ is ResizeLongShortScale
    assert (resize.min_scale, resize.max_scale) == (0.5, 2.0)
    assert sorted((resize.target_height, resize.target_width)) == [512, 2048]
    assert crop_aug._target_ is T.RandomCrop_CategoryAreaConstraint
    assert tuple(crop_aug.crop_size) == (crop, crop) and crop_aug.single_category_max_area == 0.75
    assert flip._target_ is T.RandomFlip and photo._target_ is PhotometricDistortion
    # evaluation: sliding window at the crop size, SemSegEvaluator on ADE20K val
    assert cfg.model.test_mode == "slide" and tuple(cfg.model.crop_size) == (crop, crop)
    assert cfg.dataloader.test.dataset.names == "ade20k_sem_seg_val"
    assert cfg.dataloader.evaluator._target_.__name__ == "SemSegEvaluator"
    assert cfg.dataloader.train.mapper.num_classes == 150


@pytest.mark.parametrize("size", ["b", "l"])
@pytest.mark.slow
def test_builds_with_a_tiny_backbone_and_layer_decay_groups(size):
    cfg = tiny(load(ADE[size][0]))
    model = instantiate(cfg.model)
    assert isinstance(model, RevColV2SemanticSegmentor) and isinstance(model.sem_seg_head, UPerHead)
    net = model.backbone.net
    assert (net.num_bu_columns, net.num_td_columns) == (
        MODEL_CFGS[ADE[size][1]]["num_bu_columns"], MODEL_CFGS[ADE[size][1]]["num_td_columns"])

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    ids = {}
    for name, p in model.named_parameters():
        lid = layer_id(name, net.num_levels, net.blocks_per_level, net.num_bu_columns, net.num_td_columns)
        top = net.num_layers() - 1
        lr, wd = lr_of[id(p)]
        assert lr == pytest.approx(4e-5 * 0.65 ** (top - lid)), name
        if name.endswith("alphas") or ".norm" in name:  # reversible scales, norm layers
            assert wd == 0.0, name
        elif name.endswith("qkv.weight"):
            assert wd == 0.05, name
        ids[name] = lid
    # the layer ids (hence the groups) are the COCO configs' for the same backbone names
    coco = load(COCO[size])
    coco_decay = coco.optimizer.params.layer_decay
    coco_factor = lr_factor_func(coco_decay, model)  # same RevColV2 layout as the COCO preset
    for name, lid in ids.items():
        if name.startswith("backbone.net."):
            coco_name = name.replace("backbone.net.", "backbone.bottom_up.net.")
            exponent = math.log(coco_factor(coco_name)) / math.log(coco_decay)
            assert round(exponent) == net.num_layers() - 1 - lid, name
    assert {round(e) for e in ids.values()} == set(range(net.num_layers()))

    # one training step and one sliding-window prediction run on the built model
    model.train()
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), generator=g).float(),
               "sem_seg": torch.randint(0, 150, (64, 64), generator=g)} for _ in range(2)]
    losses = model(inputs)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_aux"}
    model.eval()
    with torch.no_grad():
        out = model([{"image": inputs[0]["image"], "height": 32, "width": 48}])
    assert out[0]["sem_seg"].shape == (150, 32, 48)


def test_whole_image_inference_is_an_option():
    cfg = tiny(load(ADE["b"][0]))
    cfg.model.test_mode = "whole"
    assert instantiate(cfg.model).test_mode == "whole"


def test_training_mapper_of_the_config_on_ade20k_format_files(tmp_path):
    """The B config's train mapper on one image/label pair in ADE20K's layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    label = rng.integers(0, 150, (96, 128)).astype(np.uint8)
    label[:10] = 255
    Image.fromarray(label, mode="L").save(tmp_path / "a.png")
    cfg = load(ADE["b"][0])
    mapper = instantiate(cfg.dataloader.train.mapper)
    assert isinstance(mapper, SemSegDatasetMapper)
    np.random.seed(0)
    for _ in range(3):
        out = mapper({"file_name": str(tmp_path / "a.jpg"), "sem_seg_file_name": str(tmp_path / "a.png")})
        h, w = out["sem_seg"].shape
        assert out["image"].shape == (3, h, w) and h <= 512 and w <= 512
        assert out["image"].dtype == torch.uint8
        assert set(out["sem_seg"].unique().tolist()) <= set(range(150)) | {255}
    test_out = instantiate(cfg.dataloader.test.mapper)({"file_name": str(tmp_path / "a.jpg"),
                                                        "sem_seg_file_name": str(tmp_path / "a.png")})
    # fit into 2048x512 (long x short): 96x128 -> 512x683
    assert tuple(test_out["image"].shape[1:]) == (512, 683)
    assert (test_out["height"], test_out["width"]) == (96, 128)


def test_resize_treats_portrait_and_landscape_alike():
    aug = ResizeLongShortScale(min_scale=1.0, max_scale=1.0, target_height=512, target_width=2048)
    land = aug.get_transform(np.zeros((300, 400, 3), np.uint8))
    port = aug.get_transform(np.zeros((400, 300, 3), np.uint8))
    assert (land.new_h, land.new_w) == (512, 683) and (port.new_h, port.new_w) == (683, 512)


def test_photometric_distortion_keeps_shape_and_dtype():
    np.random.seed(0)
    img = np.random.randint(0, 256, (20, 30, 3), dtype=np.uint8)
    outs = [PhotometricDistortion().get_transform(img).apply_image(img) for _ in range(8)]
    assert all(o.shape == img.shape and o.dtype == np.uint8 for o in outs)
    assert any(not np.array_equal(o, img) for o in outs)
