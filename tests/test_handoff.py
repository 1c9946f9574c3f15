"""Pre-training and fine-tuning feed detection and segmentation: the REAL checkpoints that
tools/pretrain.py and tools/finetune.py write (optimizer, scheduler, RNG states, EMA) load
through ``train.init_checkpoint`` of the Mask R-CNN and UperNet demo configs and through
tools/visualize.py, with a load report that lists the loaded tensors; and the README's
flow, pre-training demo then detection demo, works with both configs' sizes as written."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from d2_helpers import DEMO_CONFIG, SMALL_INPUTS, TINY_OVERRIDES, make_mini_shapes, train_net
from PIL import Image
from training_helpers import REPO, run_tool, tiny_dataset

from revcolv2.checkpoint import load_file

pytestmark = pytest.mark.slow

UPERNET_DEMO = str(REPO / "projects" / "RevColV2" / "configs" / "demo" / "upernet_revcolv2_tiny_synthetic.py")
# patch 16 as in the detectron2 configs; 32x32 pre-training images
BACKBONE = "{embed_dim: 32, num_heads: 2}"
UPERNET_TINY = ["model.backbone.embed_dim=32", "model.backbone.num_heads=2", "model.sem_seg_head.channels=16",
                "model.sem_seg_head.aux_channels=8", "dataloader.test.num_workers=0"]
DROPPED = ("mask_token", "decoder_", "head.", "fc_norm.")


def _mini_synthetic_ade(root: str) -> None:
    """One image per split of the built-in ADE20K-layout dataset (the full one has 460)."""
    from revcolv2_d2.data import synthetic_ade20k

    rng = np.random.default_rng(0)
    for split in synthetic_ade20k.SYNTHETIC_ADE_SPLITS:
        image_dir, label_dir = synthetic_ade20k.synthetic_ade_paths(root, split)
        os.makedirs(image_dir)
        os.makedirs(label_dir)
        image, label = synthetic_ade20k.make_scene(rng)
        Image.fromarray(image).save(os.path.join(image_dir, "000000.jpg"))
        Image.fromarray(label, mode="L").save(os.path.join(label_dir, "000000.png"))
    with open(synthetic_ade20k._version_file(root), "w") as f:
        f.write(synthetic_ade20k.GENERATOR_VERSION + "\n")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-0001.pth of a 2-step pre-training run, and checkpoint-last.pth of a
    2-step fine-tuning run (with EMA) started from it."""
    data = tiny_dataset(tmp_path_factory.mktemp("data"), classes=2, train_per_class=4, val_per_class=1)
    common = ["--data-path", data, "--num-workers", "0", "--device", "cpu"]
    opts = ["data.input_size=32", f"model.kwargs={BACKBONE}", "optim.batch_size=4", "train.batch_per_gpu=4",
            "schedule.epochs=1", "schedule.warmup_epochs=0"]
    pre_dir, ft_dir = tmp_path_factory.mktemp("pretrain"), tmp_path_factory.mktemp("finetune")
    run_tool("pretrain", "--config", REPO / "configs/pretrain/revcolv2_tiny_demo.yaml", "--output-dir", pre_dir,
             *common, "--opts", *opts, "train.vis_images=0")
    pretrained = pre_dir / "checkpoint-0001.pth"
    run_tool("finetune", "--config", REPO / "configs/finetune/revcolv2_tiny_demo.yaml", "--output-dir", ft_dir,
             "--finetune", pretrained, *common, "--opts", *opts, "train.eval_batch=2")
    finetuned = ft_dir / "checkpoint-last.pth"
    for path in (pretrained, finetuned):  # what made the hand-off fail: numpy objects in a training checkpoint
        assert {"optimizer", "rng", "scheduler"} <= set(load_file(path))
    assert "model_ema" in load_file(finetuned)
    return {"pretrain": pretrained, "finetune": finetuned}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_mini_shapes(root)
    _mini_synthetic_ade(root)
    return root


def _expected_tensors(path, key) -> int:
    return sum(1 for k in load_file(path)[key] if not k.startswith(DROPPED))


