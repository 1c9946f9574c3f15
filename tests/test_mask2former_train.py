"""The Mask2Former demo config through tools/lazyconfig_train_net.py: 20 training
iterations with evaluation, then --eval-only from the checkpoint, then --resume; and
tools/visualize.py drawing the trained model's output."""
import json
import os

import numpy as np
import pytest
from d2_helpers import ROOT, assert_overlays_drawn, copy_val_images, train_demo, train_metrics, train_net

from revcolv2_d2 import visualization as visualize  # what tools/visualize.py runs, in this process

DEMO = os.path.join(ROOT, "projects", "RevColV2", "configs", "demo", "mask2former_revcolv2_tiny_synthetic.py")
SMALL = ["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    datasets, out, _ = train_demo(tmp_path_factory, DEMO, ["train.max_iter=20", "train.eval_period=20",
                                                           "train.checkpointer.period=10", "train.log_period=5",
                                                           *SMALL], timeout=900)
    return datasets, out


@pytest.mark.slow
def test_demo_trains_evaluates_and_resumes(trained):
    datasets, out = trained
    records = train_metrics(out)
    train = [r for r in records if "loss_cross_entropy" in r]
    assert train and all(np.isfinite(r["total_loss"]) for r in train)
    assert {"loss_mask", "loss_dice", "loss_dice_0"} <= set(train[-1])  # deep supervision is logged
    assert train[-1]["iteration"] == 19
    final = [r for r in records if "sem_seg/mIoU" in r]
    assert final and 0.0 <= final[-1]["sem_seg/mIoU"] <= 100.0 and "sem_seg/pACC" in final[-1]
    assert (out / "model_0000009.pth").exists() and (out / "model_final.pth").exists()

    # --eval-only from the final checkpoint gives the training run's own evaluation
    log = train_net(["--config-file", DEMO, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}",
                     f"train.output_dir={out / 'eval'}", *SMALL], datasets)
    assert "copypaste: mIoU,fwIoU,mACC,pACC" in log
    with open(out / "eval" / "last_eval.json") as f:
        evaluated = json.load(f)["sem_seg"]["mIoU"]
    assert evaluated == pytest.approx(final[-1]["sem_seg/mIoU"], abs=1e-3)

    # --resume continues from the last checkpoint (iteration 20) to the new max_iter
    train_net(["--config-file", DEMO, "--resume", "train.max_iter=24", "train.eval_period=100", "train.log_period=1",
               "train.checkpointer.period=100", f"train.output_dir={out}", *SMALL], datasets)
    resumed = [r["iteration"] for r in train_metrics(out) if "loss_cross_entropy" in r and r["iteration"] >= 20]
    assert resumed and min(resumed) == 20 and max(resumed) == 23


@pytest.mark.slow
def test_visualize_draws_the_mask2former_output(trained, tmp_path, monkeypatch):
    datasets, out = trained
    images = copy_val_images(datasets, tmp_path / "images")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    visualize.main(["--config-file", DEMO, "--checkpoint", str(out / "model_final.pth"), "--input", str(images),
                    "--output", str(tmp_path / "pred"), "--device", "cpu"])
    assert_overlays_drawn(images, tmp_path / "pred")  # a class overlay on each image
