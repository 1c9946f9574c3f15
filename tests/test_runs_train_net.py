"""tools/lazyconfig_train_net.py: override typos are errors, SIGTERM writes a checkpoint that
--resume continues, metrics.json has no repeated iterations after a resume, and
--num-gpus 2 runs on CPU (gloo)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES, TRAIN_NET, make_mini_shapes, run_tool


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    make_mini_shapes(root)
    return root


def common(out):
    return ["--config-file", DEMO_CONFIG, *TINY_OVERRIDES, f"train.output_dir={out}", "train.eval_period=0",
            "train.log_period=1"]


def iterations(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if "total_loss" in line]


@pytest.mark.slow  # a subprocess / second process: end to end
def test_override_typo_is_an_error_with_the_closest_key(root, tmp_path):
    typo, hint = "trian.max_iter=1", "train.max_iter"
    env = dict(os.environ, DETECTRON2_DATASETS=root)
    proc = subprocess.run([sys.executable, TRAIN_NET, *common(tmp_path), typo], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    key = typo.split("=")[0]
    assert f"has no key '{key}'" in proc.stderr and f"did you mean '{hint}'" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(tmp_path, "metrics.json"))  # nothing ran


def test_plus_prefix_adds_a_new_key(tmp_path):
    from detectron2.config import LazyConfig

    from revcolv2_d2.train_net import OverrideKeyError, apply_overrides

    cfg = LazyConfig.load(DEMO_CONFIG)
    apply_overrides(cfg, [*TINY_OVERRIDES, "+train.note=hello", "train.max_iter=3"])
    assert cfg.train.note == "hello" and cfg.train.max_iter == 3
    assert cfg.dataloader.train.mapper.augmentations[1].target_height == 128  # list items by index
    # an argument the config leaves at its default is a key too (RevColV2Backbone(**net_kwargs))
    apply_overrides(cfg, ["model.backbone.bottom_up.mlp_ratio=2", "model.proposal_generator.min_box_size=0.5"])
    assert cfg.model.proposal_generator.min_box_size == 0.5
    with pytest.raises(OverrideKeyError, match="dataloader.train.mapper.augmentations.1.target_height"):
        apply_overrides(cfg, ["dataloader.train.mapper.augmentations.1.target_heigth=16"])
    with pytest.raises(OverrideKeyError, match="did you mean 'train.max_iter'"):
        apply_overrides(cfg, ["train.max_iterz=5"])
    assert cfg.train.max_iter == 3  # nothing applied


@pytest.mark.slow
def test_resume_drops_metrics_past_the_resumed_iteration(root, tmp_path):
    out = str(tmp_path)
    run_tool([TRAIN_NET, *common(out), "train.checkpointer.period=2", "train.max_iter=4"], root)
    assert iterations(out) == [0, 1, 2, 3]
    # as if killed after iteration 3 was logged but before model_0000003.pth and
    # model_final.pth were written (--resume takes the newest readable checkpoint)
    os.remove(os.path.join(out, "model_final.pth"))
    os.remove(os.path.join(out, "model_0000003.pth"))
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    proc = run_tool([TRAIN_NET, "--resume", *common(out), "train.checkpointer.period=2", "train.max_iter=4"], root)
    assert "Starting training from iteration 2" in proc.stdout + proc.stderr
    assert iterations(out) == [0, 1, 2, 3]  # iterations 2 and 3 once, from the resumed run


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_at_the_current_iteration_and_resume_continues(root, tmp_path):
    out = str(tmp_path)
    env = dict(os.environ, DETECTRON2_DATASETS=root, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen([sys.executable, TRAIN_NET, *common(out), "train.max_iter=200",
                             "train.checkpointer.period=1000", "dataloader.train.num_workers=1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = os.path.join(out, "metrics.json")
    deadline = time.time() + 240
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):  # an iteration is logged
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and its loader worker
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 143, output[-4000:]
    with open(os.path.join(out, "last_checkpoint")) as f:
        name = f.read().strip()
    ckpt = torch.load(os.path.join(out, name), map_location="cpu", weights_only=False)
    stopped = ckpt["iteration"]
    assert name == f"model_{stopped:07d}.pth" and 0 <= stopped < 199, output[-4000:]
    assert max(iterations(out)) == stopped
    proc = run_tool([TRAIN_NET, "--resume", *common(out), f"train.max_iter={stopped + 3}",
                     "train.checkpointer.period=1000"], root)
    assert f"Starting training from iteration {stopped + 1}" in proc.stdout + proc.stderr
    assert iterations(out) == list(range(stopped + 3))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_two_processes_without_cuda_train_on_cpu_with_gloo(root, tmp_path):
    out = str(tmp_path)
    proc = run_tool([TRAIN_NET, "--num-gpus", "2", *common(out), "train.max_iter=2",
                     "train.checkpointer.period=1000"], root, timeout=400)
    assert "2 CPU processes (gloo)" in proc.stdout + proc.stderr
    assert iterations(out) == [0, 1]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    shutil.rmtree(out)


def test_every_detection_and_segmentation_config_bounds_its_checkpoints():
    import glob

    from detectron2.config import LazyConfig

    configs = [f for f in glob.glob(os.path.join(ROOT, "projects", "RevColV2", "configs", "*", "*.py"))
               if os.sep + "common" + os.sep not in f]
    assert len(configs) >= 8
    for f in configs:
        # detectron2's default keeps 100 periodic checkpoints (~130 GB for a base model)
        assert LazyConfig.load(f).train.checkpointer.max_to_keep <= 5, f
