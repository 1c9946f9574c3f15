"""The run folder: one run at a time (a lock naming the holder), no silent second run of
lazyconfig_train_net.py, checkpoint file modes that follow the umask, and one-line errors
for a full disk and a dangling symbolic link as the output folder."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES
from training_helpers import tiny_dataset, tiny_pretrain

from revcolv2.atomic_io import DiskFullError, save_atomic
from revcolv2.run_dir import (
    RunExistsError,
    RunFolderError,
    RunInUseError,
    check_output_dir,
    locked_run_dir,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 4 steps of 8 images per epoch


pretrain = tiny_pretrain


def train_net(*argv):
    """tools/lazyconfig_train_net.py in this process, up to the launch of training."""
    from revcolv2_d2.train_net import invoke_main

    return invoke_main(["--config-file", DEMO_CONFIG, *map(str, argv)])


# ----------------------------------------------------------------------------- one run at a time
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(data, tmp_path):
    with locked_run_dir(str(tmp_path)):  # a run in progress (this process holds the lock)
        with pytest.raises(RunInUseError) as e:
            pretrain(data, tmp_path)
        assert f"pid {os.getpid()}" in str(e.value) and str(tmp_path) in str(e.value)
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "log.jsonl").exists()
        with pytest.raises(RunInUseError, match=f"pid {os.getpid()}"):
            train_net(f"train.output_dir={tmp_path}", *TINY_OVERRIDES)
    assert sorted(pretrain(data, tmp_path)["history"]) == [1, 2, 3, 4]  # released: the folder is usable


@pytest.mark.slow  # a second process
def test_the_lock_names_another_process_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from revcolv2.run_dir import locked_run_dir\n"
         f"with locked_run_dir({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid} on "):
            with locked_run_dir(str(tmp_path)):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup code runs: the OS releases the lock
        holder.wait()
    with locked_run_dir(str(tmp_path)):
        assert f"pid {os.getpid()}" in (tmp_path / ".run.lock").read_text()


# ----------------------------------------------------------------------------- lazyconfig_train_net.py
def _fake_d2_run(folder):
    folder.mkdir(exist_ok=True)
    files = {"model_final.pth": b"weights", "model_0000004.pth": b"weights", "last_checkpoint": b"model_final.pth",
             "metrics.json": b'{"iteration": 4}\n', "last_eval.json": b"{}", "config.yaml": b"train: {}\n",
             "events.out.tfevents.1.host": b"tb", "notes.txt": b"mine"}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_train_net_refuses_a_folder_that_holds_a_run(tmp_path):
    files = _fake_d2_run(tmp_path)
    with pytest.raises(RunExistsError) as e:
        train_net(f"train.output_dir={tmp_path}", *TINY_OVERRIDES)
    msg = str(e.value)
    assert str(tmp_path) in msg and "--resume" in msg and "--overwrite" in msg and "train.output_dir" in msg, msg
    assert "\n" not in msg
    assert {n: (tmp_path / n).read_bytes() for n in files} == files  # config.yaml included: nothing written


def test_train_net_overwrite_deletes_the_old_runs_outputs_only(tmp_path, capsys):
    from revcolv2_d2.train_net import DETECTRON2_RUN

    _fake_d2_run(tmp_path)
    check_output_dir(str(tmp_path), resume=False, overwrite=True, layout=DETECTRON2_RUN)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "notes.txt"]
    assert "--overwrite: removed 6 file(s)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoints_follow_the_umask(tmp_path, umask):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    old = os.umask(umask)
    try:
        save_atomic({"w": torch.zeros(2)}, str(tmp_path / "a.pth"))
        RevColV2Checkpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000001")
        reference = tmp_path / "reference.pth"
        torch.save({"w": torch.zeros(2)}, reference)  # what torch.save to a path gives
    finally:
        os.umask(old)
    for name in ("a.pth", "model_0000001.pth", "last_checkpoint"):  # the pointer: written atomically too
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask == \
            stat.S_IMODE(os.stat(reference).st_mode), name


def test_exported_safetensors_follow_the_umask(tmp_path):
    import timm

    from revcolv2.export import export_to_folder

    old = os.umask(0o022)
    try:
        export_to_folder({"model": timm.create_model("revcolv2_tiny", num_classes=0, embed_dim=32,
                                                     num_heads=2).state_dict()},
                         str(tmp_path), "revcolv2_tiny", dict(embed_dim=32, num_heads=2), verbose=False)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------- one-line errors
def _full_disk_save(real_save):
    def save(obj, f, *args, **kwargs):
        with open("/dev/full", "wb") as full:  # every write: ENOSPC, as on a full disk
            real_save(obj, full, *args, **kwargs)
            full.flush()
    return save


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_is_one_line_naming_enospc_and_the_file(data, tmp_path, monkeypatch):
    pretrain(data, tmp_path)  # checkpoint-0001.pth
    before = (tmp_path / "checkpoint-0001.pth").read_bytes()
    monkeypatch.setattr(torch, "save", _full_disk_save(torch.save))
    with pytest.raises(DiskFullError) as e:
        pretrain(data, tmp_path, "schedule.epochs=2", extra=("--resume", "auto"))
    msg = str(e.value)
    assert "ENOSPC" in msg and str(tmp_path / "checkpoint-0002.pth") in msg and "\n" not in msg, msg
    assert e.value.code != 0  # a SystemExit: the tool prints the line, no traceback
    assert (tmp_path / "checkpoint-0001.pth").read_bytes() == before
    assert not (tmp_path / "checkpoint-0002.pth").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp_")]

    from revcolv2_d2.checkpoint import RevColV2Checkpointer  # lazyconfig_train_net.py's writes

    with pytest.raises(DiskFullError, match=f"ENOSPC.*{tmp_path / 'model_0000001.pth'}"):
        RevColV2Checkpointer(torch.nn.Linear(2, 2), str(tmp_path)).save("model_0000001")
    assert not (tmp_path / "model_0000001.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0001.pth"  # still the last good one


def test_a_dangling_symlink_as_output_dir_is_one_line(data, tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(RunFolderError) as e:
        pretrain(data, link)
    msg = str(e.value)
    assert f"--output-dir {link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in msg, msg
    assert e.value.code != 0 and "\n" not in msg
    with pytest.raises(RunFolderError, match=f"train.output_dir {link} is a symbolic link"):
        train_net(f"train.output_dir={link}", *TINY_OVERRIDES)


@pytest.mark.slow  # subprocesses
def test_a_second_train_net_run_is_refused_in_one_line_and_changes_nothing(tmp_path):
    from d2_helpers import TRAIN_NET, make_mini_shapes
    from d2_helpers import train_net as train_net_process

    datasets = tmp_path / "datasets"
    make_mini_shapes(str(datasets))
    out = tmp_path / "out"
    args = ["--config-file", DEMO_CONFIG, *TINY_OVERRIDES, f"train.output_dir={out}", "train.max_iter=1",
            "train.eval_period=0"]
    train_net_process(args, datasets)
    before = {n: (out / n).read_bytes() for n in ("config.yaml", "metrics.json", "model_final.pth")}
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets))
    proc = subprocess.run([sys.executable, "-W", "ignore", TRAIN_NET, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"{out} already holds a run"), proc.stderr[-3000:]
    assert {n: (out / n).read_bytes() for n in before} == before
