"""tools/visualize.py (revcolv2_d2.visualization) draws predictions and ground truth: the
written pixels differ from the input."""
import os

import cv2
import numpy as np
import pytest
import torch
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES, make_mini_shapes
from detectron2.data import DatasetCatalog, MetadataCatalog

from revcolv2_d2 import visualization as visualize

# an untrained model: keep its 5 best detections, whatever their score, so something is drawn
KEEP_FEW = ["model.roi_heads.box_predictor.test_score_thresh=0.0",
            "model.roi_heads.box_predictor.test_topk_per_image=5"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_mini_shapes(root)
    return root


@pytest.fixture
def datasets_env(shapes_root, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", shapes_root)
    return shapes_root


def _changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((np.abs(a.astype(int) - b.astype(int)).max(axis=2) > 30).mean())


def test_ground_truth_is_drawn(datasets_env, tmp_path):
    written = visualize.main(["--dataset", "synthetic_shapes_val", "--num-images", "6", "--output", str(tmp_path)])
    assert len(written) == 6
    records = DatasetCatalog.get("synthetic_shapes_val")[:6]
    changed = [_changed_fraction(cv2.imread(out), cv2.imread(r["file_name"])) for out, r in zip(written, records)]
    for frac, r in zip(changed, records):
        if r["annotations"]:
            assert frac > 0.01, r["file_name"]  # boxes, masks and labels cover part of the image


@pytest.mark.slow
def test_predictions_are_drawn_on_images_and_folders(datasets_env, tmp_path):
    val_dir = os.path.join(datasets_env, "synthetic_shapes", "val")
    first = sorted(os.listdir(val_dir))[0]
    written = visualize.main([
        "--config-file", DEMO_CONFIG, "--checkpoint", "", "--input", val_dir, "--output", str(tmp_path),
        "--confidence-threshold", "0.0", "--device", "cpu",
        "--opts", *TINY_OVERRIDES, *KEEP_FEW,
    ])
    assert len(written) == len(os.listdir(val_dir))
    out = cv2.imread(os.path.join(str(tmp_path), os.path.splitext(first)[0] + ".png"))
    assert _changed_fraction(out, cv2.imread(os.path.join(val_dir, first))) > 0.01


@pytest.mark.slow
def test_video_in_video_out(datasets_env, tmp_path):
    val_dir = os.path.join(datasets_env, "synthetic_shapes", "val")
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (160, 128))
    for name in sorted(os.listdir(val_dir))[:3]:
        writer.write(cv2.resize(cv2.imread(os.path.join(val_dir, name)), (160, 128)))
    writer.release()
    out_dir = tmp_path / "out"
    [out] = visualize.main(["--config-file", DEMO_CONFIG, "--checkpoint", "", "--video-input", video,
                            "--output", str(out_dir), "--confidence-threshold", "0.0",
                            "--opts", *TINY_OVERRIDES, *KEEP_FEW])
    cap = cv2.VideoCapture(out)
    frames = 0
    while cap.read()[0]:
        frames += 1
    assert frames == 3


def test_semantic_segmentation_prediction_is_drawn():
    meta = MetadataCatalog.get("_test_vis_semseg_pred")
    meta.set(stuff_classes=["sky", "grass", "road"])
    rgb = np.full((48, 64, 3), 127, np.uint8)
    logits = torch.zeros(3, 48, 64)
    logits[1, :, :32] = 5.0
    logits[2, :, 32:] = 5.0
    drawn = visualize.draw_predictions(rgb, {"sem_seg": logits}, meta, threshold=0.5)
    assert _changed_fraction(drawn, rgb) > 0.5


def test_semantic_segmentation_ground_truth_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    image, label = str(tmp_path / "img.jpg"), str(tmp_path / "label.png")
    cv2.imwrite(image, np.full((48, 64, 3), 127, np.uint8))
    seg = np.zeros((48, 64), np.uint8)
    seg[:, 32:] = 1
    seg[:8] = 255  # ignore label: left undrawn
    cv2.imwrite(label, seg)
    name = "_test_vis_semseg_gt"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [{"file_name": image, "sem_seg_file_name": label,
                                            "height": 48, "width": 64}])
    MetadataCatalog.get(name).set(stuff_classes=["wall", "floor"], ignore_label=255)
    [out] = visualize.main(["--dataset", name, "--output", str(tmp_path / "vis")])
    assert _changed_fraction(cv2.imread(out), cv2.imread(image)) > 0.5
