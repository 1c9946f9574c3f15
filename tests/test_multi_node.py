"""Multi-node training, run as two "nodes" of one process each on this machine (CPU, gloo),
against the single-node run with two processes: the same losses and the same weights.

- tools/pretrain.py through torchrun --nnodes 2 with a c10d rendezvous (tools/torchrun.py);
- tools/lazyconfig_train_net.py --num-machines 2 --machine-rank {0,1} --num-gpus 1.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES, TRAIN_NET, make_mini_shapes, train_metrics
from training_helpers import REPO, TINY_MODEL, tiny_dataset

pytestmark = [pytest.mark.slow, pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", **extra)


def _run_together(commands, env, timeout=600):
    """Start every command at once (the nodes of one job) and wait for all of them."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in commands]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


# ----------------------------------------------------------------------------- torchrun, pretrain.py
CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
OPTS = ("data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4",
        "schedule.epochs=2", "schedule.warmup_epochs=1", "optim.base_lr=0.01", "train.vis_images=0")


def _pretrain(launcher, data, out):
    return [sys.executable, str(REPO / "tools" / "torchrun.py"), *launcher, str(REPO / "tools" / "pretrain.py"),
            "--config", str(CONFIG), "--data-path", str(data), "--output-dir", str(out), "--num-workers", "0",
            "--device", "cpu", "--opts", *OPTS]


def test_pretrain_on_two_nodes_equals_one_node_with_two_processes(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    nodes, single = tmp_path / "nodes", tmp_path / "single"
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"localhost:{_free_port()}", "--rdzv_id", "two-nodes"]
    outputs = _run_together([_pretrain(rdzv, data, nodes), _pretrain(rdzv, data, nodes)], _env())
    assert any("2 process(es) x 4" in out for out in outputs), outputs[0][-3000:]
    _run_together([_pretrain(["--standalone", "--nproc_per_node", "2"], data, single)], _env())

    def losses(out):
        return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]

    assert len(losses(nodes)) == 2 and losses(nodes) == pytest.approx(losses(single), abs=1e-6)
    a = torch.load(nodes / "checkpoint-0002.pth", map_location="cpu", weights_only=True)
    b = torch.load(single / "checkpoint-0002.pth", map_location="cpu", weights_only=True)
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 8  # 2 epochs x 4 steps
    assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6) for k in a["model"])


# ----------------------------------------------------------------------------- detectron2 --num-machines 2
def _train_net(out, *launch):
    return [sys.executable, "-W", "ignore", TRAIN_NET, *launch, "--config-file", DEMO_CONFIG, *TINY_OVERRIDES,
            f"train.output_dir={out}", "train.max_iter=3", "train.eval_period=0", "train.log_period=1",
            "train.checkpointer.period=1000"]


def test_lazyconfig_train_net_on_two_machines_equals_one_machine_with_two_processes(tmp_path):
    datasets = str(tmp_path / "datasets")
    make_mini_shapes(datasets)
    env = _env(DETECTRON2_DATASETS=datasets)
    machines, single = tmp_path / "machines", tmp_path / "single"
    url = f"tcp://127.0.0.1:{_free_port()}"
    _run_together([_train_net(machines, "--num-machines", "2", "--machine-rank", str(rank), "--num-gpus", "1",
                              "--dist-url", url) for rank in (0, 1)], env)
    _run_together([_train_net(single, "--num-gpus", "2")], env)

    def losses(out):
        return {r["iteration"]: r["total_loss"] for r in train_metrics(out) if "total_loss" in r}

    assert sorted(losses(machines)) == sorted(losses(single)) == [0, 1, 2]
    assert list(losses(machines).values()) == pytest.approx(list(losses(single).values()), abs=1e-5)
    a = torch.load(machines / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(single / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
