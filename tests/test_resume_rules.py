"""What a resume continues from and what it follows: ``--resume auto`` (and detectron2's
``--resume``) take the checkpoint ``last_checkpoint`` names, not the highest step; a resumed
run follows the schedule of its config (epochs, warm-up, learning rates), refuses in one line
what it cannot follow (another batch, fewer epochs than done), and a checkpoint of another
model size is one line naming the file and the tensor."""
import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.atomic_io import save_atomic
from revcolv2.distributed import DistInfo
from revcolv2.run_checkpoints import find_resume_checkpoint, write_last_checkpoint
from revcolv2.trainer import Trainer

try:  # the error of a resume that cannot follow the config (issue 30)
    from revcolv2.trainer import ResumeError
except ImportError:  # the code before it: nothing to catch
    class ResumeError(SystemExit):
        pass

PRETRAIN = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"


def _resume_point(path, step):
    save_atomic({"model": {}, "optimizer": {}, "step": step}, str(path))


# ----------------------------------------------------------------------------- which checkpoint
def test_resume_auto_follows_the_pointer_after_a_rollback(tmp_path, capsys):
    """A run rolled back to epoch 2 (``--resume checkpoint-0002.pth``) and stopped mid-epoch 3
    points at its checkpoint-last.pth; the abandoned branch's checkpoint-0004.pth has the
    higher step but is not what the run continues."""
    for epoch in (2, 3, 4):
        _resume_point(tmp_path / f"checkpoint-{epoch:04d}.pth", 4 * epoch)
    _resume_point(tmp_path / "checkpoint-last.pth", 10)  # the redone work: epoch 3, step 10
    write_last_checkpoint(str(tmp_path), "checkpoint-last.pth")
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-last.pth")
    assert "not from" not in capsys.readouterr().out


def test_resume_auto_without_a_usable_pointer_takes_the_highest_step_and_says_so(tmp_path, capsys):
    for epoch in (1, 2):
        _resume_point(tmp_path / f"checkpoint-{epoch:04d}.pth", 4 * epoch)
    write_last_checkpoint(str(tmp_path), "checkpoint-last.pth")  # names a file that is not there
    assert find_resume_checkpoint("auto", str(tmp_path)) == str(tmp_path / "checkpoint-0002.pth")
    out = capsys.readouterr().out
    assert "checkpoint-last.pth, which does not exist" in out and "checkpoint-0002.pth" in out


def test_detectron2_resume_follows_the_pointer(tmp_path):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    ckpt = RevColV2Checkpointer(torch.nn.Linear(2, 2), str(tmp_path))
    for iteration in (2, 4):
        ckpt.save(f"model_{iteration:07d}", iteration=iteration)
    ckpt.tag_last_checkpoint("model_0000002.pth")  # rolled back to iteration 2
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000002.pth")
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 2


# ----------------------------------------------------------------------------- the schedule a resume follows
class _RecordsLr(Trainer):
    """A tiny regression that records the lr each update used."""

    def forward_loss(self, batch):
        self.lrs[self.step] = self.optimizer.param_groups[0]["lr"]
        x, y = batch
        return ((self.model(x) - y) ** 2).mean()


def _tiny(output_dir, lr=0.1, epochs=2, warmup_epochs=0.0, min_lr=0.0, batch=4, width=2, weight_decay=0.0):
    """16 samples, batch 4: 4 steps per epoch. The config records what the recipe would."""
    torch.manual_seed(0)
    model = nn.Linear(4, width)
    config = {"model": {"width": width}, "optim": {"base_lr": lr, "batch_size": batch, "weight_decay": weight_decay},
              "schedule": {"epochs": epochs, "warmup_epochs": warmup_epochs, "min_lr": min_lr}}
    trainer = _RecordsLr(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay),
                         dataset=TensorDataset(torch.randn(16, 4), torch.randn(16, width)), info=DistInfo(),
                         output_dir=str(output_dir), effective_batch=batch, micro_batch=batch, epochs=epochs,
                         warmup_epochs=warmup_epochs, min_lr=min_lr, num_workers=0, config=config)
    trainer.lrs = {}
    return trainer


CHANGES = {  # key changed on resume -> the _tiny argument
    "schedule.epochs": dict(epochs=4),
    "optim.base_lr": dict(lr=0.3),
    "schedule.min_lr": dict(min_lr=0.02),
    "schedule.warmup_epochs": dict(warmup_epochs=1.0),
    "optim.weight_decay": dict(weight_decay=0.5),
}


