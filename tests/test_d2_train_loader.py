"""The detection / segmentation training loader (revcolv2_d2.data.loader.build_train_loader):
detectron2's build_detection_train_loader, batch for batch, whose workers ignore SIGINT /
SIGTERM; every shipped config trains through it, and a config that names detectron2's own
builder still loads."""
import glob
import os
import random
import signal

import numpy as np
import pytest
import torch
from d2_helpers import ROOT
from detectron2.config import LazyConfig
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler

from revcolv2_d2.data.loader import build_train_loader

CONFIGS = [c for c in sorted(glob.glob(os.path.join(ROOT, "projects", "RevColV2", "configs", "*", "*.py")))
           if os.sep + "common" + os.sep not in c]  # the configs one trains (common/: their parts)


def _dataset(n=12):
    return [{"id": i, "width": 30 + 20 * (i % 2), "height": 40} for i in range(n)]


def _mapper(d):
    """What a worker draws and how it handles stop signals."""
    ignored = all(signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM))
    return {"id": d["id"], "width": d["width"], "height": d["height"], "ignores_stop_signals": ignored,
            "draws": (random.random(), float(np.random.rand()), float(torch.rand(1)))}


def _batches(builder, count=6, **kwargs):
    loader = builder(_dataset(), mapper=_mapper, sampler=TrainingSampler(12, seed=3), total_batch_size=2,
                     num_workers=2, seed=5, **kwargs)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == count:
            return out


@pytest.mark.parametrize("grouping", [True, False])
def test_the_batches_are_detectron2_s_and_the_workers_ignore_stop_signals(grouping):
    ours = _batches(build_train_loader, aspect_ratio_grouping=grouping)
    theirs = _batches(build_detection_train_loader, aspect_ratio_grouping=grouping)
    strip = [[{k: v for k, v in d.items() if k != "ignores_stop_signals"} for d in b] for b in ours]
    assert strip == [[{k: v for k, v in d.items() if k != "ignores_stop_signals"} for d in b] for b in theirs]
    assert all(d["ignores_stop_signals"] for b in ours for d in b)
    assert not any(d["ignores_stop_signals"] for b in theirs for d in b)  # what the project's builder adds
    if grouping:  # batches of one aspect ratio
        assert all(len({d["width"] for d in b}) == 1 for b in ours)


def test_every_shipped_config_trains_through_it():
    assert len(CONFIGS) >= 11
    for config in CONFIGS:
        assert LazyConfig.load(config).dataloader.train._target_ is build_train_loader, config


def test_a_saved_config_naming_detectron2_s_builder_still_loads(tmp_path):
    from d2_helpers import DEMO_CONFIG, SMALL_INPUTS, make_mini_shapes
    from detectron2.config import instantiate

    from revcolv2_d2.data import register_all
    from revcolv2_d2.safe_config import load_lazy_config
    from revcolv2_d2.train_net import apply_overrides

    saved = tmp_path / "config.yaml"
    LazyConfig.save(LazyConfig.load(DEMO_CONFIG), str(saved))
    text = saved.read_text()
    assert text.count("_target_: revcolv2_d2.data.loader.build_train_loader") == 1
    saved.write_text(text.replace("revcolv2_d2.data.loader.build_train_loader",
                                  "detectron2.data.build_detection_train_loader"))  # as a run saved it before
    make_mini_shapes(str(tmp_path / "datasets"))
    register_all(str(tmp_path / "datasets"))
    cfg = apply_overrides(load_lazy_config(str(saved)), SMALL_INPUTS)
    batch = next(iter(instantiate(cfg.dataloader.train)))
    assert len(batch) == 2 and batch[0]["image"].shape[0] == 3


@pytest.mark.slow  # a training run in a subprocess
def test_a_saved_config_naming_detectron2_s_builder_still_trains(tmp_path):
    from d2_helpers import TINY_OVERRIDES, make_mini_shapes, train_metrics, train_net

    saved = tmp_path / "config.yaml"
    LazyConfig.save(LazyConfig.load(os.path.join(ROOT, "projects", "RevColV2", "configs", "demo",
                                                 "mask_rcnn_revcolv2_tiny_shapes.py")), str(saved))
    saved.write_text(saved.read_text().replace("revcolv2_d2.data.loader.build_train_loader",
                                               "detectron2.data.build_detection_train_loader"))
    datasets, out = tmp_path / "datasets", tmp_path / "out"
    make_mini_shapes(str(datasets))
    train_net(["--config-file", saved, *TINY_OVERRIDES, f"train.output_dir={out}", "train.max_iter=2",
               "train.eval_period=0", "train.log_period=1", "dataloader.train.num_workers=1"], datasets)
    assert [r["iteration"] for r in train_metrics(out) if "total_loss" in r] == [0, 1]
    assert "build_detection_train_loader" in (out / "config.yaml").read_text()
