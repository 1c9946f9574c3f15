"""Oracle for ADE20K semantic segmentation through the UperNet config's real evaluation path.

A tiny ``ADEChallengeData2016`` (``images/validation/*.jpg``,
``annotations_detectron2/validation/*.png``, odd image sizes) is registered under the
built-in name ``ade20k_sem_seg_val`` exactly as detectron2 registers it. Each image paints
every class in its own flat colour, so an oracle network can read the ground truth back
from the pixels it is given. Everything else is the config's: the test mapper (resize into
2048x512), ``RevColV2SemanticSegmentor`` (normalisation, padding, sliding-window or
whole-image inference, averaging of overlapping windows, resize back to the original size)
and ``SemSegEvaluator`` on the 150 ADE20K classes. The oracle network replaces only the
backbone + head and returns one-hot logits at its input resolution, as the UperNet head does.

A perfect oracle scores mIoU 100; the same oracle shifted by one class, or drawing the
map at half scale, scores far lower.
"""
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data.datasets.builtin import register_all_ade20k
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import Backbone
from eval_oracle_helpers import builtin_names_on, config_loader_and_evaluator, load_config
from PIL import Image
from torch import nn

CONFIG = "ADE20K/upernet_revcolv2_b_160k.py"
TINY = ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
        "model.sem_seg_head.aux_channels=8"]
NUM_CLASSES = 150
# classes used by the tiny dataset (0-based ADE20K indices, first and last included) and
# their colours: corners of the RGB cube, so that any blend of two lies nearest to one of them
CLASS_COLOURS = {0: (255, 0, 0), 4: (0, 255, 0), 37: (0, 0, 255), 76: (255, 255, 0), 149: (0, 255, 255)}
IGNORE_COLOUR = (0, 0, 0)
IMAGE_SIZES = [(157, 203), (211, 149), (101, 187)]  # (h, w), odd on purpose


