"""Test-time augmentation (``revcolv2_d2.tta``) held to oracles.

Semantic segmentation: a stub segmentor with known per-scale outputs, evaluated by
detectron2's ``SemSegEvaluator`` through the TTA wrapper, gives exactly the mIoU computed
here by hand from the averaged probabilities; flips are undone (a per-pixel colour oracle on
an asymmetric image scores 100 with flips, far less when the flip is not undone); UperNet's
own sliding-window inference runs within every scale.

COCO: detectron2's ``GeneralizedRCNNWithTTA`` with our mapper, on an oracle R-CNN that reads
boxes and masks off the (rescaled, flipped) image it is given, scores box AP50 100 through
``COCOEvaluator``: every augmentation's boxes are mapped back to the original image.
"""
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, SemSegEvaluator, inference_on_dataset
from detectron2.structures import Boxes, Instances
from PIL import Image
from torch import nn

from revcolv2_d2 import tta
from revcolv2_d2.data.ade20k import SemSegDatasetMapper
from revcolv2_d2.data.coco_checks import CheckedDatasetMapper
from revcolv2_d2.data.custom import register_coco_format, register_sem_seg_folders
from revcolv2_d2.tta import (
    RCNNWithTTA,
    ScaleFlipTTAMapper,
    SemanticSegmentorWithTTA,
    build_tta_model,
    enabled_test_aug,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")
K = 3
H0, W0 = 8, 12  # the images' size; the test mapper keeps it
SCALES = (0.5, 1.0, 2.0)


# ------------------------------------------------------------------------- the mapper
def test_mapper_scales_the_test_size_and_flips():
    image = torch.arange(2 * 20 * 30, dtype=torch.uint8).reshape(2, 20, 30)[:1].expand(3, 20, 30).contiguous()
    # the test mapper resized a 40x60 original to 20x30
    out = ScaleFlipTTAMapper([0.5, 1.25], flip=True)({"image": image, "height": 40, "width": 60})
    assert [tuple(d["image"].shape[1:]) for d in out] == [(10, 15), (10, 15), (25, 38), (25, 38)]
    assert [tta._flipped(d["transforms"]) for d in out] == [False, True, False, True]
    # transforms map original coordinates to the augmented image: the right edge x=60 of the
    # original is x=30 of the test image, x=38 at scale 1.25, and x=0 once flipped
    xy = np.array([[60.0, 0.0]])
    assert out[2]["transforms"].apply_coords(xy.copy())[0, 0] == pytest.approx(38.0)
    assert out[3]["transforms"].apply_coords(xy.copy())[0, 0] == pytest.approx(0.0)
    assert out[0]["height"] == 40  # the original size stays: outputs come back at it
    with pytest.raises(ValueError, match="positive factors"):
        ScaleFlipTTAMapper([0.0])


# ------------------------------------------------------------------------- semantic segmentation
def _write_sem_split(root: Path, labels, images=None):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i, label in enumerate(labels):
        image = images[i] if images is not None else np.full((H0, W0, 3), 100, np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        Image.fromarray(label.astype(np.uint8), mode="L").save(root / "labels" / f"{i}.png")


def _evaluate(model, name, tmp_path):
    loader = build_detection_test_loader(
        DatasetCatalog.get(name), mapper=SemSegDatasetMapper(False, augmentations=[], num_classes=K), num_workers=0)
    return inference_on_dataset(model, loader, SemSegEvaluator(name, output_dir=str(tmp_path / "eval")))["sem_seg"]


def miou(pred: np.ndarray, gt: np.ndarray, ignore: int = 255) -> float:
    """Mean over the classes present in the ground truth of TP / (TP + FP + FN), ignored
    pixels left out; in percent."""
    keep = gt != ignore
    p, g = pred[keep], gt[keep]
    ious = []
    for c in range(K):
        if (g == c).any():
            tp = np.sum((p == c) & (g == c))
            ious.append(tp / (np.sum(p == c) + np.sum(g == c) - tp))
    return 100.0 * float(np.mean(ious))


class KnownScaleOutputs(nn.Module):
    """Returns, for an input of scale s (its width / W0), the known logits ``fields[s]`` of
    the image (by its index) at the original size, whatever the pixels."""

    sem_seg_output = "logits"

    def __init__(self, fields):
        super().__init__()
        self.fields = fields
        self.seen = []

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            s = x["image"].shape[-1] / W0
            self.seen.append((s, tuple(x["image"].shape[-2:])))
            index = int(os.path.splitext(os.path.basename(x["file_name"]))[0])
            out.append({"sem_seg": torch.from_numpy(self.fields[s][index]).float()})
        return out


def test_averaged_probabilities_give_exactly_the_expected_miou(tmp_path):
    rng = np.random.default_rng(3)
    gts = [rng.integers(0, K, (H0, W0)) for _ in range(2)]
    gts[0][2, :4] = 255
    _write_sem_split(tmp_path / "data", gts)
    register_sem_seg_folders("tta_known", val_images=str(tmp_path / "data" / "images"),
                             val_labels=str(tmp_path / "data" / "labels"), classes=["a", "b", "c"],
                             image_ext=".png")
    # noise, plus one left-right asymmetric preference per scale (flips matter)
    fields = {s: [rng.normal(0, 1.0, (K, H0, W0)).astype(np.float32) for _ in gts] for s in SCALES}
    for s, c, cols in ((0.5, 1, slice(0, 3)), (1.0, 2, slice(0, 5)), (2.0, 0, slice(8, 12))):
        for f in fields[s]:
            f[c, :, cols] += 2.5

    def softmax(z):
        e = np.exp(z - z.max(0))
        return e / e.sum(0)

    # by hand: each scale's probabilities, and those of its flipped input flipped back
    # (the stub's output ignores the pixels, so flipping it back mirrors the field)
    expected = []
    for i in range(len(gts)):
        probs = [softmax(fields[s][i].astype(np.float64)) for s in SCALES]
        mean = np.mean([p for p in probs] + [p[:, :, ::-1] for p in probs], axis=0)
        top2 = np.sort(mean, axis=0)[-2:]
        assert (top2[1] - top2[0]).min() > 1e-4  # no near tie: the argmax is well defined
        expected.append(mean.argmax(0))
    want = miou(np.stack(expected), np.stack(gts))

    stub = KnownScaleOutputs(fields)
    model = SemanticSegmentorWithTTA(stub, ScaleFlipTTAMapper(SCALES, flip=True))
    res = _evaluate(model, "tta_known_val", tmp_path)
    assert res["mIoU"] == pytest.approx(want, abs=1e-9)
    # each image at every scale, each twice (plain and flipped), at that scale's size
    assert sorted(stub.seen)[:4] == [(0.5, (4, 6))] * 4 and len(stub.seen) == 2 * len(SCALES) * 2
    # the test tells the ways apart: one scale alone, or no flips, gives other numbers
    single = _evaluate(KnownScaleOutputs({1.0: fields[1.0]}), "tta_known_val", tmp_path)["mIoU"]
    no_flip = _evaluate(SemanticSegmentorWithTTA(KnownScaleOutputs(fields), ScaleFlipTTAMapper(SCALES, flip=False)),
                        "tta_known_val", tmp_path)["mIoU"]
    assert abs(single - want) > 1.0 and abs(no_flip - want) > 1.0


class ColourOracle(nn.Module):
    """Per-pixel class from the pixel's colour (one-hot logits x 5), resized bilinearly to
    the original size: flip-equivariant, so undone flips change nothing."""

    sem_seg_output = "logits"
    PALETTE = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.float32)

    def forward(self, batched_inputs):
        out = []
        for x in batched_inputs:
            rgb = x["image"].float()  # (3, h, w)
            dist = ((rgb[None] - self.PALETTE[:, :, None, None]) ** 2).sum(1)  # (K, h, w)
            logits = 5.0 * F.one_hot(dist.argmin(0), K).permute(2, 0, 1).float()
            out.append({"sem_seg": F.interpolate(logits[None], size=(x["height"], x["width"]), mode="bilinear",
                                                 align_corners=False)[0]})
        return out


def test_flips_are_undone_on_an_asymmetric_image(tmp_path, monkeypatch):
    label = np.zeros((H0, W0), np.uint8)
    label[:, 7:] = 1  # asymmetric: class 1 on the right third
    label[1:4, 1:3] = 2  # a class-2 block top left
    image = np.zeros((H0, W0, 3), np.uint8)
    for c, colour in enumerate(ColourOracle.PALETTE.numpy().astype(np.uint8)):
        image[label == c] = colour
    _write_sem_split(tmp_path / "flip", [label], [image])
    register_sem_seg_folders("tta_flip", val_images=str(tmp_path / "flip" / "images"),
                             val_labels=str(tmp_path / "flip" / "labels"), classes=["r", "g", "b"], image_ext=".png")
    flip_only = SemanticSegmentorWithTTA(ColourOracle(), ScaleFlipTTAMapper([1.0], flip=True))
    item = {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(), "height": H0, "width": W0}
    plain = ColourOracle()([item])[0]["sem_seg"].softmax(0)
    assert torch.equal(flip_only([item])[0]["sem_seg"], plain)  # the flipped pass, flipped back, agrees exactly
    assert _evaluate(flip_only, "tta_flip_val", tmp_path)["mIoU"] == pytest.approx(100.0)
    monkeypatch.setattr(tta, "_flipped", lambda transforms: False)  # a wrapper that forgets to flip back
    assert _evaluate(flip_only, "tta_flip_val", tmp_path)["mIoU"] < 70.0


def test_probability_outputs_are_averaged_as_they_are():
    """Mask2Former returns class x mask probabilities: no softmax on top."""
    class Probabilities(nn.Module):
        sem_seg_output = "probabilities"

        def forward(self, batched_inputs):
            return [{"sem_seg": torch.full((K, x["height"], x["width"]), float(x["image"].shape[-1]))}
                    for x in batched_inputs]

    model = SemanticSegmentorWithTTA(Probabilities(), ScaleFlipTTAMapper([0.5, 1.0], flip=False))
    out = model([{"image": torch.zeros(3, 8, 12, dtype=torch.uint8), "height": 8, "width": 12}])[0]["sem_seg"]
    assert torch.allclose(out, torch.full((K, 8, 12), (6.0 + 12.0) / 2))


def _tiny_upernet():
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(os.path.join(CONFIGS, "ADE20K", "upernet_revcolv2_b_160k.py")),
        ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
         "model.sem_seg_head.aux_channels=8", "model.crop_size=[64,64]", "model.stride=[43,43]",
         "model.sem_seg_head.norm=BN"])
    torch.manual_seed(0)
    return cfg, instantiate(cfg.model).eval()


