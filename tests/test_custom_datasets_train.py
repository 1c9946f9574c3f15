"""Your own data end to end, as a user types it: ``tools/lazyconfig_train_net.py`` with the
configs of ``configs/custom/`` and ``dataset.*`` overrides trains two iterations and
evaluates, ``--eval-only`` refuses a checkpoint of other classes, and ``tools/visualize.py``
draws the model's predictions; the label-PNG run also evaluates with ``test.aug.enabled=True``
and reports both mIoUs. The datasets are written here (``custom_data_helpers``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from custom_data_helpers import CATEGORIES, SEM_CLASSES, overrides, write_coco_dataset, write_sem_seg_dataset
from d2_helpers import ROOT, TRAIN_NET, assert_overlays_drawn, train_metrics, train_net

from revcolv2_d2 import visualization as visualize  # tools/visualize.py's code, in this process

pytestmark = pytest.mark.slow  # end to end: the training tool in subprocesses

CUSTOM = os.path.join(ROOT, "projects", "RevColV2", "configs", "custom")
COCO_CONFIG = os.path.join(CUSTOM, "mask_rcnn_revcolv2_b_coco_format.py")
SEM_CONFIG = os.path.join(CUSTOM, "upernet_revcolv2_b_sem_seg_folders.py")
SHORT = ["train.max_iter=2", "lr_multiplier.warmup_iters=1", "train.log_period=1",
         "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "dataloader.test.num_workers=0"]
COCO_TINY = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2",
             "model.backbone.square_pad=128", "model.backbone.bottom_up.square_pad=128",
             "dataloader.train.mapper.augmentations.1.target_height=128",
             "dataloader.train.mapper.augmentations.1.target_width=128",
             "dataloader.train.mapper.augmentations.2.crop_size=[128,128]",
             "dataloader.test.mapper.augmentations.0.short_edge_length=128",
             "dataloader.test.mapper.augmentations.0.max_size=128"]
SEM_TINY = ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
            "model.sem_seg_head.aux_channels=8", "model.crop_size=[64,64]", "model.stride=[43,43]",
            "dataloader.train.mapper.augmentations.0.target_height=64",
            "dataloader.train.mapper.augmentations.0.target_width=128",
            "dataloader.train.mapper.augmentations.1.crop_size=[64,64]",
            "dataloader.test.mapper.augmentations.0.target_height=64",
            "dataloader.test.mapper.augmentations.0.target_width=128"]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    data = write_coco_dataset(tmp_path_factory.mktemp("my_coco"))
    out = tmp_path_factory.mktemp("coco_out")
    log = train_net(["--config-file", COCO_CONFIG, *overrides(data), f"train.output_dir={out}", *SHORT, *COCO_TINY],
                    tmp_path_factory.mktemp("datasets"))
    return data, out, log


def test_a_coco_format_dataset_trains_and_evaluates_through_the_custom_config(coco_run):
    data, out, log = coco_run
    records = train_metrics(out)
    assert [r["iteration"] for r in records if "total_loss" in r] == [0, 1]
    result = json.loads((out / "last_eval.json").read_text())
    assert {"bbox", "segm"} <= set(result)
    # scored under the file's category names (ids 3, 7, 12 mapped to 0-2 and back by the evaluator)
    assert {f"AP-{c['name']}" for c in CATEGORIES} <= set(result["bbox"])
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["classes"] == [c["name"] for c in CATEGORIES]
    assert saved["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == len(CATEGORIES) + 1
    assert "Category ids in annotations are not in [1, #categories]! We'll apply a mapping" in log


def test_eval_only_refuses_a_checkpoint_of_other_classes(coco_run, tmp_path):
    data, out, _ = coco_run
    with open(data["val_json"]) as f:
        renamed = json.load(f)
    renamed["categories"] = [dict(c, name=f"not_{c['name']}") for c in renamed["categories"]]
    other_val = tmp_path / "val_renamed.json"
    other_val.write_text(json.dumps(renamed))
    args = ["--config-file", COCO_CONFIG, "--eval-only", f"train.init_checkpoint={out / 'model_final.pth'}",
            f"train.output_dir={tmp_path / 'eval'}", f"dataset.val_json={other_val}",
            f"dataset.val_images={data['val_images']}", *SHORT, *COCO_TINY]
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-W", "ignore", TRAIN_NET, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # one line, no traceback
    assert "model_final.pth was trained on 3 classes that differ from the 3 classes of dataset custom_val: " \
           "checkpoint [lamp, chair, plant] vs dataset [not_lamp, not_chair, not_plant]" in last
    assert "Traceback" not in proc.stderr


def test_visualize_draws_the_custom_models_predictions(coco_run, tmp_path):
    data, out, _ = coco_run
    # the config.yaml the run saved holds the dataset paths: no overrides to repeat
    written = visualize.main(["--config-file", str(out / "config.yaml"), "--checkpoint", str(out / "model_final.pth"),
                              "--input", data["val_images"], "--output", str(tmp_path / "vis"),
                              "--confidence-threshold", "0.0", "--device", "cpu"])
    assert len(written) == 3
    assert_overlays_drawn(Path(data["val_images"]), tmp_path / "vis")


@pytest.fixture(scope="module")
def sem_run(tmp_path_factory):
    data = write_sem_seg_dataset(tmp_path_factory.mktemp("my_sem"))
    out = tmp_path_factory.mktemp("sem_out")
    log = train_net(["--config-file", SEM_CONFIG, *overrides(data), f"train.output_dir={out}", *SHORT, *SEM_TINY,
                     "test.aug.enabled=True", "test.aug.scales=[0.75,1.0,1.5]"], tmp_path_factory.mktemp("datasets"))
    return data, out, log


def test_a_label_png_dataset_trains_and_evaluates_single_scale_and_with_tta(sem_run):
    data, out, log = sem_run
    records = train_metrics(out)
    assert [r["iteration"] for r in records if "loss_sem_seg" in r] == [0, 1]
    result = json.loads((out / "last_eval.json").read_text())
    assert {"sem_seg", "sem_seg_TTA"} <= set(result)
    for task in ("sem_seg", "sem_seg_TTA"):
        assert {f"IoU-{c}" for c in SEM_CLASSES} <= set(result[task])  # the class list's names
        per_class = [result[task][f"IoU-{c}"] for c in SEM_CLASSES]
        assert result[task]["mIoU"] == pytest.approx(np.nanmean(per_class), abs=1e-6)
    line = [x for x in log.splitlines() if "sem_seg mIoU: single-scale" in x]
    assert line and f"single-scale {result['sem_seg']['mIoU']:.2f}" in line[-1]
    assert f"test-time augmentation {result['sem_seg_TTA']['mIoU']:.2f}" in line[-1]
    assert "scales [0.75, 1.0, 1.5] of the test size, each also flipped" in log
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["classes"] == SEM_CLASSES


def test_visualize_draws_the_custom_segmentation(sem_run, tmp_path):
    data, out, _ = sem_run
    written = visualize.main(["--config-file", SEM_CONFIG, "--checkpoint", str(out / "model_final.pth"),
                              "--input", data["val_images"], "--output", str(tmp_path / "vis"), "--device", "cpu",
                              "--opts", *overrides(data), *SEM_TINY])
    assert len(written) == 2
    assert_overlays_drawn(Path(data["val_images"]), tmp_path / "vis")
    # without the override of its classes a model of another class count is refused, naming both numbers
    with pytest.raises(SystemExit, match=r"model.sem_seg_head.num_classes is 5 but dataset custom_val has 3 classes"):
        visualize.main(["--config-file", SEM_CONFIG, "--input", data["val_images"], "--output", str(tmp_path / "x"),
                        "--device", "cpu", "--opts", *overrides(data), *SEM_TINY, "model.sem_seg_head.num_classes=5"])
