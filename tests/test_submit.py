"""tools/submit.py: SLURM jobs through submitit. Unit level: the sbatch script its options
make (sbatch and srun faked on PATH), the node's command line from the job's environment,
the resume options of a requeued run. End to end (slow, submitit's local executor on the
CPU, the tiny preset): a job runs to the end; a job interrupted through submitit's
checkpoint path (SIGUSR2, as SLURM sends it) requeues itself and ends with the weights of
the uninterrupted one."""
import json
import os
import pickle
import signal
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from training_helpers import REPO, TINY_MODEL, tiny_dataset

from revcolv2.cli import submit
from revcolv2.cluster import ToolJob, rendezvous_port, resume_argv


@pytest.mark.parametrize("text,minutes", [("90", 90), ("72:00:00", 4320), ("1-00:00:00", 1440), ("2-12", 3600),
                                          ("10:30", 11), ("0:45:00", 45), ("1-2:30", 1590)])
def test_slurm_time_formats_are_read_in_minutes(text, minutes):
    assert submit.slurm_minutes(text) == minutes


def test_a_bad_time_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        submit.parser().parse_args(["--time", "3 days", "pretrain"])
    assert "'3 days' is not a SLURM time" in capsys.readouterr().err


def test_a_requeued_run_resumes_and_never_overwrites():
    assert resume_argv("pretrain", ["--config", "c", "--overwrite", "--resume", "old.pth", "--opts", "a=1"]) == \
        ["--config", "c", "--opts", "a=1", "--resume", "auto"]
    assert resume_argv("finetune", ["--config", "c", "--resume=auto"]) == ["--config", "c", "--resume", "auto"]
    assert resume_argv("lazyconfig_train_net", ["--config-file", "f", "--overwrite", "train.max_iter=5"]) == \
        ["--resume", "--config-file", "f", "train.max_iter=5"]


def _env(nodes, node, job_id="777"):
    return SimpleNamespace(num_nodes=nodes, node=node, hostnames=["gpu-a17", "gpu-a18"][:nodes], job_id=job_id)