def test_upernet_slides_its_windows_within_every_scale(monkeypatch):
    cfg, model = _tiny_upernet()
    assert enabled_test_aug(cfg) is None  # single-scale unless asked
    cfg.test.aug.enabled = True
    assert enabled_test_aug(cfg) == {"scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75], "flip": True}
    cfg.test.aug.flip = False
    assert enabled_test_aug(cfg)["flip"] is False
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    item = {"image": image, "height": 96, "width": 128}
    with torch.no_grad():
        single = model([dict(item)])[0]["sem_seg"]
        one_scale = SemanticSegmentorWithTTA(model, ScaleFlipTTAMapper([1.0], flip=False))([dict(item)])[0]
    assert torch.allclose(one_scale["sem_seg"], single.softmax(0), atol=1e-6)  # the model's own inference
    windows = []
    real = model.window_boxes
    monkeypatch.setattr(model, "window_boxes", lambda h, w, c, s: windows.append((h, w)) or real(h, w, c, s))
    with torch.no_grad():
        out = build_tta_model(model, [0.5, 1.0, 1.5], flip=True)([dict(item)])[0]["sem_seg"]
    assert windows == [(48, 64), (48, 64), (96, 128), (96, 128), (144, 192), (144, 192)]
    assert len(real(144, 192, (64, 64), (43, 43))) > 1  # several windows at the large scale
    assert out.shape == (150, 96, 128) and torch.allclose(out.sum(0), torch.ones(96, 128))


# ------------------------------------------------------------------------- COCO
class PixelsBackbone(nn.Module):
    """Hands the normalised, padded images on as the only feature; keeps the FPN's padding."""

    def __init__(self, real):
        super().__init__()
        self.real = real

    @property
    def size_divisibility(self):
        return self.real.size_divisibility

    @property
    def padding_constraints(self):
        return self.real.padding_constraints

    @property
    def _square_pad(self):
        return self.real._square_pad

    @_square_pad.setter
    def _square_pad(self, value):
        self.real._square_pad = value

    def forward(self, x):
        return {"pixels": x}


class NoProposals(nn.Module):
    def forward(self, images, features, gt_instances=None):
        return [None] * len(images), {}


class ReadOffROIHeads(nn.Module):
    """Boxes and masks read off the image it is given: each class colour's pixels form one
    box per connected region; masks are those pixels inside a given box (28 x 28 grid)."""

    def __init__(self, pixel_mean, pixel_std, colours):
        super().__init__()
        self.mean = torch.tensor(pixel_mean).view(3, 1, 1)
        self.std = torch.tensor(pixel_std).view(3, 1, 1)
        self.colours = colours  # contiguous class -> RGB
        self.mask_on, self.num_classes = True, len(colours)
        self.box_predictor = SimpleNamespace(test_nms_thresh=0.5, test_topk_per_image=100)  # what TTA reads
        self.sizes = []

    def _class_maps(self, pixels):
        rgb = pixels * self.std + self.mean
        return [((rgb - torch.tensor(c, dtype=torch.float32).view(3, 1, 1)).abs().amax(0) < 60) for c in self.colours]

    def forward(self, images, features, proposals, targets=None):
        import cv2

        results = []
        for i, (h, w) in enumerate(images.image_sizes):
            self.sizes.append((h, w))
            pixels = features["pixels"][i, :, :h, :w]
            boxes, classes = [], []
            for c, mask in enumerate(self._class_maps(pixels)):
                n, lab = cv2.connectedComponents(mask.numpy().astype(np.uint8))
                for k in range(1, n):
                    ys, xs = np.nonzero(lab == k)
                    if len(xs) > 4:
                        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                        classes.append(c)
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(len(boxes))
            inst.pred_classes = torch.tensor(classes, dtype=torch.long)
            if self.mask_on:
                inst.pred_masks = self._masks(pixels, inst.pred_boxes.tensor, inst.pred_classes)
            results.append(inst)
        return results, {}

    def _masks(self, pixels, boxes, classes):
        from torchvision.ops import roi_align

        maps = torch.stack(self._class_maps(pixels)).float()  # (K, h, w)
        if not len(boxes):
            return torch.zeros(0, 1, 28, 28)
        grids = roi_align(maps[None], [boxes], output_size=28, aligned=True)  # (N, K, 28, 28)
        return grids[torch.arange(len(boxes)), classes][:, None]

    def forward_with_given_boxes(self, features, instances):
        for i, inst in enumerate(instances):
            h, w = inst.image_size
            inst.pred_masks = self._masks(features["pixels"][i, :, :h, :w], inst.pred_boxes.tensor, inst.pred_classes)
        return instances


def _left_boxes_coco(root: Path) -> dict:
    """Three val images, each with one box in its left third: a flipped prediction that is
    not flipped back lands where no object is."""
    import json

    from custom_data_helpers import CATEGORIES, COLOURS

    (root / "val").mkdir(parents=True)
    images, annotations = [], []
    for i, cat in enumerate(c["id"] for c in CATEGORIES):
        image = np.full((96, 128, 3), 128, np.uint8)
        x0, y0, x1, y1 = 8 + 4 * i, 20 + 6 * i, 40, 70
        image[y0:y1, x0:x1] = COLOURS[cat]
        Image.fromarray(image).save(root / "val" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 128})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": cat, "iscrowd": 0,
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                            "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": CATEGORIES}))
    return {"val_json": str(root / "val.json"), "val_images": str(root / "val")}


