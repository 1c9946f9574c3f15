"""Corrupt and partial files: every "not a checkpoint" file is an error naming it; --resume
auto falls back past a truncated newest checkpoint; leftovers of killed writes are removed."""
import errno
import os
import pickle

import pytest
import timm
import torch
from training_helpers import REPO, TINY_MODEL, dead_pid, run_tool, tiny_dataset

import revcolv2  # noqa: F401
from revcolv2.atomic_io import remove_stale_temporaries, save_atomic
from revcolv2.checkpoint import CheckpointError, load_checkpoint, load_file
from revcolv2.classification import load_pretrained
from revcolv2.run_checkpoints import find_resume_checkpoint, write_last_checkpoint
from revcolv2.synthetic_imagenet import ensure_synthetic_imagenet

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


def _truncate(path, keep: float = 0.5) -> None:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _bad_files(folder, good_pth, good_pkl):
    """name -> path of files that are not checkpoints."""
    files = {}
    for suffix in (".pth", ".pkl"):
        files[f"random{suffix}"] = folder / f"random{suffix}"
        files[f"random{suffix}"].write_bytes(os.urandom(4096))
        files[f"text{suffix}"] = folder / f"text{suffix}"
        files[f"text{suffix}"].write_text("model: not a checkpoint\n")
        files[f"empty{suffix}"] = folder / f"empty{suffix}"
        files[f"empty{suffix}"].write_bytes(b"")
        # a valid pickle of a number: what 1 in about 3000 files of random bytes also is
        files[f"number{suffix}"] = folder / f"number{suffix}"
        files[f"number{suffix}"].write_bytes(pickle.dumps(7))
    torch.save(7, folder / "number_torch.pth")
    files["number_torch.pth"] = folder / "number_torch.pth"
    for name, good in (("truncated.pth", good_pth), ("truncated.pkl", good_pkl)):
        files[name] = folder / name
        files[name].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return files


@pytest.fixture
def bad_files(tmp_path):
    model = timm.create_model("revcolv2_tiny", num_classes=2, **TINY)
    good_pth = tmp_path / "good.pth"
    save_atomic({"model": model.state_dict()}, str(good_pth))
    good_pkl = tmp_path / "good.pkl"
    with open(good_pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()}, "__author__": "t"}, f)
    assert load_file(good_pth) and load_file(good_pkl)  # both formats read when whole
    return _bad_files(tmp_path, good_pth, good_pkl)


def test_every_kind_of_bad_file_is_an_error_naming_it(bad_files):
    model = timm.create_model("revcolv2_tiny", num_classes=2, **TINY)
    for name, path in bad_files.items():
        for load in (load_file, lambda p: load_checkpoint(model, p, verbose=False),
                     lambda p: load_pretrained(model, p, verbose=False)):
            with pytest.raises(CheckpointError) as e:
                load(str(path))
            assert str(path) in str(e.value), (name, str(e.value))


def test_detectron2_checkpointer_names_the_bad_file(bad_files):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    model = torch.nn.Sequential(timm.create_model("revcolv2_tiny", num_classes=0, **TINY))
    for name, path in bad_files.items():
        with pytest.raises(CheckpointError) as e:
            RevColV2Checkpointer(model).load(str(path))
        assert str(path) in str(e.value), (name, str(e.value))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_file(tmp_path / "nothere.pth")


def _resume_point(path, step):
    save_atomic({"model": {}, "optimizer": {}, "step": step}, str(path))


def test_resume_auto_falls_back_past_a_truncated_newest_checkpoint(tmp_path, capsys):
    for step in (4, 8):
        _resume_point(tmp_path / f"checkpoint-{step // 4:04d}.pth", step)
    write_last_checkpoint(str(tmp_path), "checkpoint-0002.pth")
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-0002.pth")
    _truncate(tmp_path / "checkpoint-0002.pth")
    capsys.readouterr()
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-0001.pth")
    out = capsys.readouterr().out
    assert "checkpoint-0002.pth" in out and "skipping an unreadable checkpoint" in out


def test_resume_auto_takes_the_newest_readable_checkpoint_without_a_pointer(tmp_path, capsys):
    _resume_point(tmp_path / "checkpoint-0001.pth", 4)
    _resume_point(tmp_path / "checkpoint-last.pth", 6)
    save_atomic({"model": {}, "epoch": 9}, str(tmp_path / "checkpoint-best.pth"))  # weights only: no resume point
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    assert find_resume_checkpoint("auto", str(tmp_path / "empty")) is None
    assert "starting from scratch" in capsys.readouterr().out


