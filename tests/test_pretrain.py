"""tools/pretrain.py end to end on CPU: the loss goes down, and an interrupted run resumes exactly."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.trainer import ResumeError

pytestmark = pytest.mark.slow  # end to end: tools/pretrain.py runs

CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 4 classes x 8 train images, 40x40


def pretrain(data, out, *opts, extra=()):
    return run_tool(
        "pretrain", "--config", CONFIG, "--data-path", data, "--output-dir", out, *extra, "--opts",
        "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4",
        *opts,
    )


def test_tiny_pretraining_lowers_the_loss(data, tmp_path):
    # 80 steps = 20 epochs of 4 steps (batch 8 = 2 micro-batches of 4, accumulated);
    # raw-pixel target: flat synthetic patches make the normalized target mostly noise
    out = pretrain(data, tmp_path, "schedule.epochs=20", "schedule.warmup_epochs=1", "optim.base_lr=0.3",
                   "train.save_every=10", "train.vis_every=20", "train.vis_images=2", "model.norm_pix_loss=false",
                   extra=("--num-workers", "0"))
    losses = [out["history"][s] for s in sorted(out["history"])]
    assert len(losses) == 80 and out["trainer"].accum == 2
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10  # each over 10 random batches and masks
    assert last < 0.75 * first, (first, last)  # seen: 1.30 -> 0.76
    # artefacts: periodic checkpoints, the resume pointer, a reconstruction grid, logs
    assert (tmp_path / "checkpoint-0010.pth").is_file() and (tmp_path / "checkpoint-0020.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text() == "checkpoint-0020.pth"
    grid = Image.open(tmp_path / "reconstructions" / "epoch_0020.png")
    assert grid.width > grid.height  # 2 rows of original | masked | reconstruction | pasted
    assert any((tmp_path / "tb").iterdir())
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 20


def test_interrupted_run_resumes_exactly(data, tmp_path):
    # drop path on, warm-up + cosine, the stop falls in the middle of epoch 2
    opts = ("schedule.epochs=3", "schedule.warmup_epochs=1", "optim.base_lr=0.01", "model.drop_path_rate=0.1",
            "train.save_every=1", "train.vis_every=100", "train.vis_images=0")
    full = pretrain(data, tmp_path / "full", *opts, extra=("--num-workers", "0"))
    part = pretrain(data, tmp_path / "cut", *opts, extra=("--num-workers", "0", "--stop-at-step", "6"))
    assert sorted(part["history"]) == list(range(1, 7))
    assert (tmp_path / "cut" / "last_checkpoint").read_text() == "checkpoint-last.pth"
    # resumed with loader workers: the batches must not depend on them
    rest = pretrain(data, tmp_path / "cut", *opts, extra=("--num-workers", "2", "--resume", "auto"))
    assert sorted(rest["history"]) == list(range(7, 13))
    for step in range(7, 13):
        assert rest["history"][step] == pytest.approx(full["history"][step], abs=1e-6), step
    logs = [[json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
            for d in ("full", "cut")]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]  # the cut epoch 2 is logged once, with its true mean
    for a, b in zip(*logs):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    a = full["trainer"].model.state_dict()
    b = rest["trainer"].model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_refuses_a_different_batch(data, tmp_path):
    pretrain(data, tmp_path, "schedule.epochs=1", "train.vis_images=0", extra=("--num-workers", "0"))
    with pytest.raises(ResumeError, match=r"batch 8 and .* this run has batch 16 .*optim\.batch_size 8 -> 16"):
        pretrain(data, tmp_path, "schedule.epochs=2", "train.vis_images=0", "optim.batch_size=16",
                 extra=("--num-workers", "0", "--resume", "auto"))


def test_pretraining_optimizer_follows_table_1(data, tmp_path):
    out = pretrain(data, tmp_path, "schedule.epochs=1", "train.vis_images=0", extra=("--num-workers", "0"))
    trainer = out["trainer"]
    opt = trainer.optimizer
    assert type(opt).__name__ == "AdamW" and opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert "mask_token" in plain and any(n.endswith("alphas") for n in plain)
    assert all(not (n.endswith(".bias") or "norm" in n) for n in decayed)
    assert trainer.scheduler.base_values[0] == pytest.approx(1e-3 * 8 / 256)  # base_lr x batch / 256
    assert trainer.model.drop_path_rate == 0.0 and trainer.model.mask_ratio == 0.75
