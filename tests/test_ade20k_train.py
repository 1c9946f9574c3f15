"""Training and evaluation through tools/lazyconfig_train_net.py: the demo config on the
built-in synthetic data, and the unchanged ADE20K B config on a small fake ADE20K release
converted by tools/prepare_ade20k_sem_seg.py (only sizes and iteration counts overridden)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from d2_helpers import ROOT, assert_overlays_drawn, copy_val_images, train_demo, train_metrics, train_net
from PIL import Image

from revcolv2_d2 import visualization as visualize  # tools/visualize.py's code, in this process
from revcolv2_d2.data.synthetic_ade20k import make_scene

pytestmark = pytest.mark.slow  # end to end: the training tool in subprocesses

DEMO = os.path.join(ROOT, "projects", "RevColV2", "configs", "demo", "upernet_revcolv2_tiny_synthetic.py")
ADE_B = os.path.join(ROOT, "projects", "RevColV2", "configs", "ADE20K", "upernet_revcolv2_b_160k.py")

TINY = ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
        "model.sem_seg_head.aux_channels=8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    return train_demo(tmp_path_factory, DEMO, ["train.max_iter=3", "train.eval_period=3",
                                               "train.checkpointer.period=3", "train.log_period=1",
                                               "dataloader.train.total_batch_size=2",
                                               "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"])


def test_demo_config_trains_and_evaluates(demo_run):
    datasets, out, log = demo_run
    records = train_metrics(out)
    losses = [r["loss_sem_seg"] for r in records if "loss_sem_seg" in r]
    assert losses and all(np.isfinite(losses)) and any("loss_sem_seg_aux" in r for r in records)
    final = [r for r in records if "sem_seg/mIoU" in r]
    assert final and {"sem_seg/fwIoU", "sem_seg/pACC"} <= set(final[-1])
    # the evaluation scored all six classes of the built-in val split, and its mIoU is their mean
    per_class = [v for k, v in final[-1].items() if k.startswith("sem_seg/IoU-") and np.isfinite(v)]
    assert len(per_class) == 6
    assert final[-1]["sem_seg/mIoU"] == pytest.approx(np.mean(per_class), abs=1e-6)
    # three optimizer steps moved the zero-initialised classifier bias
    final_weights = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert final_weights["sem_seg_head.predictor.bias"].abs().max() > 0
    # the built-in dataset was generated in ADE20K's layout
    base = datasets / "synthetic_ade"
    labels = base / "annotations_detectron2" / "training"
    assert len(os.listdir(base / "images" / "training")) == len(os.listdir(labels))


def test_eval_only_from_the_checkpoint_with_whole_image_inference(demo_run):
    datasets, out, _ = demo_run
    log = train_net(["--config-file", DEMO, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}",
                     f"train.output_dir={out / 'eval'}", "model.test_mode=whole", "dataloader.test.num_workers=0"],
                    datasets)
    assert "copypaste: mIoU,fwIoU,mACC,pACC" in log


def _fake_ade20k_release(root, num_train=2, num_val=1):
    """ADEChallengeData2016 as released: JPEG images, labels 0 ("other") and 1..150."""
    rng = np.random.default_rng(0)
    for split, n in (("training", num_train), ("validation", num_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, label = make_scene(rng)
            official = np.where(label == 255, 0, label.astype(np.int32) * 20 + 1).astype(np.uint8)  # 1..101
            name = f"ADE_{split}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg")
            Image.fromarray(official, mode="L").save(root / "annotations" / split / f"{name}.png")


def test_ade20k_config_unchanged_on_a_converted_release(tmp_path):
    datasets = tmp_path / "datasets"
    release = datasets / "ADEChallengeData2016"
    _fake_ade20k_release(release)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare_ade20k_sem_seg.py")], check=True,
                   env=dict(os.environ, DETECTRON2_DATASETS=str(datasets)), capture_output=True)
    assert len(os.listdir(release / "annotations_detectron2" / "validation")) == 1
    out = tmp_path / "out"
    log = train_net(["--config-file", ADE_B, *TINY, "train.max_iter=1", "train.eval_period=1", "train.log_period=1",
                     "train.checkpointer.period=100", f"train.output_dir={out}",
                     "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
                     "dataloader.test.num_workers=0"], datasets)
    assert "ade20k_sem_seg_val" in log or "validation" in log
    final = [r for r in train_metrics(out) if "sem_seg/mIoU" in r]
    assert final, log[-3000:]


def test_visualize_draws_semantic_predictions_and_ground_truth(demo_run, tmp_path, monkeypatch):
    """tools/visualize.py: class-coloured overlays for a folder of images with the demo
    checkpoint, and the built-in dataset's ground truth."""
    datasets, out, _ = demo_run
    images = copy_val_images(datasets, tmp_path / "images")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    visualize.main(["--config-file", DEMO, "--checkpoint", str(out / "model_final.pth"), "--input", str(images),
                    "--output", str(tmp_path / "pred"), "--device", "cpu"])
    visualize.main(["--dataset", "synthetic_ade_val", "--num-images", "2", "--output", str(tmp_path / "gt")])
    for folder in ("pred", "gt"):
        assert_overlays_drawn(images, tmp_path / folder)
