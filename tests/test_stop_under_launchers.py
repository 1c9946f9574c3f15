"""SIGTERM to the process group of a multi-process run, as a scheduler sends it: the
processes agree on one step, one checkpoint is written, the launcher exits 143 with one
line (no traceback), and the run resumes from that checkpoint.

- tools/lazyconfig_train_net.py --num-gpus 2 (CPU, gloo);
- tools/torchrun.py --nproc_per_node 2 tools/pretrain.py, whose resumed run gives exactly
  the losses and weights of an uninterrupted one.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES, TRAIN_NET, make_mini_shapes, run_tool
from training_helpers import REPO, TINY_MODEL, tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")]


def _start(cmd, env) -> subprocess.Popen:
    """A launcher in its own session (its own process group, as under a scheduler)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _sigterm_group_when(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)  # the launcher, its training processes and their loader workers
    return proc.communicate(timeout=300)[0]


def _assert_one_line_exit_143(proc, output: str, last_line: str) -> None:
    assert proc.returncode == 143, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert output.strip().splitlines()[-1].startswith(last_line), output[-4000:]


# ----------------------------------------------------------------------------- detectron2 --num-gpus 2
def _d2_args(out, *extra):
    return ["--num-gpus", "2", "--config-file", DEMO_CONFIG, *TINY_OVERRIDES, f"train.output_dir={out}",
            "train.eval_period=0", "train.log_period=1", "train.checkpointer.period=1000", *extra]


def _iterations(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line)["iteration"] for line in f if "total_loss" in line]


def test_sigterm_to_train_net_with_two_processes(tmp_path):
    datasets, out = str(tmp_path / "datasets"), tmp_path / "out"
    make_mini_shapes(datasets)
    proc = _start([sys.executable, "-W", "ignore", TRAIN_NET, *_d2_args(out, "train.max_iter=200",
                                                                       "dataloader.train.num_workers=1")],
                  {"DETECTRON2_DATASETS": datasets})
    metrics = out / "metrics.json"
    output = _sigterm_group_when(proc, lambda: metrics.exists() and metrics.stat().st_size)
    _assert_one_line_exit_143(proc, output, "lazyconfig_train_net: stopped by signal 15")
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("model_"))
    name = (out / "last_checkpoint").read_text().strip()
    assert checkpoints == [name], checkpoints  # one checkpoint, written once (by the main process)
    stopped = torch.load(out / name, map_location="cpu", weights_only=True)["iteration"]
    assert name == f"model_{stopped:07d}.pth" and max(_iterations(out)) == stopped, output[-4000:]
    assert output.count(f"Saving checkpoint to {out / name}") == 1

    proc = run_tool([TRAIN_NET, "--resume", *_d2_args(out, f"train.max_iter={stopped + 3}")], datasets, timeout=400)
    assert f"Starting training from iteration {stopped + 1}" in proc.stdout + proc.stderr
    assert _iterations(out) == list(range(stopped + 3))


# ----------------------------------------------------------------------------- torchrun, classification
CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
OPTS = ("data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4",
        "schedule.epochs=4", "schedule.warmup_epochs=1", "optim.base_lr=0.01", "train.save_every=1",
        "train.vis_images=0", "train.keep_last=0")  # 4 steps of 2 processes x 4 images per epoch


def _torchrun(data, out, *extra):
    return [sys.executable, str(REPO / "tools" / "torchrun.py"), "--standalone", "--nproc_per_node", "2",
            str(REPO / "tools" / "pretrain.py"), "--config", str(CONFIG), "--data-path", str(data),
            "--output-dir", str(out), "--num-workers", "1", "--device", "cpu", *extra, "--opts", *OPTS]


def _train_losses(out: Path):
    return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_sigterm_to_torchrun_exits_143_and_resumes_exactly(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    cut, full = tmp_path / "cut", tmp_path / "full"
    proc = _start(_torchrun(data, cut), {})
    output = _sigterm_group_when(proc, lambda: (cut / "checkpoint-0001.pth").exists())
    _assert_one_line_exit_143(proc, output, "torchrun: stopped by signal 15")
    pointer = (cut / "last_checkpoint").read_text()
    stopped = torch.load(cut / pointer, map_location="cpu", weights_only=True)
    assert stopped["world_size"] == 2 and 4 <= stopped["step"] < 16, output[-4000:]

    for cmd in (_torchrun(data, cut, "--resume", "auto"), _torchrun(data, full)):
        done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert _train_losses(cut) == pytest.approx(_train_losses(full), abs=1e-6)
    a = torch.load(full / "checkpoint-0004.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint-0004.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
