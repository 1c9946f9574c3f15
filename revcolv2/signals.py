"""Stop signals: DataLoader workers ignore them, the main process turns them into a
checkpoint and a 128 + signal exit status."""
from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM.

    A scheduler (SLURM, Kubernetes) or Ctrl-C in a terminal signals the whole process
    group; workers that die first make the main process crash before it can write its
    checkpoint. The main process alone decides to stop; its workers end with it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint of a run stopped by a signal: exit status 128 + signal
    (130 for SIGINT, 143 for SIGTERM), so ``pretrain && finetune`` does not go on."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step
