"""Signals as schedulers send them: SIGTERM / SIGINT to the whole process group of a run with
DataLoader workers. The run writes one consistent checkpoint, exits 143 / 130, and
``--resume auto`` continues it to the same losses as an uninterrupted run. Then the pieces of
the one stop-signal policy (revcolv2/signals.py): the handlers, the workers, the agreement
of the processes, the exit statuses of training processes and launchers."""
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


# ----------------------------------------------------------------------------- the policy, piece by piece
def test_the_first_signal_is_noted_and_announced_a_second_aborts_and_the_old_handlers_come_back():
    from revcolv2.signals import StopSignals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    announced = []
    with StopSignals(announced.append) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM and announced == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert signals.signum == signal.SIGTERM and announced == [signal.SIGTERM]  # the first one counts
    assert {s: signal.getsignal(s) for s in before} == before


def test_handlers_are_set_from_the_main_thread_only():
    import threading

    from revcolv2.signals import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    errors = []

    def elsewhere():
        try:
            with StopSignals():
                assert signal.getsignal(signal.SIGTERM) is before
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert not errors and signal.getsignal(signal.SIGTERM) is before


def test_loader_workers_ignore_stop_signals():
    from revcolv2.signals import ignore_stop_signals

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ignore_stop_signals(3)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_single_process_agrees_with_itself():
    from revcolv2.signals import agree_on_signal

    assert agree_on_signal(0) == 0 and agree_on_signal(15, torch.device("cpu")) == 15


def _agree(rank, port, seen, out):
    import torch.distributed as dist

    from revcolv2.signals import agree_on_signal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save([agree_on_signal(s) for s in seen[rank]], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_every_process_stops_on_the_highest_signal_any_of_them_saw(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = [[0, 15, 0, 2], [0, 0, 2, 15]]  # rank 0 saw SIGTERM after step 1, rank 1 SIGINT after step 2
    mp.spawn(_agree, args=(port, seen, str(tmp_path / "agreed")), nprocs=2)
    agreed = [torch.load(tmp_path / f"agreed.{rank}") for rank in (0, 1)]
    assert agreed == [[0, 15, 2, 15]] * 2


def test_a_training_process_stopped_by_a_signal_exits_128_plus_the_signal():
    from revcolv2.signals import TrainingInterrupted, stop_signal_of

    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        e = TrainingInterrupted(signum, step=7)
        assert isinstance(e, SystemExit) and e.code == status and e.step == 7
        assert stop_signal_of(status) == signum
    assert [stop_signal_of(s) for s in (0, 1, 137, -15)] == [0, 0, 0, 0]


@pytest.mark.parametrize("status, exit_status, line", [
    (143, 143, "run: stopped by signal 15, saved; continue"),
    (130, 130, "run: stopped by signal 2, saved; continue"),
    (-9, 137, "run: training process 1 was killed by signal 9"),
    (1, 1, "run: training process 1 exited with status 1 (its message is above)"),
    (0, 0, "run: training process 1 exited with status 0 (its message is above)"),  # not a signal
])
def test_a_launcher_exits_like_its_training_process_with_one_line(capsys, status, exit_status, line):
    from revcolv2.signals import exit_launcher

    with pytest.raises(SystemExit) as e:
        exit_launcher("run", status, ", saved; continue", "training process 1")
    assert e.value.code == exit_status
    assert capsys.readouterr().err == line + "\n"


def test_a_launcher_names_a_training_process_by_default(capsys):
    from revcolv2.signals import exit_launcher

    with pytest.raises(SystemExit) as e:
        exit_launcher("run", -15, "")
    assert e.value.code == 143
    assert capsys.readouterr().err == "run: a training process was killed by signal 15\n"


def _failure(rank: int, exitcode: int):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="")


@pytest.mark.parametrize("raised, exit_status, line", [
    ("agent SIGTERM", 143, "torchrun: stopped by signal 15; the training processes save checkpoint-last.pth before "
                           "they exit (see their last lines): continue with --resume auto"),
    ("agent SIGINT", 130, "torchrun: stopped by signal 2; the training processes save checkpoint-last.pth before "
                          "they exit (see their last lines): continue with --resume auto"),
    ((143, 143), 143, "torchrun: stopped by signal 15 to the training processes; the training processes save "
                      "checkpoint-last.pth before they exit (see their last lines): continue with --resume auto"),
    ((130,), 130, "torchrun: stopped by signal 2 to the training processes; the training processes save "
                  "checkpoint-last.pth before they exit (see their last lines): continue with --resume auto"),
    ((143, 1), "ChildFailedError", ""),  # a crash among the stopped processes: torchrun's own report
    ((1,), "ChildFailedError", ""),
    ((137,), "ChildFailedError", ""),
    (None, None, ""),
])
def test_torchrun_launcher_turns_stops_into_128_plus_the_signal(monkeypatch, capsys, raised, exit_status, line):
    """revcolv2.cli.torchrun in process (the subprocess runs are test_exit_codes.py and
    test_stop_under_launchers.py): torchrun's own argv; a stopped agent or processes that all
    ended stopped by the same signal exit 128 + signal with one line; any other failure is
    torchrun's ChildFailedError; success returns."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from revcolv2.cli import torchrun

    calls = []

    def fake_torchrun(argv):
        calls.append(argv)
        if isinstance(raised, str):
            raise SignalException("stopped", signal.SIGTERM if raised.endswith("SIGTERM") else signal.SIGINT)
        if raised is not None:
            raise ChildFailedError("train.py", {rank: _failure(rank, code) for rank, code in enumerate(raised)})

    monkeypatch.setattr(torchrun, "torchrun", fake_torchrun)
    argv = ["--nproc_per_node", "2", "tools/pretrain.py", "--config", "x.yaml"]
    if exit_status is None:
        assert torchrun.main(argv) is None
    elif exit_status == "ChildFailedError":
        with pytest.raises(ChildFailedError) as e:
            torchrun.main(argv)
        assert sorted(f.exitcode for f in e.value.failures.values()) == sorted(raised)
    else:
        with pytest.raises(SystemExit) as e:
            torchrun.main(argv)
        assert e.value.code == exit_status
    assert calls == [argv]
    assert capsys.readouterr().err == (line + "\n" if line else "")