def test_train_net_loads_training_checkpoints(checkpoints, datasets, tmp_path):
    """--eval-only with train.init_checkpoint=<real checkpoint>: Mask R-CNN and UperNet demo
    configs, from pre-training and from fine-tuning (four runs, started together)."""
    runs = {}
    for source, path in checkpoints.items():
        for name, config, tiny in (("maskrcnn", DEMO_CONFIG, TINY_OVERRIDES), ("upernet", UPERNET_DEMO, UPERNET_TINY)):
            out = tmp_path / f"{name}_{source}"
            cmd = [sys.executable, "-W", "ignore", str(REPO / "tools" / "lazyconfig_train_net.py"), "--eval-only",
                   "--config-file", config, *tiny, f"train.init_checkpoint={path}", f"train.output_dir={out}"]
            runs[(name, source)] = subprocess.Popen(
                cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env=dict(os.environ, DETECTRON2_DATASETS=datasets, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE"))
    for (name, source), proc in runs.items():
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"{name} from {source}:\n{log[-4000:]}"
        key = "model_ema" if source == "finetune" else "model"
        # the rule: EMA weights where the checkpoint has them, and the log says which
        taken = "its EMA weights" if key == "model_ema" else "its raw weights"
        assert f"weights: {checkpoints[source]}: {taken}" in log, log[-4000:]
        loaded = int(re.search(r"Loaded (\d+) tensors", log).group(1))
        assert loaded == _expected_tensors(checkpoints[source], key), log[-4000:]
        assert "backbone.bottom_up.net.columns.0" in log or "backbone.net.columns.0" in log
        metric = "copypaste: Task: bbox" if name == "maskrcnn" else "copypaste: mIoU"
        assert metric in log, log[-4000:]


def test_pretraining_demo_then_detection_demo_as_written(datasets, tmp_path):
    """tools/pretrain.py on configs/pretrain/revcolv2_tiny_demo.yaml, then
    tools/lazyconfig_train_net.py on the Mask R-CNN demo config with
    ``train.init_checkpoint=`` that checkpoint: no size override on either side (only the
    images, batch and schedule are shrunk), and every backbone tensor loads."""
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    pre_dir = tmp_path / "pretrain"
    run_tool("pretrain", "--config", REPO / "configs/pretrain/revcolv2_tiny_demo.yaml", "--output-dir", pre_dir,
             "--data-path", data, "--num-workers", "0", "--device", "cpu", "--opts", "data.input_size=32",
             "optim.batch_size=4", "train.batch_per_gpu=4", "schedule.epochs=1", "schedule.warmup_epochs=0",
             "train.vis_images=0")
    pretrained = pre_dir / "checkpoint-0001.pth"
    out = tmp_path / "detection"
    log = train_net(["--config-file", DEMO_CONFIG, *SMALL_INPUTS, "train.max_iter=2", "train.eval_period=2",
                     f"train.init_checkpoint={pretrained}", f"train.output_dir={out}"], datasets)
    loaded = int(re.search(r"Loaded (\d+) tensors", log).group(1))
    assert loaded == _expected_tensors(pretrained, "model"), log[-4000:]
    assert "copypaste: Task: bbox" in log and (out / "model_final.pth").is_file()


def test_visualize_loads_training_checkpoints(checkpoints, datasets, tmp_path, monkeypatch, caplog):
    import logging

    from revcolv2_d2 import visualization as visualize

    monkeypatch.setenv("DETECTRON2_DATASETS", datasets)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(image)
    for source, path in checkpoints.items():
        caplog.clear()
        with caplog.at_level(logging.INFO):
            written = visualize.main(["--config-file", DEMO_CONFIG, "--checkpoint", str(path), "--input", str(image),
                                      "--output", str(tmp_path / source), "--device", "cpu", "--opts",
                                      *TINY_OVERRIDES])
        assert len(written) == 1 and os.path.isfile(written[0])
        key = "model_ema" if source == "finetune" else "model"
        assert f"weights: {path}" in caplog.text, caplog.text[-3000:]
        loaded = int(re.search(r"Loaded (\d+) tensors", caplog.text).group(1))
        assert loaded == _expected_tensors(path, key)
