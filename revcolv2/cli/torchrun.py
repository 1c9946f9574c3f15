"""``torchrun`` for the classification tools, with the exit status of a stopped run.

    python tools/torchrun.py --nproc_per_node 8 tools/pretrain.py --config ... [torchrun's options, then the tool's]

The same launcher as ``torchrun`` (PyTorch's elastic agent, every option of it), with one
difference. On SIGTERM / SIGINT the agent passes the signal to its training processes,
which agree on a step, save ``checkpoint-last.pth`` and exit 128 + signal; ``torchrun``
itself then exits 1 with a ``SignalException`` traceback, so a scheduler or
``pretrain && finetune`` cannot tell a stopped run from a crash. Here the launcher exits
143 (SIGTERM) or 130 (SIGINT) with one line, as a single-process run does.

The agent gives its processes ``--shutdown_timeout`` seconds (30 by default) to save
before it kills them: raise it when a checkpoint takes longer to write.
"""
from __future__ import annotations

from typing import List, Optional

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from ..signals import end_launcher, exit_launcher, stop_signal_of

# what the launcher's one line adds after "stopped by signal N"
_STOPPED = ("; the training processes save checkpoint-last.pth before they exit (see their last lines): "
            "continue with --resume auto")


def main(argv: Optional[List[str]] = None) -> None:
    try:
        torchrun(argv)
    except SignalException as e:  # the agent itself was signalled
        end_launcher("torchrun", 128 + int(e.sigval), f"stopped by signal {int(e.sigval)}{_STOPPED}")
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if len(codes) == 1 and stop_signal_of(next(iter(codes))):  # the processes were signalled, not the agent
            exit_launcher("torchrun", codes.pop(), " to the training processes" + _STOPPED)
        raise


if __name__ == "__main__":
    main()