@pytest.mark.slow  # 15 short runs (the case, epochs added, is a unit test below)
@pytest.mark.parametrize("key", sorted(CHANGES))
def test_a_resumed_run_follows_the_changed_schedule_from_its_step(tmp_path, capsys, key):
    """Stopped at step 6 of 8, resumed with one setting changed: every later update uses the
    lr (and weight decay) of a run started with the new setting, at the same step."""
    _tiny(tmp_path / "run").fit(stop_at_step=6)
    capsys.readouterr()
    resumed = _tiny(tmp_path / "run", **CHANGES[key])
    resumed.resume(str(tmp_path / "run" / "checkpoint-last.pth"))
    resumed.fit()
    out = capsys.readouterr().out
    fresh = _tiny(tmp_path / "fresh", **CHANGES[key])
    fresh.fit()
    steps = sorted(resumed.lrs)
    assert steps[0] == 6 and steps[-1] == fresh.step - 1
    assert [resumed.lrs[s] for s in steps] == pytest.approx([fresh.lrs[s] for s in steps], rel=1e-12, abs=1e-15)
    assert resumed.optimizer.param_groups[0]["weight_decay"] == fresh.optimizer.param_groups[0]["weight_decay"]
    assert key in out and "follows the new values" in out, out


def test_adding_epochs_to_a_finished_run_trains_them_at_the_lr_of_the_longer_schedule(tmp_path, capsys):
    """The issue's case: a finished 2-epoch run resumed with 4 epochs trains epochs 3-4 on
    the 4-epoch cosine (its second half), not at the exhausted schedule's lr 0."""
    _tiny(tmp_path / "run").fit()
    resumed = _tiny(tmp_path / "run", epochs=4)
    resumed.resume(str(tmp_path / "run" / "checkpoint-0002.pth"))
    resumed.fit()
    assert sorted(resumed.lrs) == list(range(8, 16))
    assert all(lr > 0 for lr in resumed.lrs.values())
    assert resumed.lrs[8] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert "schedule.epochs 2 -> 4" in capsys.readouterr().out


def test_an_unchanged_resume_says_nothing_about_changes(tmp_path, capsys):
    _tiny(tmp_path / "run").fit(stop_at_step=3)
    capsys.readouterr()
    resumed = _tiny(tmp_path / "run")
    resumed.resume(str(tmp_path / "run" / "checkpoint-last.pth"))
    out = capsys.readouterr().out
    assert "changed config" not in out and "resumed from" in out, out


def test_another_batch_size_is_refused_in_one_line_naming_the_key(tmp_path):
    _tiny(tmp_path / "run").fit(stop_at_step=3)
    resumed = _tiny(tmp_path / "run", batch=8)
    before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with pytest.raises(ResumeError) as e:
        resumed.resume(str(tmp_path / "run" / "checkpoint-last.pth"))
    msg = str(e.value)
    assert "optim.batch_size 4 -> 8" in msg and "checkpoint-last.pth" in msg and "\n" not in msg, msg
    assert all(torch.equal(before[k], v) for k, v in resumed.model.state_dict().items())  # nothing loaded


def test_fewer_epochs_than_the_run_has_done_are_refused(tmp_path):
    _tiny(tmp_path / "run", epochs=3).fit(stop_at_step=9)  # into epoch 3
    with pytest.raises(ResumeError) as e:
        _tiny(tmp_path / "run", epochs=2).resume(str(tmp_path / "run" / "checkpoint-last.pth"))
    assert "step 9" in str(e.value) and "schedule.epochs 3 -> 2" in str(e.value) and "at least 3 epochs" in str(e.value)


# ----------------------------------------------------------------------------- another model size
def test_a_checkpoint_of_another_model_size_is_one_line_naming_file_and_tensor(tmp_path):
    _tiny(tmp_path / "run").fit(stop_at_step=1)
    path = str(tmp_path / "run" / "checkpoint-last.pth")
    with pytest.raises(ResumeError) as e:
        _tiny(tmp_path / "run", width=3).resume(path)
    msg = str(e.value)
    assert path in msg and "'weight'" in msg and "(2, 4)" in msg and "(3, 4)" in msg and "\n" not in msg, msg
    assert "model.width" in msg  # the recipe saved in the checkpoint says what differs


