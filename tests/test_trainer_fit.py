"""Trainer.fit: --stop-at-step on a run already at that step trains nothing, the loader
workers end however fit ends, log.jsonl holds strict JSON and a malformed record in it
does not stop a resume."""
import json
import multiprocessing
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from training_helpers import tiny_dataset, tiny_pretrain

from revcolv2.distributed import DistInfo
from revcolv2.metrics_log import trim_log
from revcolv2.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 32 train images: 4 steps of 8 per epoch


def pretrain(data, out, *opts, extra=()):
    return tiny_pretrain(data, out, "schedule.epochs=2", *opts, extra=extra)


class _FailsAtStep2(Trainer):
    def forward_loss(self, batch):
        x, y = batch
        if self.step == 1:
            raise FloatingPointError("loss is nan at step 1")
        return ((self.model(x) - y) ** 2).mean()


class _NanEvaluation(Trainer):
    def forward_loss(self, batch):
        x, y = batch
        return ((self.model(x) - y) ** 2).mean()

    def end_of_epoch(self, epoch):
        return {"val_loss": float("nan"), "val_top1": float("inf")}


def _tiny(cls, output_dir, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    defaults = dict(effective_batch=4, micro_batch=4, epochs=2, warmup_epochs=0, num_workers=0)
    return cls(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
               dataset=TensorDataset(torch.randn(16, 4), torch.randn(16, 2)), info=DistInfo(),
               output_dir=str(output_dir), **dict(defaults, **kwargs))


def test_stop_at_step_on_a_run_resumed_at_that_step_stops_at_once(data, tmp_path, capsys):
    first = pretrain(data, tmp_path, extra=("--stop-at-step", "2"))
    assert sorted(first["history"]) == [1, 2]
    saved = (tmp_path / "checkpoint-last.pth").read_bytes()
    capsys.readouterr()
    again = pretrain(data, tmp_path, extra=("--resume", "auto", "--stop-at-step", "2"))
    assert again["history"] == {}  # not one step more
    assert "--stop-at-step 2: the run is already at step 2; nothing to train" in capsys.readouterr().out
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == saved
    past = pretrain(data, tmp_path, extra=("--resume", "auto", "--stop-at-step", "1"))
    assert past["history"] == {}


def test_loader_workers_end_when_fit_raises(tmp_path):
    """The traceback of the exception keeps fit's frames alive; the workers must end anyway
    (they ignore SIGTERM, so a leftover worker would block the process at exit)."""
    trainer = _tiny(_FailsAtStep2, tmp_path, num_workers=1)
    with pytest.raises(FloatingPointError) as e:
        trainer.fit()
    assert e.traceback  # still held while the workers are checked
    assert multiprocessing.active_children() == []
    assert trainer.history and set(trainer.history) == {1}


def test_log_jsonl_is_strict_json_when_a_metric_is_nan(tmp_path):
    _tiny(_NanEvaluation, tmp_path).fit()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} is not JSON: {line}"))
               for line in lines]
    assert [(r["epoch"], r["val_loss"], r["val_top1"]) for r in records] == [(1, None, None), (2, None, None)]


def test_a_malformed_log_record_is_skipped_with_a_warning_naming_file_and_line(data, tmp_path, capsys):
    pretrain(data, tmp_path, extra=("--stop-at-step", "6"))  # epoch 1 logged, 2 steps into epoch 2
    log = tmp_path / "log.jsonl"
    good = log.read_text().splitlines()
    log.write_text("\n".join([good[0], json.dumps({"epoch": 2, "step": "abc"}), '{"epoch": 3, "st']) + "\n")
    capsys.readouterr()
    rest = pretrain(data, tmp_path, extra=("--resume", "auto"))
    out = capsys.readouterr().out
    assert sorted(rest["history"]) == [7, 8]
    assert f"{log}: skipped 2 malformed record(s)" in out and "line(s) 2, 3" in out, out
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_trim_log_keeps_records_without_a_step_and_drops_those_past_it(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in ({"step": 4}, {"note": "x"}, {"step": 8}, {"step": True})) + "\n")
    warnings = []
    assert trim_log(str(log), 4, log=warnings.append) == 1
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 4}, {"note": "x"}]
    assert len(warnings) == 1 and str(log) in warnings[0] and "line(s) 4" in warnings[0]
    assert trim_log(str(tmp_path / "absent.jsonl"), 4) == 0 and not os.path.exists(tmp_path / "absent.jsonl")
