"""The ADE20K Mask2Former configs: recipe values (paper + Mask2Former's ADE20K semantic
configs), build with a tiny backbone, layer-decay / weight-decay groups, clipping, the
shared checking mapper, and RevColV2 checkpoints through train.init_checkpoint."""
import logging
import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import transforms as T

from revcolv2.layer_decay import layer_id
from revcolv2.mim import RevColV2MIM
from revcolv2.model import MODEL_CFGS
from revcolv2_d2.checkpoint import RevColV2Checkpointer
from revcolv2_d2.data.ade20k import PhotometricDistortion, SemSegDatasetMapper
from revcolv2_d2.mask2former import FullModelGradClipAdamW, Mask2FormerHead, RevColV2Mask2Former

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")
ADE = {"b": ("ADE20K/mask2former_revcolv2_b_160k.py", "revcolv2_base", 512, 2048),
       "l": ("ADE20K/mask2former_revcolv2_l_160k.py", "revcolv2_large", 640, 2560)}


def load(rel):
    return LazyConfig.load(os.path.join(CONFIGS, rel))


def tiny(cfg, dim=32):
    """Shrink the widths only: the column layout (and so the layer ids) stays the config's."""
    cfg.model.backbone.embed_dim = dim
    cfg.model.backbone.num_heads = 2
    head = cfg.model.sem_seg_head
    head.conv_dim = head.mask_dim = head.hidden_dim = 32
    head.num_heads = 2
    head.num_queries = 8
    head.encoder_layers = 1
    head.encoder_feedforward_dim = 32
    head.decoder_layers = 2
    head.dim_feedforward = 32
    head.train_num_points = 128
    return cfg


@pytest.mark.parametrize("size", ["b", "l"])
def test_recipe_values(size):
    rel, variant, crop, max_size = ADE[size]
    cfg = load(rel)
    # [paper] RevColV2 supplementary 1.4
    assert cfg.model.backbone.variant == variant and cfg.model.backbone.drop_path_rate == 0.3
    assert cfg.optimizer.lr == 2e-5 and cfg.optimizer.params.layer_decay == 0.9
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.train.max_iter == 160000
    # Mask2Former's ADE20K semantic recipe
    head = cfg.model.sem_seg_head
    assert (head.num_classes, head.num_queries, head.decoder_layers, head.encoder_layers) == (150, 100, 9, 6)
    assert (head.conv_dim, head.mask_dim, head.hidden_dim, head.num_heads) == (256, 256, 256, 8)
    assert (head.class_weight, head.mask_weight, head.dice_weight, head.no_object_weight) == (2.0, 5.0, 5.0, 0.1)
    assert (head.train_num_points, head.oversample_ratio, head.importance_sample_ratio) == (12544, 3.0, 0.75)
    assert head.deep_supervision and cfg.model.ignore_value == 255
    assert instantiate(head.input_shape)["td3"].channels == MODEL_CFGS[variant]["embed_dim"]
    assert cfg.optimizer._target_ is FullModelGradClipAdamW
    assert (cfg.optimizer.weight_decay, cfg.optimizer.clip_norm, cfg.optimizer.norm_type) == (0.05, 0.01, 2.0)
    assert cfg.optimizer.params.weight_decay_norm == 0.0 and cfg.optimizer.params.weight_decay_embed == 0.0
    sched = instantiate(cfg.lr_multiplier)  # poly 0.9, no warm-up
    assert sched(0.0) == 1.0 and sched(0.5) == pytest.approx(0.5 ** 0.9)
    # training: short side from 0.5x..2.0x of the crop in 0.1x steps, crop without class cap,
    # SSD colour augmentation, flip
    resize, crop_aug, photo, flip = cfg.dataloader.train.mapper.augmentations
    assert resize._target_ is T.ResizeShortestEdge and resize.sample_style == "choice"
    assert list(resize.short_edge_length) == [int(x * 0.1 * crop) for x in range(5, 21)]
    assert resize.short_edge_length[0] == crop // 2 and resize.short_edge_length[-1] == 2 * crop
    assert resize.max_size == max_size
    assert crop_aug._target_ is T.RandomCrop_CategoryAreaConstraint
    assert tuple(crop_aug.crop_size) == (crop, crop) and crop_aug.single_category_max_area == 1.0
    assert photo._target_ is PhotometricDistortion and flip._target_ is T.RandomFlip
    # test: short side = crop, whole image, SemSegEvaluator on ADE20K val
    [test_resize] = cfg.dataloader.test.mapper.augmentations
    assert (test_resize.short_edge_length, test_resize.max_size) == (crop, max_size)
    assert cfg.dataloader.test.dataset.names == "ade20k_sem_seg_val"
    assert cfg.dataloader.evaluator._target_.__name__ == "SemSegEvaluator"
    # the shared checking mapper: labels above 150, colour PNGs and size mismatches are errors
    for split in ("train", "test"):
        assert cfg.dataloader[split].mapper._target_ is SemSegDatasetMapper
        assert cfg.dataloader[split].mapper.num_classes == 150


