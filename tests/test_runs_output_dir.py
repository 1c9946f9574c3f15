"""A run never silently overwrites another: refused folders, --overwrite, --resume auto
without a pointer, the best score across runs, log.jsonl after a resume, checkpoint retention."""
import json
import os
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.run_checkpoints import prune_checkpoints, read_best
from revcolv2.run_dir import RunExistsError
from revcolv2_d2.demo import main as demo_main

PRETRAIN = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
FINETUNE = REPO / "configs" / "finetune" / "revcolv2_tiny_demo.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 4 classes x 8 train images: 4 steps per epoch


def pretrain(data, out, *opts, extra=()):
    return run_tool(
        "pretrain", "--config", PRETRAIN, "--data-path", data, "--output-dir", out, "--num-workers", "0",
        *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
        "train.batch_per_gpu=8", "train.vis_images=0", "schedule.warmup_epochs=0", "train.save_every=1", *opts,
    )


def finetune(data, out, *opts, extra=()):
    return run_tool(
        "finetune", "--config", FINETUNE, "--data-path", data, "--output-dir", out, "--num-workers", "0",
        *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
        "train.batch_per_gpu=8", "train.eval_batch=8", "ema.decay=0", *opts,
    )


def test_a_second_run_into_the_same_folder_is_refused(data, tmp_path):
    pretrain(data, tmp_path, "schedule.epochs=1")
    before = {n: (tmp_path / n).read_bytes() for n in ("checkpoint-0001.pth", "last_checkpoint", "log.jsonl")}
    with pytest.raises(RunExistsError) as e:
        pretrain(data, tmp_path, "schedule.epochs=1")
    msg = str(e.value)
    assert str(tmp_path) in msg and "--resume auto" in msg and "--output-dir" in msg and "--overwrite" in msg
    after = {n: (tmp_path / n).read_bytes() for n in before}
    assert after == before  # nothing of the first run was touched
    with pytest.raises(RunExistsError):
        finetune(data, tmp_path, "schedule.epochs=1")


def test_overwrite_starts_again_from_step_0(data, tmp_path, capsys):
    pretrain(data, tmp_path, "schedule.epochs=2", extra=("--stop-at-step", "6"))
    out = pretrain(data, tmp_path, "schedule.epochs=1", extra=("--overwrite",))
    assert sorted(out["history"]) == [1, 2, 3, 4]
    assert "--overwrite: removed" in capsys.readouterr().out
    # the old run's mid-epoch checkpoint is gone, so --resume auto cannot pick it up later
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pth")) == ["checkpoint-0001.pth"]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("pointer", ["missing", "dangling"])
@pytest.mark.slow
def test_resume_auto_finds_the_newest_checkpoint_without_a_pointer(data, tmp_path, capsys, pointer):
    pretrain(data, tmp_path, "schedule.epochs=3", extra=("--stop-at-step", "6"))  # epoch 1 + 2 steps
    if pointer == "missing":
        (tmp_path / "last_checkpoint").unlink()
    else:
        (tmp_path / "last_checkpoint").write_text("checkpoint-0099.pth")
    out = pretrain(data, tmp_path, "schedule.epochs=3", extra=("--resume", "auto"))
    assert sorted(out["history"]) == list(range(7, 13))  # from checkpoint-last.pth (step 6), not step 0
    assert "checkpoint-last.pth" in capsys.readouterr().out  # it says which file it took


def test_resume_auto_in_an_empty_folder_says_it_starts_fresh(data, tmp_path, capsys):
    out = pretrain(data, tmp_path, "schedule.epochs=1", extra=("--resume", "auto"))
    assert sorted(out["history"]) == [1, 2, 3, 4]
    assert "starting from scratch" in capsys.readouterr().out


def test_log_jsonl_drops_the_records_a_resume_repeats(data, tmp_path):
    pretrain(data, tmp_path, "schedule.epochs=2")
    # as if killed after epoch 2 was logged but before its checkpoint was written
    (tmp_path / "checkpoint-0002.pth").unlink()
    (tmp_path / "last_checkpoint").write_text("checkpoint-0001.pth")
    pretrain(data, tmp_path, "schedule.epochs=2", extra=("--resume", "auto"))
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


@pytest.mark.slow  # a 7-epoch pre-training run
def test_retention_keeps_the_last_k_and_every_m_th(data, tmp_path):
    pretrain(data, tmp_path, "schedule.epochs=7", "train.keep_last=2", "train.keep_every=3")
    kept = sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-0003.pth", "checkpoint-0006.pth", "checkpoint-0007.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0007.pth"


def test_prune_keeps_everything_when_keep_last_is_0(tmp_path):
    for e in (1, 2, 3):
        (tmp_path / f"checkpoint-{e:04d}.pth").write_bytes(b"x")
    (tmp_path / "checkpoint-best.pth").write_bytes(b"x")
    assert prune_checkpoints(str(tmp_path), 0, 0) == []
    assert prune_checkpoints(str(tmp_path), 1, 0) == ["checkpoint-0001.pth", "checkpoint-0002.pth"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0003.pth", "checkpoint-best.pth"]


def _fake_best(folder: Path, top1: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "epoch": 7, "metrics": {"top1": top1}, "config": {}}, folder / "checkpoint-best.pth")


def test_best_survives_a_rerun(data, tmp_path):
    # an earlier run left a best model that scored higher than any 1-epoch run can
    _fake_best(tmp_path, 100.5)
    out = finetune(data, tmp_path, "schedule.epochs=1")
    assert out["best"]["top1"] == 100.5
    assert torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)["metrics"]["top1"] == 100.5
    # a worse earlier best is replaced by the new run's model
    _fake_best(tmp_path / "worse", -0.5)
    out = finetune(data, tmp_path / "worse", "schedule.epochs=1")
    saved = torch.load(tmp_path / "worse" / "checkpoint-best.pth", weights_only=True)
    assert saved["metrics"]["top1"] == out["best"]["top1"] >= 0.0 and saved["model"]


def test_read_best_of_an_unreadable_file_warns(tmp_path, capsys):
    (tmp_path / "checkpoint-best.pth").write_bytes(b"not a checkpoint")
    assert read_best(str(tmp_path)) is None
    assert "checkpoint-best.pth" in capsys.readouterr().out


def test_demo_refuses_to_delete_an_earlier_run(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "last_checkpoint").write_text("model_final.pth")
    (train / "model_final.pth").write_bytes(b"weights")
    (train / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        demo_main(["--output", str(tmp_path)])
    msg = str(e.value.code)
    assert str(train) in msg and "--resume" in msg and "--output" in msg and "--overwrite" in msg
    assert sorted(os.listdir(train)) == ["last_checkpoint", "model_final.pth", "notes.txt"]
