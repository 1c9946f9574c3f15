"""The Mask2Former demo config through tools/lazyconfig_train_net.py: 20 training
iterations with evaluation, then --eval-only from the checkpoint, then --resume; and
tools/visualize.py drawing the trained model's output."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from revcolv2_d2 import visualization as visualize  # what tools/visualize.py runs, in this process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")
DEMO = os.path.join(ROOT, "projects", "RevColV2", "configs", "demo", "mask2former_revcolv2_tiny_synthetic.py")
SMALL = ["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]


def run(args, datasets, timeout=900):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-W", "ignore", TRAIN_NET] + args, env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    datasets, out = tmp_path_factory.mktemp("datasets"), tmp_path_factory.mktemp("m2f_out")
    run(["--config-file", DEMO, "train.max_iter=20", "train.eval_period=20", "train.checkpointer.period=10",
         "train.log_period=5", f"train.output_dir={out}", *SMALL], datasets)
    return datasets, out


@pytest.mark.slow
def test_demo_trains_evaluates_and_resumes(trained):
    datasets, out = trained
    records = metrics(out)
    train = [r for r in records if "loss_cross_entropy" in r]
    assert train and all(np.isfinite(r["total_loss"]) for r in train)
    assert {"loss_mask", "loss_dice", "loss_dice_0"} <= set(train[-1])  # deep supervision is logged
    assert train[-1]["iteration"] == 19
    final = [r for r in records if "sem_seg/mIoU" in r]
    assert final and 0.0 <= final[-1]["sem_seg/mIoU"] <= 100.0 and "sem_seg/pACC" in final[-1]
    assert (out / "model_0000009.pth").exists() and (out / "model_final.pth").exists()

    # --eval-only from the final checkpoint gives the training run's own evaluation
    log = run(["--config-file", DEMO, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}",
               f"train.output_dir={out / 'eval'}", *SMALL], datasets)
    assert "copypaste: mIoU,fwIoU,mACC,pACC" in log
    with open(out / "eval" / "last_eval.json") as f:
        evaluated = json.load(f)["sem_seg"]["mIoU"]
    assert evaluated == pytest.approx(final[-1]["sem_seg/mIoU"], abs=1e-3)

    # --resume continues from the last checkpoint (iteration 20) to the new max_iter
    run(["--config-file", DEMO, "--resume", "train.max_iter=24", "train.eval_period=100", "train.log_period=1",
         "train.checkpointer.period=100", f"train.output_dir={out}", *SMALL], datasets)
    resumed = [r["iteration"] for r in metrics(out) if "loss_cross_entropy" in r and r["iteration"] >= 20]
    assert resumed and min(resumed) == 20 and max(resumed) == 23


@pytest.mark.slow
def test_visualize_draws_the_mask2former_output(trained, tmp_path, monkeypatch):
    datasets, out = trained
    images = tmp_path / "images"
    images.mkdir()
    val = datasets / "synthetic_ade" / "images" / "validation"
    for name in sorted(os.listdir(val))[:2]:
        (images / name).write_bytes((val / name).read_bytes())
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    visualize.main(["--config-file", DEMO, "--checkpoint", str(out / "model_final.pth"), "--input", str(images),
                    "--output", str(tmp_path / "pred"), "--device", "cpu"])
    drawn = sorted(os.listdir(tmp_path / "pred"))
    assert len(drawn) == 2, drawn
    original = np.asarray(Image.open(images / sorted(os.listdir(images))[0]).convert("RGB"))
    picture = np.asarray(Image.open(tmp_path / "pred" / drawn[0]).convert("RGB"))
    assert picture.shape == original.shape  # drawn at the image's own size
    assert np.abs(picture.astype(int) - original.astype(int)).mean() > 5  # a class overlay was drawn