def test_each_node_starts_the_launcher_with_the_job_ranks_and_the_first_node_as_rendezvous(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    job = ToolJob("tools/pretrain.py", ["--config", "c"], gpus_per_node=8, workdir="/w")
    port = str(rendezvous_port("777"))
    cmd = job.command(_env(2, 1))
    assert cmd[1].endswith("tools/torchrun.py")
    assert cmd[2:14] == ["--nnodes", "2", "--node_rank", "1", "--master_addr", "gpu-a17", "--master_port", port,
                         "--nproc_per_node", "8", str(REPO / "tools" / "pretrain.py"), "--config"]
    assert job.command(_env(1, 0))[2:5] == ["--standalone", "--nproc_per_node", "8"]
    d2 = ToolJob("lazyconfig_train_net", ["--config-file", "f", "train.max_iter=5"], gpus_per_node=4, workdir="/w")
    assert d2.command(_env(2, 1))[2:] == ["--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1",
                                          "--dist-url", f"tcp://gpu-a17:{port}", "--config-file", "f",
                                          "train.max_iter=5"]
    assert "auto" in d2.command(_env(1, 0))
    # a requeued run, by submitit's checkpoint or by SLURM itself, resumes
    assert job.requeued().command(_env(1, 0))[-2:] == ["--resume", "auto"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert job.command(_env(1, 0))[-2:] == ["--resume", "auto"]
    assert rendezvous_port("777", 29400) == 29400


def test_the_job_sets_the_distributed_options_itself():
    with pytest.raises(SystemExit, match="--num-gpus come from the job"):
        ToolJob("lazyconfig_train_net", ["--num-gpus", "8", "--config-file", "f"], 8, "/w")
    with pytest.raises(SystemExit, match="not a training tool"):
        ToolJob("demo", [], 1, "/w")


def test_submit_options_reach_the_sbatch_script_and_the_job(tmp_path, monkeypatch):
    """A fake sbatch (and srun, which submitit looks for) on PATH keeps the script it is given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", f'cp "$1" {tmp_path}/job.sh; echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    logs = tmp_path / "logs"
    job = submit.main(["--nodes", "2", "--gpus-per-node", "4", "--partition", "learn", "--time", "1-00:00:00",
                       "--account", "vision", "--qos", "high", "--constraint", "h100", "--exclude", "node[01-02]",
                       "--comment", "mim", "--cpus-per-gpu", "12", "--mem-gb", "400", "--job-name", "mim-b",
                       "--signal-delay-s", "300", "--max-requeues", "5", "--port", "29411",
                       "--setup", "module load cuda/12.4", "--slurm-arg", "mail-type=END", "--log-dir", str(logs),
                       "pretrain", "--config", "configs/pretrain/revcolv2_base.yaml", "--data-path", "/data/in1k"])
    assert job.job_id == "4242"
    script = (tmp_path / "job.sh").read_text()
    for line in ("--partition=learn", "--time=1440", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                 "--cpus-per-task=48", "--mem=400GB", "--signal=USR2@300", "--account=vision", "--qos=high",
                 "--constraint=h100", "--exclude='node[01-02]'", "--comment=mim", "--job-name=mim-b",
                 "--mail-type=END", f"--output={logs}/%j/%j_0_log.out".replace("/%j/", "/")):
        assert f"#SBATCH {line}" in script, (line, script)
    assert "module load cuda/12.4" in script and "srun" in script and "submitit.core._submit" in script
    with open(logs / "4242_submitted.pkl", "rb") as f:
        delayed = pickle.load(f)
    tool_job = delayed.function
    assert isinstance(tool_job, ToolJob) and delayed._timeout_countdown == 5
    assert (tool_job.tool, tool_job.gpus_per_node, tool_job.port, tool_job.workdir) == \
        ("pretrain", 4, 29411, os.getcwd())
    assert tool_job.argv == ["--config", "configs/pretrain/revcolv2_base.yaml", "--data-path", "/data/in1k"]


def test_without_srun_the_slurm_cluster_is_refused_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="no srun here"):
        submit.main(["--log-dir", str(tmp_path / "logs"), "pretrain", "--config", "c"])


# ----------------------------------------------------------------------------- end to end, local executor
CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
OPTS = ("data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4",
        "schedule.epochs=6", "schedule.warmup_epochs=1", "optim.base_lr=0.01", "train.save_every=1",
        "train.vis_images=0", "train.keep_last=0")  # 4 steps of 2 processes x 4 images per epoch


def _submit(tmp_path, data, out, *extra):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return submit.main(["--cluster", "local", "--gpus-per-node", "2", "--time", "30",
                        "--log-dir", str(tmp_path / "logs"), *extra,
                        "pretrain", "--config", str(CONFIG), "--data-path", str(data), "--output-dir", str(out),
                        "--num-workers", "0", "--device", "cpu", "--opts", *OPTS])


def _task_pid(job, timeout=60) -> int:
    """The job's task (submitit's process that runs ToolJob), a child of the local controller."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{job._process.pid}/task/{job._process.pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise AssertionError("the local job started no task")


def _losses(out: Path):
    return [json.loads(line)["train_loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the task through /proc")
def test_a_job_runs_to_the_end_and_an_interrupted_one_requeues_to_the_same_weights(tmp_path):
    data = tiny_dataset(tmp_path / "data")
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = _submit(tmp_path, data, full, "--wait")  # runs to the end
    assert done.result() == {"status": 0, "attempt": 0, "node": 0}
    assert len(_losses(full)) == 6

    job = _submit(tmp_path, data, cut)
    task = _task_pid(job)
    deadline = time.time() + 300
    while not (cut / "checkpoint-0001.pth").exists():  # the run is in its second epoch
        assert time.time() < deadline and job.state == "RUNNING", job.stderr()
        time.sleep(0.05)
    os.kill(task, signal.SIGUSR2)  # what SLURM sends before a preemption or the time limit
    assert job.result() == {"status": 0, "attempt": 1, "node": 0}, job.stdout()
    log = job.stdout()
    assert "preempted or timed out: SIGTERM to pretrain" in log and "Requeued job" in log, log[-3000:]
    assert "--resume auto" in log.split("attempt 1")[1]
    stopped = torch.load(cut / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    assert stopped["world_size"] == 2 and 4 <= stopped["step"] < 24, stopped["step"]
    assert _losses(cut) == pytest.approx(_losses(full), abs=1e-6)
    a = torch.load(full / "checkpoint-0006.pth", map_location="cpu", weights_only=True)["model"]
    b = torch.load(cut / "checkpoint-0006.pth", map_location="cpu", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