def test_a_checkpoint_with_other_tensors_is_one_line_naming_the_first(tmp_path):
    _tiny(tmp_path / "run").fit(stop_at_step=1)
    trainer = _tiny(tmp_path / "run")
    trainer.model = nn.Sequential(nn.Linear(4, 2))  # names "0.weight", "0.bias"
    with pytest.raises(ResumeError, match=r"checkpoint-last\.pth.*'0\.weight'"):
        trainer.resume(str(tmp_path / "run" / "checkpoint-last.pth"))


@pytest.mark.slow  # two pre-training runs
def test_pretrain_resume_with_another_width_is_one_line(tmp_path):
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)
    common = ["--config", PRETRAIN, "--data-path", data, "--output-dir", tmp_path / "run", "--num-workers", "0"]
    opts = ["data.input_size=32", "optim.batch_size=8", "train.batch_per_gpu=8", "train.vis_images=0",
            "schedule.warmup_epochs=0", "schedule.epochs=2"]
    run_tool("pretrain", *common, "--stop-at-step", "1", "--opts", f"model.kwargs={TINY_MODEL}", *opts)
    with pytest.raises(SystemExit) as e:
        run_tool("pretrain", *common, "--resume", "auto", "--opts",
                 "model.kwargs={embed_dim: 16, num_heads: 2, patch_size: 8}", *opts)
    msg = str(e.value)
    assert "checkpoint-last.pth" in msg and "checkpoint tensor '" in msg and "\n" not in msg, msg
    assert "model.kwargs" in msg


@pytest.mark.slow  # two pre-training runs
def test_pretrain_extended_with_more_epochs_trains_them_with_a_positive_lr(tmp_path, capsys):
    """The issue's command: ``--resume auto --opts schedule.epochs=4`` on a finished 2-epoch run."""
    data = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=1)  # 1 step an epoch
    common = ["--config", PRETRAIN, "--data-path", data, "--output-dir", tmp_path / "run", "--num-workers", "0"]
    opts = [f"model.kwargs={TINY_MODEL}", "data.input_size=32", "optim.batch_size=8", "train.batch_per_gpu=8",
            "train.vis_images=0", "schedule.warmup_epochs=0", "schedule.min_lr=0"]
    run_tool("pretrain", *common, "--opts", *opts, "schedule.epochs=2")
    capsys.readouterr()
    out = run_tool("pretrain", *common, "--resume", "auto", "--opts", *opts, "schedule.epochs=4")
    assert sorted(out["history"]) == [3, 4]
    trainer = out["trainer"]
    lrs = [trainer.scheduler._get_lr(t)[0] for t in (2, 3)]  # the lr of updates 3 and 4
    assert all(lr > 0 for lr in lrs), lrs
    assert "schedule.epochs 2 -> 4" in capsys.readouterr().out


# ----------------------------------------------------------------------------- detectron2
@pytest.mark.slow  # three short detectron2 runs in this process
def test_detectron2_resume_follows_a_changed_lr_and_refuses_a_shorter_max_iter(tmp_path, monkeypatch):
    from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES, make_mini_shapes

    from revcolv2_d2.train_net import invoke_main

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    make_mini_shapes(str(tmp_path / "datasets"))
    out = tmp_path / "out"
    common = ["--config-file", DEMO_CONFIG, *TINY_OVERRIDES, f"train.output_dir={out}", "train.eval_period=0",
              "train.log_period=1"]
    invoke_main([*common, "train.max_iter=2"])
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("detectron2").addHandler(handler)  # detectron2's logger does not propagate
    try:
        invoke_main(["--resume", *common, "train.max_iter=4", "optimizer.lr=0.0123"])
    finally:
        logging.getLogger("detectron2").removeHandler(handler)
    lrs = {r["iteration"]: r["lr"] for r in map(json.loads, (out / "metrics.json").read_text().splitlines())
           if "lr" in r}
    # iterations 2 and 3 of 4 are past the warm-up (10 %) and before the first step (8/9): multiplier 1
    assert lrs[2] == pytest.approx(0.0123) and lrs[3] == pytest.approx(0.0123), lrs
    assert any("optimizer config: lr" in m and "-> 0.0123" in m for m in messages), messages
    with pytest.raises(SystemExit, match=r"iteration 4, past train\.max_iter=3"):
        invoke_main(["--resume", *common, "train.max_iter=3"])
