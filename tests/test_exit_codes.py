"""Every launcher's exit status, for success, a failing child and a stop signal: a scheduler
or ``pretrain && finetune`` must be able to tell them apart.

Already tested elsewhere (not repeated): ``tools/pretrain.py`` stopped by SIGTERM exits 143
and by SIGINT 130 (``test_signals.py``); ``tools/lazyconfig_train_net.py`` stopped by
SIGTERM exits 143, alone and with ``--num-gpus 2`` (``test_runs_train_net.py``,
``test_stop_under_launchers.py``), and a two-process run that succeeds exits 0
(``test_runs_train_net.py::test_two_processes_without_cuda_train_on_cpu_with_gloo``);
``tools/torchrun.py`` exits 143 when its training processes are stopped by SIGTERM
(``test_stop_under_launchers.py``). Here: the rest, with tiny runs of a few seconds.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES, TRAIN_NET, make_mini_shapes
from training_helpers import REPO, TINY_MODEL, tiny_dataset

pytestmark = pytest.mark.slow  # subprocesses
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")


def _start(cmd, **env) -> subprocess.Popen:
    """A tool in its own session (its own process group, as under a scheduler)."""
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=dict(ENV, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    return proc.communicate(timeout=timeout)[0]


def _signal_when(proc: subprocess.Popen, ready, signum: int, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, _finish(proc)[-4000:]
        assert time.time() < deadline, "the run made no progress"
        time.sleep(0.1)
    os.killpg(proc.pid, signum)  # the tool and its loader workers, as a scheduler or Ctrl-C does
    return _finish(proc)


# ----------------------------------------------------------------------------- tools/torchrun.py
CHILD = """import os, sys
code = int(sys.argv[1])
if code == 3 and os.environ.get("RANK") != "0":
    code = 0  # one process fails, the other ends normally
print(f"child {os.environ.get('RANK')} exits {code}", flush=True)
sys.exit(code)
"""


def test_torchrun_exit_codes(tmp_path):
    """tools/torchrun.py: two processes that end normally -> 0; one of two exits 3 -> torchrun's
    failure status (1), naming the child's exit code; a process that exits 143, as a training
    process does once a SIGTERM has saved its checkpoint -> 143 with one line. (One process
    there: with two, torchrun's own SIGTERM to the other may land as it exits and be counted
    as a second failure; the group signal a scheduler sends is test_stop_under_launchers.py's.)"""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    procs = {code: _start([REPO / "tools" / "torchrun.py", "--standalone", "--nproc_per_node", nproc,
                           "--monitor_interval", "0.1", child, code]) for code, nproc in ((0, 2), (3, 2), (143, 1))}
    out = {code: _finish(p) for code, p in procs.items()}
    assert procs[0].returncode == 0, out[0][-3000:]
    assert procs[3].returncode == 1 and "exitcode  : 3" in out[3], out[3][-3000:]
    assert procs[143].returncode == 143, out[143][-3000:]
    assert out[143].strip().splitlines()[-1].startswith("torchrun: stopped by signal 15 to the training processes")


# ----------------------------------------------------------------------------- lazyconfig_train_net.py
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("datasets"))
    make_mini_shapes(root)
    return root


def test_train_net_child_failure_is_the_launchers_status(tmp_path, shapes):
    """--num-gpus 2: a training process that exits 1 (--eval-only of a checkpoint of another
    size) makes the launcher exit 1, with one line naming the process; not 0."""
    ckpt = tmp_path / "other_size.pth"
    from revcolv2.mim import create_mim_model

    torch.save({"model": create_mim_model("revcolv2_tiny", embed_dim=48, num_heads=2).state_dict()}, ckpt)
    proc = _start([TRAIN_NET, "--num-gpus", "2", "--eval-only", "--config-file", DEMO_CONFIG, *TINY_OVERRIDES,
                   f"train.init_checkpoint={ckpt}", f"train.output_dir={tmp_path / 'out'}"],
                  DETECTRON2_DATASETS=shapes)
    output = _finish(proc)
    assert proc.returncode == 1, output[-4000:]
    assert re.search(r"lazyconfig_train_net: training process \d exited with status 1", output), output[-4000:]


