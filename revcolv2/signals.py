"""Stop signals: the one policy of every training entry point (the classification
:class:`~revcolv2.trainer.Trainer`, ``tools/lazyconfig_train_net.py`` and its launcher,
``tools/torchrun.py``).

- DataLoader workers ignore SIGINT / SIGTERM (:func:`ignore_stop_signals`): the main
  process alone decides to stop, and its workers feed it until it has saved.
- In the main process (:class:`StopSignals`) the first SIGINT / SIGTERM requests a stop
  after the current step, a second raises ``KeyboardInterrupt`` (abort without saving);
  the previous handlers come back however training ends.
- The processes of a distributed run agree on the stop (:func:`agree_on_signal`), so they
  all stop after the same step and one consistent checkpoint is written.
- A run stopped by a signal exits 128 + signal (:class:`TrainingInterrupted`), and a
  launcher exits with its training processes' status and one line
  (:func:`exit_launcher`).
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Callable, Dict, NoReturn, Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_STATUSES = tuple(128 + s for s in STOP_SIGNALS)  # 130, 143: how a stopped training process exits


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT / SIGTERM.

    A scheduler (SLURM, Kubernetes) or Ctrl-C in a terminal signals the whole process
    group; workers that die first make the main process crash before it can write its
    checkpoint. The main process alone decides to stop; its workers end with it.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopSignals:
    """The SIGINT / SIGTERM handlers of a training process (or of a launcher that waits for
    its training processes): the first signal is kept in :attr:`signum` and passed to
    ``announce``; a second raises ``KeyboardInterrupt``, to abort without saving.

    :meth:`install` sets the handlers (from the main thread only: Python delivers signals
    there, and elsewhere a handler cannot be set), :meth:`restore` puts the previous ones
    back; as a context manager it does both, however the block ends.
    """

    def __init__(self, announce: Callable[[int], None] = lambda signum: None):
        self.announce = announce
        self.signum = 0  # the first stop signal, once one arrived
        self._previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: give up at once
            raise KeyboardInterrupt
        self.signum = int(signum)
        self.announce(self.signum)

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def agree_on_signal(signum: int, device: Optional[torch.device] = None) -> int:
    """The highest stop-signal number any process saw (0: none), on every process of the
    default ``torch.distributed`` group: an all-reduce (MAX), so a signal seen by one process
    stops all of them after the same step, and each knows which signal it was. ``signum``
    itself without a group of several processes. ``device`` holds the reduced number: a
    CUDA device under NCCL (by default the current one there, the CPU under gloo)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return signum
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([float(signum)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint of a run stopped by a signal: exit status 128 + signal
    (130 for SIGINT, 143 for SIGTERM), so ``pretrain && finetune`` does not go on."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


def stop_signal_of(status: int) -> int:
    """The stop signal that a training process's exit ``status`` reports (130: SIGINT, 143:
    SIGTERM, see :class:`TrainingInterrupted`), else 0."""
    return status - 128 if status in STOP_STATUSES else 0


def exit_launcher(prog: str, status: int, stopped: str, process: str = "a training process") -> NoReturn:
    """End launcher ``prog`` like the training ``process`` that ended with ``status``, with
    one line (:func:`end_launcher`):

    - 128 + a stop signal: that status, ``stopped by signal N<stopped>`` (``stopped`` says
      where the checkpoint is and how to continue);
    - negative (the process was killed by signal N): 128 + N, ``... was killed by signal N``;
    - any other: that status, ``... exited with status N (its message is above)``.
    """
    signum = stop_signal_of(status)
    if signum:
        end_launcher(prog, status, f"stopped by signal {signum}{stopped}")
    if status < 0:
        end_launcher(prog, 128 - status, f"{process} was killed by signal {-status}")
    end_launcher(prog, status, f"{process} exited with status {status} (its message is above)")


def end_launcher(prog: str, status: int, line: str) -> NoReturn:
    """Exit with ``status`` after ``<prog>: <line>`` on stderr: no traceback."""
    print(f"{prog}: {line}", file=sys.stderr, flush=True)
    raise SystemExit(status) from None