@pytest.mark.slow  # builds a Mask R-CNN, evaluates 3 images x 6 augmentations
def test_rcnn_tta_maps_every_augmentation_back_to_the_original(tmp_path, monkeypatch):
    from custom_data_helpers import CATEGORIES, COLOURS

    data = _left_boxes_coco(tmp_path / "coco")
    register_coco_format("tta_coco", **data)
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(os.path.join(CONFIGS, "custom", "mask_rcnn_revcolv2_b_coco_format.py")),
        ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2",
         "model.backbone.square_pad=128", "model.backbone.bottom_up.square_pad=128"]
        + [f"dataset.{k}={v}" for k, v in data.items()])
    model = instantiate(cfg.model).eval()
    model.backbone = PixelsBackbone(model.backbone)
    model.proposal_generator = NoProposals()
    model.roi_heads = ReadOffROIHeads(cfg.model.pixel_mean, cfg.model.pixel_std, [COLOURS[c["id"]] for c in CATEGORIES])
    loader = build_detection_test_loader(
        DatasetCatalog.get("tta_coco_val"), num_workers=0,
        mapper=CheckedDatasetMapper(False, augmentations=[T.ResizeShortestEdge(96, 128)], image_format="RGB"))

    def ap(m):
        return inference_on_dataset(m, loader, COCOEvaluator("tta_coco_val", output_dir=str(tmp_path / "e")))

    assert ap(model)["bbox"]["AP50"] == pytest.approx(100.0)
    tta_model = build_tta_model(model, [0.5, 1.0, 1.5], flip=True)
    assert isinstance(tta_model, RCNNWithTTA)
    res = ap(tta_model)
    assert res["bbox"]["AP50"] == pytest.approx(100.0) and res["segm"]["AP50"] == pytest.approx(100.0)
    # the 1.5 scale (144 x 192) fit the square padding, raised from 128 for it
    assert (144, 192) in model.roi_heads.sizes and model.backbone._square_pad == 128
    assert _stray_boxes(tta_model, loader) == 0  # every merged box lies on an object of its class
    monkeypatch.setattr(tta.ScaleFlipTTAMapper, "__call__", _forget_flip(tta.ScaleFlipTTAMapper.__call__))
    assert _stray_boxes(build_tta_model(model, [1.0], flip=True), loader) == 3  # the mirrored ones
    # (AP cannot show it: every box scores 1, and the stray ones come after the right ones)