@pytest.mark.parametrize("size", ["b", "l"])
@pytest.mark.slow
def test_builds_with_a_tiny_backbone_and_optimizer_groups(size):
    cfg = tiny(load(ADE[size][0]))
    model = instantiate(cfg.model)
    assert isinstance(model, RevColV2Mask2Former) and isinstance(model.sem_seg_head, Mask2FormerHead)
    net = model.backbone.net
    variant = ADE[size][1]
    assert (net.num_bu_columns, net.num_td_columns) == (
        MODEL_CFGS[variant]["num_bu_columns"], MODEL_CFGS[variant]["num_td_columns"])

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, FullModelGradClipAdamW) and optimizer.clip_norm == 0.01
    hyper = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert len(hyper) == sum(1 for p in model.parameters() if p.requires_grad)
    top = net.num_layers() - 1
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert len(embeddings) == 3  # query features, query positions, level embeddings
    for name, p in model.named_parameters():
        lr, wd = hyper[id(p)]
        if name.startswith("backbone.net."):
            lid = layer_id(name[len("backbone."):], net.num_levels, net.blocks_per_level, net.num_bu_columns,
                           net.num_td_columns)
            assert lr == pytest.approx(2e-5 * 0.9 ** (top - lid)), name
        else:
            assert lr == pytest.approx(2e-5), name  # pyramid adapters and the head
        if id(p) in embeddings or name.endswith("alphas") or ".norm" in name:
            assert wd == 0.0, name
        elif name.endswith("qkv.weight") or name.endswith("class_predictor.weight"):
            assert wd == 0.05, name

    # one training step and one prediction on the built model
    model.train()
    g = torch.Generator().manual_seed(0)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), generator=g).float(),
               "sem_seg": torch.randint(0, 150, (64, 64), generator=g)} for _ in range(2)]
    losses = model(inputs)
    assert {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_dice_0"} <= set(losses)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model([{"image": inputs[0]["image"], "height": 33, "width": 47}])
    assert out[0]["sem_seg"].shape == (150, 33, 47)


def test_revcolv2_checkpoint_loads_into_the_backbone_and_is_reported(tmp_path, caplog):
    """train.init_checkpoint with a RevColV2 MIM checkpoint: backbone tensors loaded, the
    head reported missing and pre-training-only tensors unused, each by name."""
    cfg = tiny(load(ADE["b"][0]))
    cfg.model.backbone.variant = "revcolv2_tiny"
    model = instantiate(cfg.model)
    torch.manual_seed(1)
    mim = RevColV2MIM(embed_dim=32, num_heads=2)
    path = str(tmp_path / "mim.pth")
    torch.save(mim.state_dict(), path)
    with caplog.at_level(logging.INFO):
        RevColV2Checkpointer(model).load(path)
    loaded = model.backbone.net.state_dict()
    for name, value in mim.state_dict().items():
        if name.startswith(("mask_token", "decoder_", "fc_norm", "head")):
            continue
        torch.testing.assert_close(loaded[name], value, msg=name)
    log = caplog.text
    assert "backbone.net.columns.0.levels.0.blocks.0" in log
    assert "not used by the dense model" in log and "mask_token" in log
    assert "sem_seg_head.transformer" in log  # missing in the checkpoint, by name
