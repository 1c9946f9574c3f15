"""Every COCO config loads, holds the paper's recipe, builds (tiny backbone), and its
optimizer follows the shared layer-decay rule."""
import os

import numpy as np
import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TRAIN_NET, run_tool
from detectron2.config import LazyConfig, instantiate
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling.roi_heads import CascadeROIHeads, StandardROIHeads

from revcolv2.layer_decay import layer_id, max_layer_id
from revcolv2.model import MODEL_CFGS

COCO_DIR = os.path.join(ROOT, "projects", "RevColV2", "configs", "COCO")
COCO_TRAIN_IMAGES = 118287
# name -> (epochs, batch, drop path, roi heads, preset)
RECIPES = {
    "mask_rcnn_revcolv2_b_50ep.py": (50, 32, 0.2, StandardROIHeads, "revcolv2_base"),
    "mask_rcnn_revcolv2_l_50ep.py": (50, 32, 0.3, StandardROIHeads, "revcolv2_large"),
    "cascade_mask_rcnn_revcolv2_b_100ep.py": (100, 64, 0.2, CascadeROIHeads, "revcolv2_base"),
    "cascade_mask_rcnn_revcolv2_l_100ep.py": (100, 64, 0.3, CascadeROIHeads, "revcolv2_large"),
}
TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"]


