"""Launch a training tool on a SLURM cluster through submitit: N nodes x G GPUs, with
requeue on preemption and time-out.

    python tools/submit.py --nodes 8 --gpus-per-node 8 --partition learn --time 72:00:00 \\
        pretrain --config configs/pretrain/revcolv2_base.yaml --data-path /data/imagenet
    python tools/submit.py --nodes 2 --gpus-per-node 8 --partition learn --time 48:00:00 \\
        lazyconfig_train_net --config-file projects/RevColV2/configs/COCO/mask_rcnn_revcolv2_b_50ep.py \\
        train.init_checkpoint=output/pretrain/revcolv2_base/checkpoint-1600.pth

The options before the tool's name are this script's (the job's resources); everything
after it is the tool's own command line, passed through. The job runs one task per node;
each starts the tool through its launcher with the job's ranks (``tools/torchrun.py`` for
pretrain / finetune / linear_probe, detectron2's launch for lazyconfig_train_net). Before
SLURM ends the job (preemption, or ``--signal-delay-s`` before the time limit), the tool
stops with a checkpoint, and the job requeues itself and continues with the tool's resume
option (``docs/OPERATIONS.md``, "Clusters"). The job's output is in
``--log-dir``/<job id>_<task>_log.out and .err; the tool writes its run folder as always.
``--cluster local`` runs the same job on this machine (submitit's local executor).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
from typing import Any, Dict, List, Optional

from ..cluster import TOOLS, ToolJob, tool_name
from ..config import nonneg_int, positive_int

DEFAULT_TIME = "72:00:00"


def slurm_minutes(text: str) -> int:
    """A SLURM time limit in minutes: ``MM``, ``HH:MM:SS``, ``MM:SS``, ``D-HH``, ``D-HH:MM``
    or ``D-HH:MM:SS`` (sbatch's formats; seconds round up)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a SLURM time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
    elif c is not None:
        hours, minutes, seconds = int(a), int(b), int(c)
    elif b is not None:
        hours, minutes, seconds = 0, int(a), int(b)
    else:
        hours, minutes, seconds = 0, int(a), 0
    total = int(days or 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the time limit must be positive")
    return total


def _key_value(text: str) -> tuple:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: write KEY=VALUE (an sbatch option without its dashes)")
    key, value = text.split("=", 1)
    return key.strip().lstrip("-"), value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/submit.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8,
                   help="GPUs per node, one training process each (default 8); --cluster local on a machine "
                        "without CUDA: CPU processes")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", type=slurm_minutes, default=slurm_minutes(DEFAULT_TIME), metavar="TIME",
                   help=f"time limit: minutes, HH:MM:SS or D-HH:MM:SS (default {DEFAULT_TIME}); the job "
                        "requeues itself when it runs out")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--qos", default=None, help="SLURM quality of service")
    p.add_argument("--constraint", default=None, help="SLURM node features, e.g. h100")
    p.add_argument("--exclude", default=None, help="nodes to leave out, e.g. node[01-03]")
    p.add_argument("--comment", default=None, help="SLURM comment")
    p.add_argument("--cpus-per-gpu", type=positive_int, default=10,
                   help="CPU cores per GPU (default 10), for the loader workers: the task gets G times this")
    p.add_argument("--mem-gb", type=positive_int, default=None, help="memory per node in GB (default: the "
                   "partition's)")
    p.add_argument("--job-name", default=None, help="default: revcolv2-<tool>")
    p.add_argument("--signal-delay-s", type=positive_int, default=120,
                   help="seconds between the stop signal and the end of the job, for the checkpoint (default 120)")
    p.add_argument("--max-requeues", type=nonneg_int, default=3,
                   help="how many times a job that reached its time limit is requeued (default 3; preemptions "
                        "do not count)")
    p.add_argument("--port", type=positive_int, default=None,
                   help="rendezvous port on the first node of a multi-node job (default: from the job id)")
    p.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                   help="a shell command run before the job starts, e.g. 'module load cuda/12.4' (repeatable)")
    p.add_argument("--slurm-arg", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg mail-type=END (repeatable)")
    p.add_argument("--log-dir", default=os.path.join("output", "submitit"),
                   help="where the job's logs and submitit's files go (default output/submitit)")
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm (default), or local: this machine, through submitit's local executor")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 1 if it failed")
    p.add_argument("tool", metavar="TOOL", help=f"the training tool: {', '.join(TOOLS)}")
    p.add_argument("tool_args", nargs=argparse.REMAINDER, metavar="...", help="the tool's own arguments")
    return p


def slurm_parameters(args: argparse.Namespace, tool: str) -> Dict[str, Any]:
    """submitit's parameters for the job (AutoExecutor names; ``slurm_*`` only reach sbatch)."""
    params: Dict[str, Any] = dict(
        name=args.job_name or f"revcolv2-{tool}", timeout_min=args.time, nodes=args.nodes, tasks_per_node=1,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_gpu * args.gpus_per_node,
        slurm_signal_delay_s=args.signal_delay_s,
    )
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    if args.setup:
        params["slurm_setup"] = list(args.setup)
    if args.slurm_arg:
        params["slurm_additional_parameters"] = dict(args.slurm_arg)
    return params


def executor(args: argparse.Namespace, tool: str):
    """submitit's executor for ``--cluster``, with the job's parameters."""
    import submitit

    if args.cluster == "local":
        ex = submitit.LocalExecutor(args.log_dir, max_num_timeout=args.max_requeues)
        ex.update_parameters(timeout_min=args.time, tasks_per_node=1, signal_delay_s=args.signal_delay_s,
                             gpus_per_node=args.gpus_per_node if _cuda() else 0)
        return ex
    if shutil.which("srun") is None:
        raise SystemExit("submit: no srun here, so no SLURM cluster; --cluster local runs the job on this machine")
    ex = submitit.AutoExecutor(args.log_dir, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    ex.update_parameters(**slurm_parameters(args, tool))
    return ex


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: Optional[List[str]] = None):
    args = parser().parse_args(argv)
    tool = tool_name(args.tool)
    if args.nodes > 1 and args.cluster == "local":
        raise SystemExit("submit: --cluster local runs one node; use --nodes 1")
    job = ToolJob(tool, args.tool_args, args.gpus_per_node, os.getcwd(), port=args.port)
    ex = executor(args, tool)
    submitted = ex.submit(job)
    print(f"submitted {tool} as job {submitted.job_id}: {args.nodes} node(s) x {args.gpus_per_node} process(es); "
          f"logs: {submitted.paths.stdout} and .err")
    if args.wait:
        try:
            result = submitted.result()
        except Exception as e:  # submitit re-raises the job's error with its traceback
            raise SystemExit(f"submit: job {submitted.job_id} failed: {str(e).strip().splitlines()[-1]}; "
                             f"its log: {submitted.paths.stdout}") from None
        print(f"job {submitted.job_id} finished: {result}")
    return submitted


if __name__ == "__main__":
    main()
