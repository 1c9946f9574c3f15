"""Oracle for COCO boxes and masks through the Mask R-CNN config's real evaluation path.

A tiny COCO 2017 (``coco/annotations/instances_val2017.json``, ``coco/val2017/*.jpg``, odd
image sizes, COCO's 80 non-contiguous category ids) is registered under the built-in name
``coco_2017_val`` exactly as detectron2 registers it. Everything is the config's: the test
mapper (shortest edge to 1024), ``GeneralizedRCNN`` inference (normalisation, square
padding, ``detector_postprocess`` resizing boxes and pasting masks back to the original
size), the contiguous-id mapping and ``COCOEvaluator``. Only the network is replaced: an
oracle ROI head returns the ground truth as raw outputs at the network's input resolution
(boxes in input pixels, per-box mask grids, contiguous class ids), as Mask R-CNN's ROI
heads do.

A perfect oracle scores box and mask AP 100; shifting its classes by one, drawing it at
half scale, or a test mapper that halves the output ``height``/``width`` scores far lower.
"""
import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.data.datasets.builtin import _PREDEFINED_SPLITS_COCO
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata
from detectron2.evaluation import inference_on_dataset
from detectron2.structures import Boxes, BoxMode, Instances, PolygonMasks
from eval_oracle_helpers import builtin_names_on, config_loader_and_evaluator, load_config
from PIL import Image
from torch import nn

CONFIG = "COCO/mask_rcnn_revcolv2_b_50ep.py"
TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2"]
NAME = "coco_2017_val"
IMAGE_SIZES = [(157, 203), (211, 149), (101, 187)]  # (h, w), odd on purpose
CATEGORY_IDS = [1, 18, 90]  # person, dog, toothbrush: contiguous 0, 16, 79
# per-box mask grid: Mask R-CNN predicts 28x28; a finer grid lets the pasted ground truth
# reach IoU > 0.95 (AP at every threshold), which 28x28 does not on these small objects
MASK_SIZE = 112


def polygon_of(kind: str, cx: float, cy: float, r: float, angle: float):
    if kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        pts = np.stack([r * np.cos(t), 0.7 * r * np.sin(t)], 1)
    elif kind == "triangle":
        t = np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:
        pts = np.array([[r, 0.6 * r], [-r, 0.6 * r], [-r, -0.6 * r], [r, -0.6 * r]])
    c, s = np.cos(angle), np.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + [cx, cy]
    return [round(float(v), 2) for v in pts.reshape(-1)]


def make_coco(root: str) -> None:
    """Three val2017 images with two or three objects each, in COCO's file layout."""
    from pycocotools import mask as mask_util

    image_dir = os.path.join(root, "coco", "val2017")
    os.makedirs(image_dir)
    os.makedirs(os.path.join(root, "coco", "annotations"))
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        image_id = 1000 + 7 * i  # COCO image ids are not 0..n-1
        file_name = f"{image_id:012d}.jpg"
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        centres = [(0.3, 0.3), (0.7, 0.65), (0.3, 0.75)][: 2 + i % 2]
        for k, (fx, fy) in enumerate(centres):
            kind = ("ellipse", "triangle", "box")[(i + k) % 3]
            poly = polygon_of(kind, fx * w, fy * h, 0.18 * min(h, w), rng.uniform(0, np.pi))
            rle = mask_util.frPyObjects([poly], h, w)
            x, y, bw, bh = mask_util.toBbox(rle)[0].tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[(i + k) % 3],
                "segmentation": [poly], "area": float(mask_util.area(rle)[0]), "bbox": [x, y, bw, bh],
                "iscrowd": 0,
            })
            cv2.fillPoly(image, [np.array(poly).reshape(-1, 1, 2).round().astype(np.int32)], (200, 40 * k, 90))
        Image.fromarray(image).save(os.path.join(image_dir, file_name), quality=95)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    categories = [{"id": c["id"], "name": c["name"], "supercategory": "coco"} for c in COCO_CATEGORIES if c["isthing"]]
    with open(os.path.join(root, "coco", "annotations", "instances_val2017.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def register_coco_val(root: str) -> None:
    """detectron2's own registration of ``coco_2017_val`` (builtin.register_all_coco)."""
    image_root, json_file = _PREDEFINED_SPLITS_COCO["coco"][NAME]
    register_coco_instances(NAME, _get_builtin_metadata("coco"), os.path.join(root, json_file),
                            os.path.join(root, image_root))


class NoProposals(nn.Module):
    def forward(self, images, features, gt_instances=None):
        return [None] * len(images), {}


class GroundTruthROIHeads(nn.Module):
    """Returns each image's ground truth as Mask R-CNN's ROI heads return predictions: at
    the network input's resolution (``images.image_sizes``), masks as per-box grids.

    The image ids come from a forward pre-hook on the model; the ground truth from the
    registered dataset (boxes, polygons, contiguous class ids) and is scaled by the ratio
    of the network input size to the original size read from the dataset.
    """

    def __init__(self, dataset_name: str, class_shift: int = 0, scale: float = 1.0):
        super().__init__()
        self.gt = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}
        self.class_shift, self.scale = class_shift, scale
        self.image_ids = []

    def remember_inputs(self, model, args):
        self.image_ids = [x["image_id"] for x in args[0]]

    def forward(self, images, features, proposals, targets=None):
        results = []
        for image_id, (h_in, w_in) in zip(self.image_ids, images.image_sizes):
            d = self.gt[image_id]
            sx, sy = w_in / d["width"], h_in / d["height"]
            anns = d["annotations"]
            boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
                                 dtype=torch.float32) * torch.tensor([sx, sy, sx, sy]) * self.scale
            polygons = [[np.array(p).reshape(-1, 2) * [sx, sy] * self.scale for p in a["segmentation"]]
                        for a in anns]
            polygons = [[p.reshape(-1) for p in ps] for ps in polygons]
            masks = PolygonMasks(polygons).crop_and_resize(boxes, MASK_SIZE)  # (N, M, M) bool
            inst = Instances((h_in, w_in))
            inst.pred_boxes = Boxes(boxes)
            inst.scores = torch.ones(len(anns))
            inst.pred_classes = (torch.tensor([a["category_id"] for a in anns]) + self.class_shift) % 80
            inst.pred_masks = masks.float()[:, None]  # (N, 1, M, M) mask probabilities
            results.append(inst)
        return results, {}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_coco(root)
    with builtin_names_on([NAME], lambda: register_coco_val(root)):
        yield root


