"""The job that ``tools/submit.py`` runs on a SLURM cluster (or on this machine), through
submitit: one task per node, which starts the training tool as its child process and
carries it through preemption and time-outs.

- **Ranks and rendezvous from the job.** :class:`ToolJob` reads submitit's
  ``JobEnvironment`` (node index, node count, the first node's host name, the job id) and
  starts, on every node, the project's launcher with them: ``tools/torchrun.py --nnodes N
  --node_rank R --master_addr HOST0 --master_port P --nproc_per_node G`` for
  ``pretrain.py`` / ``finetune.py`` / ``linear_probe.py``, and ``lazyconfig_train_net.py
  --num-machines N --machine-rank R --num-gpus G --dist-url tcp://HOST0:P``. One node needs
  no address (``--standalone`` / ``--dist-url auto``).
- **Preemption and time-outs.** SLURM sends ``SIGUSR2`` ``--signal-delay-s`` seconds
  before it ends the job (submitit's ``--signal=USR2@S``); submitit's handler in the first
  task calls :meth:`ToolJob.checkpoint`. That forwards the stop as ``SIGTERM`` to the tool
  (the stop-signal policy of :mod:`revcolv2.signals`: the processes agree on a step, write
  ``checkpoint-last.pth`` / ``model_<iter>.pth`` and exit 143), waits until they have
  exited, and returns the same job with the tool's resume option (``--resume auto``,
  detectron2's ``--resume``; ``--overwrite`` dropped); submitit then requeues it. The tool
  itself ignores ``SIGUSR2`` (SLURM may signal every process of the step), so it hears
  the stop once, as ``SIGTERM``. A job that SLURM requeues on its own (a preemption that
  sends ``SIGTERM`` to every process: they save and exit 143 the same way) also
  continues with the resume option (``SLURM_RESTART_COUNT``).
- **The guarantee** is the entry point's: a resumed run goes on from the saved step
  exactly (the classification tools) or from the saved iteration (detectron2); nothing is
  lost but the steps of the signal's own step.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from .signals import stop_signal_of

REPO = Path(__file__).resolve().parents[1]
DETECTRON2_TOOL = "lazyconfig_train_net"
TOOLS = ("pretrain", "finetune", "linear_probe", DETECTRON2_TOOL)
# what the job sets on the tool's command line itself, from the job's environment
JOB_OPTIONS = {DETECTRON2_TOOL: ("--num-gpus", "--num-machines", "--machine-rank", "--dist-url")}
STOP_TIMEOUT_S = 1800  # the most a stopping tool is waited for (SLURM's kill comes first)
REQUEUE_GRACE_S = 120  # a task other than the first waits this long to be requeued with the job


def tool_name(name: str) -> str:
    """``pretrain``, ``pretrain.py`` or ``tools/pretrain.py`` -> ``pretrain``; else a one-line error."""
    key = Path(name).name
    key = key[:-3] if key.endswith(".py") else key
    if key not in TOOLS:
        raise SystemExit(f"submit: {name!r} is not a training tool; choose one of {', '.join(TOOLS)}")
    return key


def _option_value(argv: Sequence[str], option: str) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == option and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(option + "="):
            return a.split("=", 1)[1]
    return None


def _without(argv: Sequence[str], option: str, takes_value: bool) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = takes_value
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def resume_argv(tool: str, argv: Sequence[str]) -> List[str]:
    """The tool's arguments for a requeued run: its resume option (``--resume auto`` for
    the classification tools, detectron2's ``--resume``) instead of ``--resume PATH`` and
    without ``--overwrite``, which would delete what the interrupted run saved."""
    argv = _without(argv, "--overwrite", takes_value=False)
    if tool == DETECTRON2_TOOL:
        return ["--resume", *_without(argv, "--resume", takes_value=False)]
    return [*_without(argv, "--resume", takes_value=True), "--resume", "auto"]


def rendezvous_port(job_id: str, port: Optional[int] = None) -> int:
    """``port``, else ``$MASTER_PORT``, else one derived from the job id (the same on every
    node of the job, and again after a requeue)."""
    if port:
        return int(port)
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    return 20000 + zlib.crc32(str(job_id).encode()) % 40000


def _ignore_preemption_signal() -> None:  # runs in the child, before it starts the tool
    signal.signal(submitit.JobEnvironment._usr_sig(), signal.SIG_IGN)


class ToolJob(Checkpointable):
    """One task per node: start the tool (through its launcher) with the job's ranks, wait
    for it, and on submitit's preemption / time-out call stop it with a checkpoint and
    requeue (:meth:`checkpoint`). ``attempt`` counts the requeues so far."""

    def __init__(self, tool: str, argv: Sequence[str], gpus_per_node: int, workdir: str,
                 port: Optional[int] = None, attempt: int = 0):
        self.tool, self.argv = tool_name(tool), list(argv)
        self.gpus_per_node, self.workdir = int(gpus_per_node), str(workdir)
        self.port, self.attempt = port, int(attempt)
        taken = [o for o in JOB_OPTIONS.get(self.tool, ()) if _option_value(self.argv, o) is not None
                 or o in self.argv]
        if taken:
            raise SystemExit(f"submit: {', '.join(taken)} come from the job (--nodes, --gpus-per-node); "
                             f"leave them out of the {self.tool} arguments")
        self._child: Optional[subprocess.Popen] = None
        self._exited = threading.Event()

    # ----------------------------------------------------------------- the command
    def resuming(self) -> bool:
        """A requeued run: requeued by :meth:`checkpoint`, or by SLURM itself."""
        return self.attempt > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0

    def tool_argv(self) -> List[str]:
        return resume_argv(self.tool, self.argv) if self.resuming() else list(self.argv)

    def command(self, env: Any) -> List[str]:
        """The node's command line: the launcher with the job's node count, this node's
        index and the first node as the rendezvous point, then the tool's arguments."""
        nodes, node = int(env.num_nodes), int(env.node)
        host0 = env.hostnames[0]
        script = str(REPO / "tools" / f"{self.tool}.py")
        if self.tool == DETECTRON2_TOOL:
            url = "auto" if nodes == 1 else f"tcp://{host0}:{rendezvous_port(env.job_id, self.port)}"
            return [sys.executable, script, "--num-gpus", str(self.gpus_per_node), "--num-machines", str(nodes),
                    "--machine-rank", str(node), "--dist-url", url, *self.tool_argv()]
        if nodes == 1:
            rdzv = ["--standalone"]
        else:
            rdzv = ["--nnodes", str(nodes), "--node_rank", str(node), "--master_addr", host0,
                    "--master_port", str(rendezvous_port(env.job_id, self.port))]
        return [sys.executable, str(REPO / "tools" / "torchrun.py"), *rdzv, "--nproc_per_node",
                str(self.gpus_per_node), script, *self.tool_argv()]

    # ----------------------------------------------------------------- running it
    def __call__(self) -> Dict[str, Any]:
        env = submitit.JobEnvironment()
        cmd = self.command(env)
        print(f"submit: attempt {self.attempt}, node {env.node} of {env.num_nodes} ({env.hostname}): "
              f"{shlex.join(cmd)}", flush=True)
        # its own process group: a stop reaches the tool's processes, not this one
        self._child = subprocess.Popen(cmd, cwd=self.workdir, preexec_fn=_ignore_preemption_signal,
                                       start_new_session=True)
        self._exited = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()
        try:
            while not self._exited.wait(1.0):  # interruptible: submitit's signal handler runs here
                pass
        finally:
            if not self._exited.is_set():  # this task is being ended: the tool saves first
                self._stop_tool("this task is ending")
        status = self._child.returncode
        if status == 0:
            return {"status": 0, "attempt": self.attempt, "node": int(env.node)}
        signum = stop_signal_of(status)
        if signum:
            if int(env.global_rank) != 0:  # the first task requeues the job, which ends this one
                time.sleep(REQUEUE_GRACE_S)
            raise RuntimeError(f"{self.tool} stopped by signal {signum} after saving a checkpoint; a requeued "
                               f"job continues from it (with {resume_argv(self.tool, [])[0]})")
        raise RuntimeError(f"{self.tool} exited with status {status} (its output is above)")

    def _reap(self) -> None:
        self._child.wait()
        self._exited.set()

    def _stop_tool(self, why: str) -> None:
        """``SIGTERM`` to the tool (a stop after the current step, with a checkpoint), then
        wait for it to exit. The classification tools' launcher passes it to its training
        processes; detectron2's waits for its processes to get it themselves, so there the
        whole process group gets it."""
        if self._child is None or self._exited.is_set():
            return
        print(f"submit: {why}: SIGTERM to {self.tool}, waiting for its checkpoint", flush=True)
        try:
            if self.tool == DETECTRON2_TOOL:
                os.killpg(self._child.pid, signal.SIGTERM)
            else:
                self._child.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self._exited.wait(STOP_TIMEOUT_S):
            print(f"submit: {self.tool} did not stop within {STOP_TIMEOUT_S} s; killing it", flush=True)
            os.killpg(self._child.pid, signal.SIGKILL)
            self._exited.wait(60)

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """submitit's preemption / time-out handler (first task): stop the tool with a
        checkpoint, then hand submitit this job with the tool's resume option to requeue."""
        self._stop_tool("preempted or timed out")
        return DelayedSubmission(self.requeued())

    def requeued(self) -> "ToolJob":
        return ToolJob(self.tool, self.argv, self.gpus_per_node, self.workdir, self.port, self.attempt + 1)

    # ----------------------------------------------------------------- pickling (submitit)
    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_child"], state["_exited"] = None, None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._exited = threading.Event()
