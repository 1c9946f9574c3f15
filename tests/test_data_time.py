"""The trainers' data time: how long each step waited for its micro-batches, on the progress
bar (``data=``, median of the last steps) and in TensorBoard (``<name>/data_time``), as
detectron2 reports its ``data_time``. A slow dataset shows up in it; a fast one does not."""
import re
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from revcolv2.distributed import DistInfo
from revcolv2.trainer import Trainer

SLEEP = 0.02  # seconds per image of the slow dataset
MICRO, ACCUM = 2, 2  # 4 images, so >= 0.08 s of waiting per step


class _Images(Dataset):
    def __init__(self, sleep: float):
        self.sleep = sleep
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        time.sleep(self.sleep)
        return self.x[i], self.y[i]


class _Regression(Trainer):
    def forward_loss(self, batch):
        x, y = batch
        return ((self.model(x) - y) ** 2).mean()


def _fit(tmp_path, sleep: float):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    trainer = _Regression(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          dataset=_Images(sleep), info=DistInfo(), output_dir=str(tmp_path),
                          effective_batch=MICRO * ACCUM, micro_batch=MICRO, epochs=1, warmup_epochs=0,
                          num_workers=0, log_every=2)
    trainer.fit()
    return trainer


def _tensorboard(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


@pytest.mark.parametrize("sleep", [SLEEP, 0.0])
def test_a_slow_dataset_shows_in_the_data_time_of_the_bar_and_tensorboard(tmp_path, capsys, sleep):
    _fit(tmp_path, sleep)
    waited = _tensorboard(tmp_path, "train/data_time")
    assert sorted(waited) == [2, 4]  # every log_every steps and at the end of the epoch
    bar = [float(v) for v in re.findall(r"data=(\d+\.\d+)s", capsys.readouterr().err)]
    assert bar, "no data= on the progress bar"
    floor = MICRO * ACCUM * SLEEP
    if sleep:  # every step waited for its 4 images
        assert all(v >= floor for v in waited.values()), waited
        assert bar[-1] >= floor
    else:  # nothing to wait for: well under one slow image
        assert all(v < SLEEP for v in waited.values()), waited
        assert bar[-1] < SLEEP