def test_train_net_sigint_exits_130_and_success_0(tmp_path, shapes):
    """One process: SIGINT (Ctrl-C to the process group) -> a checkpoint and 130; a run
    that ends -> 0."""
    common = ["--config-file", DEMO_CONFIG, *TINY_OVERRIDES, "train.eval_period=0", "train.log_period=1",
              "train.checkpointer.period=1000"]
    stopped = _start([TRAIN_NET, *common, f"train.output_dir={tmp_path / 'cut'}", "train.max_iter=200",
                      "dataloader.train.num_workers=1"], DETECTRON2_DATASETS=shapes)
    ended = _start([TRAIN_NET, *common, f"train.output_dir={tmp_path / 'full'}", "train.max_iter=1"],
                   DETECTRON2_DATASETS=shapes)
    metrics = tmp_path / "cut" / "metrics.json"
    output = _signal_when(stopped, lambda: metrics.exists() and metrics.stat().st_size > 0, signal.SIGINT)
    assert stopped.returncode == 130, output[-4000:]
    assert (tmp_path / "cut" / "last_checkpoint").is_file()
    output = _finish(ended)
    assert ended.returncode == 0, output[-4000:]


# ----------------------------------------------------------------------------- the training tools
def _training(tool, data, out, *extra, opts=()):
    return [REPO / "tools" / f"{tool}.py", "--config", REPO / "configs" / tool / "revcolv2_tiny_demo.yaml",
            "--data-path", data, "--output-dir", out, "--num-workers", "1", "--device", "cpu", *extra, "--opts",
            "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=4", "train.batch_per_gpu=2",
            *(() if tool == "pretrain" else ("train.eval_batch=4",)), *opts]


def test_training_tools_exit_codes(tmp_path):
    """Single-process runs: a finished pre-training run -> 0; a failing fine-tuning and linear
    probing run (an override naming no config key) -> 1; fine-tuning stopped by SIGTERM -> 143,
    linear probing stopped by SIGINT -> 130 (pre-training's are in test_signals.py)."""
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    long = ("schedule.epochs=100", "schedule.warmup_epochs=1")
    procs = {
        "pretrain ends": _start(_training("pretrain", data, tmp_path / "p", opts=("schedule.epochs=1",
                                                                                 "train.vis_images=0"))),
        "finetune fails": _start(_training("finetune", data, tmp_path / "f1", opts=("optim.no_such_key=1",))),
        "linear_probe fails": _start(_training("linear_probe", data, tmp_path / "l1", opts=("optim.no_such_key=1",))),
        "finetune SIGTERM": _start(_training("finetune", data, tmp_path / "f2", opts=long)),
        "linear_probe SIGINT": _start(_training("linear_probe", data, tmp_path / "l2", opts=long)),
    }
    out = {}
    for name, folder, signum in (("finetune SIGTERM", "f2", signal.SIGTERM),
                                 ("linear_probe SIGINT", "l2", signal.SIGINT)):
        log = tmp_path / folder / "log.jsonl"  # an epoch is done: the run is in its training loop
        out[name] = _signal_when(procs[name], lambda: log.exists() and log.stat().st_size > 0, signum)
    out.update({name: _finish(p) for name, p in procs.items() if name not in out})
    expected = {"pretrain ends": 0, "finetune fails": 1, "linear_probe fails": 1, "finetune SIGTERM": 143,
                "linear_probe SIGINT": 130}
    got = {name: procs[name].returncode for name in expected}
    assert got == expected, "\n\n".join(f"{name}: {out[name][-1500:]}" for name in expected
                                        if got[name] != expected[name])
    for name in ("finetune fails", "linear_probe fails"):
        assert "optim.no_such_key" in out[name], out[name][-2000:]
    for name, folder in (("finetune SIGTERM", "f2"), ("linear_probe SIGINT", "l2")):
        assert (Path(tmp_path / folder) / "last_checkpoint").is_file(), out[name][-2000:]
        assert "Traceback" not in out[name], out[name][-2000:]