def _stray_boxes(model, loader) -> int:
    """Detections whose box overlaps no ground-truth box of their class (IoU < 0.5)."""
    from detectron2.structures import BoxMode, pairwise_iou

    stray = 0
    with torch.no_grad():
        for (item,) in loader:
            inst = model([item])[0]["instances"]
            gt = DatasetCatalog.get("tta_coco_val")[item["image_id"] - 1]["annotations"]
            gt_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in gt],
                                          dtype=torch.float32))
            gt_classes = torch.tensor([a["category_id"] for a in gt])
            iou = pairwise_iou(inst.pred_boxes, gt_boxes)  # (detections, objects)
            same = inst.pred_classes[:, None] == gt_classes[None]
            stray += int(((iou >= 0.5) & same).sum(1).eq(0).sum())
    return stray


def _forget_flip(call):
    """A broken mapper: flips the image but records no flip in its transforms."""
    def broken(self, d):
        out = call(self, d)
        for a in out:
            a["transforms"] = T.TransformList([t for t in a["transforms"].transforms
                                               if not isinstance(t, T.HFlipTransform)])
        return out
    return broken


def test_the_tta_model_follows_the_model():
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(os.path.join(CONFIGS, "COCO", "cascade_mask_rcnn_revcolv2_b_100ep.py")),
        ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    wrapped = build_tta_model(model, cfg.test.aug.scales)
    assert isinstance(wrapped, RCNNWithTTA)
    assert wrapped.cfg.MODEL.MASK_ON and wrapped.cfg.MODEL.ROI_HEADS.NUM_CLASSES == 80
    assert wrapped.cfg.TEST.DETECTIONS_PER_IMAGE == model.roi_heads.box_predictor[-1].test_topk_per_image
    assert list(cfg.test.aug.scales) == [0.5, 0.625, 0.75, 0.875, 1.0, 1.125, 1.25, 1.375, 1.5]
    with pytest.raises(TypeError, match="no test-time augmentation for a Linear"):
        build_tta_model(nn.Linear(2, 2), [1.0])