def evaluate(tmp_path, halve_output_size=False, **oracle):
    cfg = load_config(CONFIG, TINY)
    assert cfg.dataloader.test.dataset.names == NAME
    model = instantiate(cfg.model).eval()
    model.backbone.forward = lambda x: {}  # the network's features are not needed; its padding rules are
    model.proposal_generator = NoProposals()
    model.roi_heads = GroundTruthROIHeads(NAME, **oracle)
    model.register_forward_pre_hook(model.roi_heads.remember_inputs)
    loader, evaluator = config_loader_and_evaluator(cfg, str(tmp_path))
    if halve_output_size:  # a broken test mapper: the evaluator then scores at half size
        mapper = instantiate(cfg.dataloader.test.mapper)

        def halving(d):
            out = mapper(d)
            out["height"], out["width"] = out["height"] // 2, out["width"] // 2
            return out

        loader = build_detection_test_loader(dataset=instantiate(cfg.dataloader.test.dataset), mapper=halving,
                                             num_workers=0)
    return inference_on_dataset(model, loader, evaluator)


@pytest.mark.slow
def test_ground_truth_scores_box_and_mask_ap_100(coco_root, tmp_path):
    res = evaluate(tmp_path)
    for task in ("bbox", "segm"):
        assert res[task]["AP"] == pytest.approx(100.0, abs=1e-6), (task, res[task])
        assert res[task]["AP75"] == pytest.approx(100.0, abs=1e-6), (task, res[task])
    # the three categories in use were scored under their COCO names
    assert {k for k, v in res["bbox"].items() if k.startswith("AP-") and not np.isnan(v)} == {
        "AP-person", "AP-dog", "AP-toothbrush"}


@pytest.mark.slow
@pytest.mark.parametrize("oracle", [dict(class_shift=1), dict(scale=0.5), dict(halve_output_size=True)],
                         ids=["class_shift", "half_scale", "mapper_halves_height_width"])
def test_wrong_predictions_score_far_lower(coco_root, tmp_path, oracle):
    res = evaluate(tmp_path, **oracle)
    for task in ("bbox", "segm"):
        assert res[task]["AP"] < 20.0, (task, res[task])


def test_the_config_resizes_the_odd_sizes_and_keeps_the_original_size_for_evaluation(coco_root):
    cfg = load_config(CONFIG, TINY)
    cfg.dataloader.test.num_workers = 0
    sizes = []
    for (item,) in instantiate(cfg.dataloader.test):
        h, w = item["image"].shape[1:]
        assert max(h, w) == 1024 or min(h, w) == 1024
        sizes.append((item["height"], item["width"]))
    assert sorted(sizes) == sorted(IMAGE_SIZES)