def make_ade20k(root: str) -> None:
    """Three validation images in ADEChallengeData2016's layout, labels in detectron2's
    0-based ``annotations_detectron2`` form (255 = ignore)."""
    image_dir = os.path.join(root, "ADEChallengeData2016", "images", "validation")
    label_dir = os.path.join(root, "ADEChallengeData2016", "annotations_detectron2", "validation")
    os.makedirs(image_dir)
    os.makedirs(label_dir)
    rng = np.random.default_rng(0)
    classes = list(CLASS_COLOURS)
    for i, (h, w) in enumerate(IMAGE_SIZES):
        order = rng.permutation(classes)
        label = np.full((h, w), order[0], np.uint8)
        # well-separated shapes on the background: an ellipse, a rectangle, an ignored band
        cv2.ellipse(label, (w // 4, h // 3), (w // 7, h // 6), 20, 0, 360, int(order[1]), -1)
        cv2.rectangle(label, (w // 2, h // 2), (w - w // 8, h - h // 8), int(order[2]), -1)
        cv2.rectangle(label, (w // 10, h - h // 5), (w // 3, h - h // 10), 255, -1)
        image = np.zeros((h, w, 3), np.uint8)
        for c, colour in CLASS_COLOURS.items():
            image[label == c] = colour
        image[label == 255] = IGNORE_COLOUR
        name = f"ADE_val_{i + 1:08d}"
        Image.fromarray(image).save(os.path.join(image_dir, name + ".jpg"), quality=100, subsampling=0)
        Image.fromarray(label, mode="L").save(os.path.join(label_dir, name + ".png"))


class PixelsBackbone(Backbone):
    """Hands the (normalised, padded) input on; keeps the real backbone's padding rules."""

    def __init__(self, real: Backbone):
        super().__init__()
        self._size_divisibility = real.size_divisibility
        self._padding_constraints = real.padding_constraints

    @property
    def size_divisibility(self):
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return self._padding_constraints

    def forward(self, x):
        return {"pixels": x}


class ColourOracleHead(nn.Module):
    """Reads the class of every pixel from its colour: one-hot (B, K, H, W) logits at the
    padded input resolution, the sem-seg head contract of ``UPerHead``.

    ``class_shift`` and ``half_scale`` make deliberately wrong oracles.
    """

    def __init__(self, pixel_mean, pixel_std, class_shift=0, half_scale=False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pixel_std).view(1, 3, 1, 1))
        self.ignore_value = 255
        self.class_shift, self.half_scale = class_shift, half_scale
        colours = list(CLASS_COLOURS.values()) + [IGNORE_COLOUR]
        self.register_buffer("palette", torch.tensor(colours, dtype=torch.float32))  # (C, 3)
        self.classes = list(CLASS_COLOURS) + [0]  # the ignored colour: any class will do

    def forward(self, features, targets=None):
        rgb = features["pixels"] * self.std + self.mean  # (B, 3, H, W), 0-255
        dist = ((rgb[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)  # (B, C, H, W)
        cls = torch.tensor(self.classes)[dist.argmin(1)]  # (B, H, W)
        cls = (cls + self.class_shift) % NUM_CLASSES
        logits = F.one_hot(cls, NUM_CLASSES).permute(0, 3, 1, 2).float()
        if self.half_scale:  # the right map, drawn at half size in the top-left corner
            small = F.interpolate(logits, scale_factor=0.5, mode="nearest")
            logits = torch.zeros_like(logits)
            logits[:, 0] = 1.0
            logits[:, :, : small.shape[2], : small.shape[3]] = small
        return logits, {}


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_ade20k(root)
    with builtin_names_on(["ade20k_sem_seg_train", "ade20k_sem_seg_val"], lambda: register_all_ade20k(root)):
        yield root


def evaluate(tmp_path, test_mode="slide", **oracle):
    cfg = load_config(CONFIG, TINY + [f"model.test_mode={test_mode}"])
    model = instantiate_model(cfg)
    model.backbone = PixelsBackbone(model.backbone)
    model.sem_seg_head = ColourOracleHead(cfg.model.pixel_mean, cfg.model.pixel_std, **oracle)
    loader, evaluator = config_loader_and_evaluator(cfg, str(tmp_path))
    return inference_on_dataset(model.eval(), loader, evaluator)["sem_seg"]


def instantiate_model(cfg):
    from detectron2.config import instantiate

    return instantiate(cfg.model)


@pytest.mark.slow
@pytest.mark.parametrize("test_mode", ["slide", "whole"])
def test_ground_truth_scores_miou_100(ade_root, tmp_path, test_mode):
    res = evaluate(tmp_path, test_mode)
    assert res["mIoU"] == pytest.approx(100.0, abs=1e-9)
    assert res["pACC"] == pytest.approx(100.0, abs=1e-9)
    # the five classes in use, nothing else scored
    scored = [k for k, v in res.items() if k.startswith("IoU-") and not np.isnan(v)]
    assert len(scored) == len(CLASS_COLOURS)


@pytest.mark.slow
def test_class_shifted_by_one_scores_far_lower(ade_root, tmp_path):
    assert evaluate(tmp_path, "whole", class_shift=1)["mIoU"] < 5.0


@pytest.mark.slow
def test_map_at_half_scale_scores_far_lower(ade_root, tmp_path):
    assert evaluate(tmp_path, "whole", half_scale=True)["mIoU"] < 60.0


def test_the_config_slides_windows_over_the_resized_images(ade_root):
    """The oracle runs the path it claims to: the mapper's resize into 2048x512 and more than
    one 512x512 window per image (the sliding-window averaging is exercised)."""
    from detectron2.config import instantiate

    from revcolv2_d2.upernet import RevColV2SemanticSegmentor

    cfg = load_config(CONFIG, TINY)
    cfg.dataloader.test.num_workers = 0
    loader = instantiate(cfg.dataloader.test)
    seen = []
    for (item,) in loader:
        h, w = item["image"].shape[1:]
        assert min(h, w) == 512 and (item["height"], item["width"]) in IMAGE_SIZES
        seen.append(len(RevColV2SemanticSegmentor.window_boxes(h, w, (512, 512), (341, 341))))
    assert len(seen) == len(IMAGE_SIZES) and all(n >= 2 for n in seen)


@pytest.mark.parametrize("target_class", [0, 1, NUM_CLASSES - 1])
def test_head_inference_logits_keep_the_class_order_at_input_resolution(target_class):
    """The part of the path the oracle replaces: UPerHead's inference output. A classifier
    whose only non-zero bias is class c predicts c everywhere, at the padded input size."""
    from detectron2.config import instantiate

    cfg = load_config(CONFIG, TINY)
    model = instantiate(cfg.model).eval()
    head = model.sem_seg_head
    with torch.no_grad():
        head.predictor.weight.zero_()
        head.predictor.bias.zero_()
        head.predictor.bias[target_class] = 1.0
        logits, _ = head(model.backbone(torch.randn(1, 3, 64, 96)))
    assert logits.shape == (1, NUM_CLASSES, 64, 96)
    assert torch.all(logits.argmax(1) == target_class)
