"""Signals as schedulers send them: SIGTERM / SIGINT to the whole process group of a run with
DataLoader workers. The run writes one consistent checkpoint, exits 143 / 130, and
``--resume auto`` continues it to the same losses as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
EPOCHS = 6  # 4 steps each: the signal lands after epoch 1, with 20 steps to go
OPTS = ("data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4",
        f"schedule.epochs={EPOCHS}", "schedule.warmup_epochs=1", "optim.base_lr=0.01", "train.save_every=1",
        "train.vis_images=0", "train.keep_last=0")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def start(data, out, *extra) -> subprocess.Popen:
    """tools/pretrain.py in a new session (its own process group, as under a scheduler)."""
    cmd = [sys.executable, str(REPO / "tools" / "pretrain.py"), "--config", str(CONFIG), "--data-path", str(data),
           "--output-dir", str(out), "--num-workers", "2", *extra, "--opts", *OPTS]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def signal_group_after_first_checkpoint(proc: subprocess.Popen, out: Path, signum: int) -> str:
    deadline = time.time() + 120
    while not (out / "checkpoint-0001.pth").exists():  # one epoch of steps is done and logged
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint after 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signum)  # the main process and its loader workers, like SLURM / Ctrl-C
    output, _ = proc.communicate(timeout=120)
    return output


def epoch_losses(out: Path):
    return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_to_the_group_checkpoints_exits_143_and_resumes_exactly(data, tmp_path):
    cut = tmp_path / "cut"
    proc = start(data, cut)
    output = signal_group_after_first_checkpoint(proc, cut, signal.SIGTERM)
    assert proc.returncode == 143, output
    assert "signal 15" in output and "Traceback" not in output, output
    pointer = (cut / "last_checkpoint").read_text()
    state = torch.load(cut / pointer, map_location="cpu", weights_only=False)
    stopped = state["step"]
    assert 4 <= stopped < 4 * EPOCHS, output  # stopped during the run, not after it
    assert not [n for n in os.listdir(cut) if n.startswith(".tmp")]  # no half-written file

    rest = run_tool("pretrain", "--config", CONFIG, "--data-path", data, "--output-dir", cut, "--num-workers", "0",
                    "--resume", "auto", "--opts", *OPTS)
    assert min(rest["history"]) == stopped + 1 and max(rest["history"]) == 4 * EPOCHS
    full = run_tool("pretrain", "--config", CONFIG, "--data-path", data, "--output-dir", tmp_path / "full",
                    "--num-workers", "0", "--opts", *OPTS)
    for step in rest["history"]:
        assert rest["history"][step] == pytest.approx(full["history"][step], abs=1e-6), step
    assert epoch_losses(cut) == pytest.approx(epoch_losses(tmp_path / "full"), abs=1e-6)
    a, b = full["trainer"].model.state_dict(), rest["trainer"].model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_sigint_to_the_group_exits_130_with_a_checkpoint(data, tmp_path):
    proc = start(data, tmp_path)
    output = signal_group_after_first_checkpoint(proc, tmp_path, signal.SIGINT)
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    pointer = (tmp_path / "last_checkpoint").read_text()
    assert torch.load(tmp_path / pointer, map_location="cpu", weights_only=False)["step"] >= 4