@pytest.mark.slow  # builds Mask2Former (transformers' modules)
def test_mask2former_probabilities_are_averaged_as_the_model_returns_them():
    cfg = LazyConfig.load(os.path.join(CONFIGS, "ADE20K", "mask2former_revcolv2_b_160k.py"))
    cfg.model.backbone.embed_dim, cfg.model.backbone.num_heads = 32, 2
    head = cfg.model.sem_seg_head
    head.conv_dim = head.mask_dim = head.hidden_dim = 32
    head.num_heads, head.num_queries, head.encoder_layers, head.encoder_feedforward_dim = 2, 8, 1, 32
    head.decoder_layers, head.dim_feedforward = 2, 32
    torch.manual_seed(0)
    model = instantiate(cfg.model).eval()
    assert model.sem_seg_output == "probabilities"
    item = {"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "height": 64, "width": 96}
    with torch.no_grad():
        own = model([dict(item)])[0]["sem_seg"]
        one = build_tta_model(model, [1.0], flip=False)([dict(item)])[0]["sem_seg"]
        both = build_tta_model(model, [1.0], flip=True)([dict(item)])[0]["sem_seg"]
        flipped = model([dict(item, image=item["image"].flip(-1))])[0]["sem_seg"].flip(-1)
    assert torch.equal(one, own)  # no softmax on top of Mask2Former's scores
    assert torch.allclose(both, (own + flipped) / 2, atol=1e-6)