def test_detectron2_resume_falls_back_past_a_truncated_newest_checkpoint(tmp_path):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    model = torch.nn.Linear(2, 2)
    ckpt = RevColV2Checkpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    ckpt.save("model_0000003", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    _truncate(tmp_path / "model_0000003.pth")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 1


def test_pretrain_resume_auto_after_a_truncated_write(tmp_path_factory, capsys):
    """tools/pretrain.py: the newest checkpoint is cut short; --resume auto continues from
    the one before, and a killed write's temporary file is removed at start."""
    data = tiny_dataset(tmp_path_factory.mktemp("data"), classes=2, train_per_class=4, val_per_class=1)
    out = tmp_path_factory.mktemp("run")
    base = ["--config", REPO / "configs/pretrain/revcolv2_tiny_demo.yaml", "--data-path", data,
            "--output-dir", out, "--num-workers", "0", "--device", "cpu"]
    opts = ["--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=4",
            "train.batch_per_gpu=4", "train.save_every=1", "train.vis_images=0", "schedule.warmup_epochs=0"]
    run_tool("pretrain", *base, *opts, "schedule.epochs=2")  # 2 steps per epoch
    _truncate(out / "checkpoint-0002.pth")
    stale = out / f".tmp_{dead_pid()}_abc.pth"
    stale.write_bytes(b"partial")
    capsys.readouterr()
    rest = run_tool("pretrain", *base, "--resume", "auto", *opts, "schedule.epochs=3")
    log = capsys.readouterr().out
    assert "checkpoint-0002.pth" in log and "resumed from" in log
    assert str(out / "checkpoint-0001.pth") in log.split("resumed from", 1)[1].splitlines()[0]
    assert sorted(rest["history"]) == [3, 4, 5, 6]  # epochs 2 and 3 again from step 2
    assert not stale.exists()


def test_stale_temporaries_are_removed_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    (tmp_path / f".tmp_{dead}_x.pth").write_bytes(b"")
    (tmp_path / ".tmp_legacyname.pth").write_bytes(b"")  # written before the pid was in the name
    live = tmp_path / f".tmp_{os.getpid()}_y.pth"
    live.write_bytes(b"")
    (tmp_path / "checkpoint-0001.pth").write_bytes(b"keep")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(os.path.basename(p) for p in removed) == sorted([f".tmp_{dead}_x.pth", ".tmp_legacyname.pth"])
    assert live.exists() and (tmp_path / "checkpoint-0001.pth").exists()


def test_small_files_are_replaced_whole_through_a_temporary_file_of_their_own(tmp_path, monkeypatch):
    from revcolv2.atomic_io import DiskFullError, write_text_atomic

    path = tmp_path / "last_checkpoint"
    path.write_text("checkpoint-0001.pth")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append(os.path.basename(src)), real_replace(src, dst)))
    write_text_atomic(str(path), "checkpoint-0002.pth")
    write_last_checkpoint(str(tmp_path), "checkpoint-0003.pth")
    assert path.read_text() == "checkpoint-0003.pth" and os.listdir(tmp_path) == ["last_checkpoint"]
    assert len(set(renamed)) == 2 and all(n.startswith(f".tmp_{os.getpid()}_") for n in renamed), renamed

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=f"ENOSPC.*{path}") as e:
        write_text_atomic(str(path), "checkpoint-0004.pth")
    assert "\n" not in str(e.value) and e.value.code != 0
    assert path.read_text() == "checkpoint-0003.pth" and os.listdir(tmp_path) == ["last_checkpoint"]


def test_killed_synthetic_generation_is_removed(tmp_path):
    root = tmp_path / "synthetic_imagenet"
    stale = tmp_path / f".tmp_synthetic_imagenet_{dead_pid()}_abcd"
    (stale / "train").mkdir(parents=True)
    legacy = tmp_path / ".tmp_synthetic_imagenetk2j3h4x"  # the name older versions used
    legacy.mkdir()
    other = tmp_path / ".tmp_something_else"
    other.mkdir()
    ensure_synthetic_imagenet(root, num_classes=2, train_per_class=1, val_per_class=1, size=16)
    assert (root / "train").is_dir()
    assert not stale.exists() and not legacy.exists() and other.exists()


def test_killed_detectron2_dataset_generation_is_removed(tmp_path):
    """The built-in detectron2 datasets are generated in ``.synthetic_shapes_<pid>_*``; what a
    killed generation left is removed at the next one, a live writer's folder is kept."""
    from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes

    stale = tmp_path / f".synthetic_shapes_{dead_pid()}_abcd"
    (stale / "train").mkdir(parents=True)
    live = tmp_path / f".synthetic_shapes_{os.getpid()}_efgh"
    live.mkdir()
    base = ensure_synthetic_shapes(str(tmp_path), splits={"train": (2, 0), "val": (1, 1)})
    assert os.path.isdir(base)
    assert not stale.exists() and live.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".synthetic_shapes_")] == [live.name]