def test_every_coco_config_is_covered():
    assert set(n for n in os.listdir(COCO_DIR) if n.endswith(".py")) == set(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values(name):
    epochs, batch, drop_path, _, preset = RECIPES[name]
    cfg = LazyConfig.load(os.path.join(COCO_DIR, name))
    bb = cfg.model.backbone.bottom_up
    assert bb.variant == preset and bb.drop_path_rate == drop_path and bb.window_size == 14
    assert 0 < len(bb.global_attn_indexes) <= 4  # a few global blocks
    assert cfg.model.backbone.square_pad == 1024 and cfg.model.backbone.norm == "LN"
    assert cfg.dataloader.train.total_batch_size == batch
    assert cfg.train.max_iter == round(epochs * COCO_TRAIN_IMAGES / batch)
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer._target_ is torch.optim.AdamW
    assert cfg.optimizer.params.layer_decay == 0.9
    lsj = [a for a in cfg.dataloader.train.mapper.augmentations if "min_scale" in a][0]
    assert (lsj.min_scale, lsj.max_scale, lsj.target_height, lsj.target_width) == (0.1, 2.0, 1024, 1024)
    assert cfg.dataloader.train.dataset.names == "coco_2017_train"
    assert cfg.dataloader.test.dataset.names == "coco_2017_val"
    assert cfg.dataloader.evaluator._target_ is COCOEvaluator
    sched = cfg.lr_multiplier
    assert sched.scheduler.num_updates == cfg.train.max_iter
    assert sched.scheduler.milestones == [round(cfg.train.max_iter * 8 / 9), round(cfg.train.max_iter * 26 / 27)]
    assert sched.warmup_length * cfg.train.max_iter == pytest.approx(250)
    assert cfg.train.amp.precision in ("bf16", "fp16")


def _lr_scales(cfg):
    """Build model + optimizer; return {parameter name: (lr / base lr, weight decay)}."""
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    opt = instantiate(cfg.optimizer)
    by_id = {id(p): (g["lr"] / cfg.optimizer.lr, g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    return model, {n: by_id[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_builds_with_tiny_backbone_and_follows_layer_decay(name):
    _, _, _, heads, preset = RECIPES[name]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(COCO_DIR, name)), TINY)
    model, scales = _lr_scales(cfg)
    assert isinstance(model.roi_heads, heads)
    assert model.backbone.bottom_up.net.embed_dim == 32
    preset_cfg = MODEL_CFGS[preset]
    _assert_layer_decay(scales, (4, 1, preset_cfg["num_bu_columns"], preset_cfg["num_td_columns"]))


def test_layer_ids_follow_a_column_count_override():
    """The layer-decay ids come from the built model, not from the preset name."""
    overrides = TINY + ["model.backbone.bottom_up.num_bu_columns=3", "model.backbone.bottom_up.num_td_columns=2",
                        "model.backbone.bottom_up.blocks_per_level=2",
                        "model.backbone.bottom_up.global_attn_indexes=[]"]
    cfg = LazyConfig.apply_overrides(LazyConfig.load(os.path.join(COCO_DIR, "mask_rcnn_revcolv2_b_50ep.py")), overrides)
    model, scales = _lr_scales(cfg)
    net = model.backbone.bottom_up.net
    assert (net.num_bu_columns, net.num_td_columns, net.blocks_per_level) == (3, 2, 2)
    layout = (4, 2, 3, 2)
    assert max_layer_id(*layout) != max_layer_id(4, 1, 2, 1)  # the preset's ids would be wrong
    _assert_layer_decay(scales, layout)


def _assert_layer_decay(scales, layout):
    top = max_layer_id(*layout) + 1
    decay = 0.9
    net_prefix = "backbone.bottom_up.net."
    by_id = {}
    for n, (scale, wd) in scales.items():
        if not n.startswith(net_prefix):
            assert scale == pytest.approx(1.0), n  # FPN, pyramid adapters and heads: full lr
            continue
        lid = layer_id(n[len(net_prefix):], *layout)
        assert scale == pytest.approx(decay ** (top - lid)), n
        by_id.setdefault(lid, set()).add(round(scale, 12))
        if n.endswith("alphas"):
            assert wd == 0.0
    # lr scale: one value per layer id, strictly increasing with depth, below the heads' 1
    ids = sorted(by_id)
    assert ids == list(range(top))  # stem 0 .. deepest block
    assert all(len(by_id[i]) == 1 for i in ids)
    lrs = [by_id[i].pop() for i in ids]
    assert all(a < b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 1.0
    assert scales[net_prefix + "patch_embed.proj.weight"][0] == pytest.approx(decay ** top)


@pytest.mark.slow
def test_demo_config_builds_and_trains_on_the_built_in_data(tmp_path):
    """The demo config (width shrunk, 128 px): its train mapper on the built-in data, one
    optimizer step, and every loss term and the backbone, FPN and heads all move."""
    from d2_helpers import TINY_OVERRIDES, make_mini_shapes
    from detectron2.data.datasets import load_coco_json
    from detectron2.utils.events import EventStorage

    from revcolv2_d2.data.synthetic_shapes import synthetic_shapes_paths

    cfg = LazyConfig.load(DEMO_CONFIG)
    assert cfg.dataloader.train.dataset.names == "synthetic_shapes_train"
    assert cfg.dataloader.test.dataset.names == "synthetic_shapes_val"
    assert cfg.model.roi_heads.num_classes == 4
    assert instantiate(cfg.model).backbone.padding_constraints == {"square_size": 256}

    cfg = LazyConfig.apply_overrides(cfg, TINY_OVERRIDES)
    make_mini_shapes(str(tmp_path))
    image_dir, json_file = synthetic_shapes_paths(str(tmp_path), "train")
    dicts = load_coco_json(json_file, image_dir, f"demo_trains_{tmp_path.name}")
    torch.manual_seed(0)
    np.random.seed(0)  # the mapper's augmentations
    mapper = instantiate(cfg.dataloader.train.mapper)
    batch = [mapper(d) for d in dicts[:2]]
    assert all(len(b["instances"]) > 0 for b in batch)
    model = instantiate(cfg.model).train()
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with EventStorage():  # detectron2's training-time logging
        losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    sum(losses.values()).backward()
    optimizer.step()
    for prefix in ("backbone.bottom_up.net.patch_embed", "backbone.bottom_up.net.columns.2", "backbone.fpn_output2",
                   "proposal_generator", "roi_heads.box_predictor", "roi_heads.mask_head"):
        moved = [n for n, p in model.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])]
        assert moved, f"one optimizer step changed nothing under {prefix}"


def _fake_coco(root: str) -> None:
    """A few synthetic images in COCO 2017's layout and category ids (4 of the 80 used)."""
    import json

    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from revcolv2_d2.data.synthetic_shapes import generate_split

    coco = os.path.join(root, "coco")
    for split, n, seed in (("train2017", 6, 0), ("val2017", 3, 1)):
        json_file = os.path.join(coco, "annotations", f"instances_{split}.json")
        generate_split(os.path.join(coco, split), json_file, n, seed)
        with open(json_file) as f:
            content = json.load(f)
        content["categories"] = [{"id": c["id"], "name": c["name"], "supercategory": "coco"}
                                 for c in COCO_CATEGORIES if c["isthing"]]
        for ann in content["annotations"]:  # COCO keeps RLE for crowd regions only
            if isinstance(ann["segmentation"], dict):
                ann["iscrowd"] = 1
        with open(json_file, "w") as f:
            json.dump(content, f)


@pytest.mark.slow
def test_coco_config_trains_and_evaluates_on_a_coco_layout(tmp_path):
    """DETECTRON2_DATASETS pointing at a COCO 2017 layout is all the B config needs."""
    _fake_coco(str(tmp_path / "datasets"))
    size = 128  # CPU-sized: LSJ target, test resize and square padding at 128 instead of 1024
    out = tmp_path / "out"
    overrides = TINY + [
        f"model.backbone.square_pad={size}", f"model.backbone.bottom_up.square_pad={size}",
        f"dataloader.train.mapper.augmentations.1.target_height={size}",
        f"dataloader.train.mapper.augmentations.1.target_width={size}",
        f"dataloader.train.mapper.augmentations.2.crop_size=[{size},{size}]",
        f"dataloader.test.mapper.augmentations.0.short_edge_length={size}",
        f"dataloader.test.mapper.augmentations.0.max_size={size}",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "train.max_iter=2", f"train.output_dir={out}",
        # two iterations do not lift any score over 0.05: keep 5 detections so COCO eval has some
        "model.roi_heads.box_predictor.test_score_thresh=0.0", "model.roi_heads.box_predictor.test_topk_per_image=5",
    ]
    proc = run_tool([TRAIN_NET, "--config-file", os.path.join(COCO_DIR, "mask_rcnn_revcolv2_b_50ep.py"),
                     *overrides], str(tmp_path / "datasets"))
    log = proc.stdout + proc.stderr
    assert "Loaded 6 images in COCO format" in log and "Loaded 3 images in COCO format" in log
    assert "Mixed precision switched off" in log  # the config asks for bf16; this is a CPU
    assert "Evaluation results for segm" in log
    # two optimizer steps moved the zero-initialised classifier bias
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert final["roi_heads.box_predictor.cls_score.bias"].abs().max() > 0
