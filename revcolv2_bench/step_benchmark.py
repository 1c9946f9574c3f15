"""What the training-step benchmarks (backbone, pre-training) share: the start (parse the
command line, or run as a worker), the (row, batch) worker, and the end (table, report,
op chains, JSON rows)."""
from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .analysis import analyze_training_step
from .cli import profile_args, resolve_step_args, step_benchmark_parser
from .measure import print_result, step_worker_result
from .profiling import print_op_chains
from .report import print_and_report, write_rows_json


def step_benchmark_start(description: str, rows: Sequence[str], default_rows: Sequence[str],
                         default_cuda_batches: str, worker: Callable[[argparse.Namespace], Dict]):
    """Parse a training-step benchmark's command line. In a worker process, run ``worker``,
    print its ``RESULT`` line and return None; in the parent, return (args, row keys,
    batch sizes)."""
    args = step_benchmark_parser(description, rows, default_rows, default_cuda_batches).parse_args()
    keys = resolve_step_args(args, rows)
    if args.worker:
        print_result(worker(args))
        return None
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batch_sizes or (default_cuda_batches if cuda else "2")).split(",")]
    return args, keys, batches


def step_jobs(args: argparse.Namespace, keys: Sequence[str], batches: Sequence[int],
              at_larger_batches: Callable[[str], bool]) -> List[Tuple[str, int, List[str]]]:
    """(row, batch, worker arguments) of each fresh-process job: every row at the first batch
    size, where the analysis columns are measured (they do not depend on the batch; unless
    ``--no-analysis``), and at the larger batch sizes the rows ``at_larger_batches`` admits
    (every row with ``--all-batches``)."""
    return [(k, b, ([] if b == batches[0] and not args.no_analysis else ["--no-analysis"])
             + profile_args(args, k, b, batches[0]))
            for b in batches for k in keys if b == batches[0] or args.all_batches or at_larger_batches(k)]


def prepare_row(model: torch.nn.Module, key: str, device: str) -> torch.nn.Module:
    """Move a row's model to ``device`` in training mode and compile it as its key says:
    ``rev-compiled`` compiles the levels (``model.compile_levels()``), any other
    ``-compiled`` key the whole model (``torch.compile``)."""
    model = model.to(device).train()
    if key == "rev-compiled":
        from revcolv2.model import allow_level_recompiles

        allow_level_recompiles()  # a process-wide switch: this worker process is the program
        model.compile_levels()
    elif key.endswith("-compiled"):
        model = torch.compile(model)
    return model


def step_worker(args: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer,
                make_batch: Callable[[int, torch.Generator], Sequence[torch.Tensor]],
                loss_fn: Callable[..., torch.Tensor]) -> Dict:
    """One (row, batch) worker of a training-step benchmark.

    ``make_batch(batch, generator)`` makes the inputs (on the CPU), ``loss_fn(model, *inputs)``
    runs the forward and returns the loss. The timed step is forward + loss + backward +
    optimizer step in bf16 autocast on CUDA and fp32 on CPU; the analysis columns
    (:func:`.analysis.analyze_training_step`, eager rows only) use bf16 autocast on every device.
    """
    from revcolv2.amp import autocast

    device = args.device

    def on_device(batch: int, seed: int):
        return [t.to(device) for t in make_batch(batch, torch.Generator().manual_seed(seed))]

    def loss_at(batch: int) -> torch.Tensor:
        inputs = on_device(batch, 0)
        with autocast(device, "bf16", cuda_only=False):
            return loss_fn(model, *inputs)

    fixed = on_device(args.batch, 1)

    def step() -> None:
        with autocast(device, "bf16"):
            loss = loss_fn(model, *fixed)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def analysis() -> Dict:
        if args.no_analysis or args.worker.endswith("-compiled"):
            return {}
        return analyze_training_step(model, loss_at)

    profile_path = os.path.join(args.profile_dir, f"{args.worker}-b{args.batch}.json") if args.profile_dir else None
    out = step_worker_result(step, analysis, device, args.batch, args.warmup, args.iters, profile_path)
    out["params (M)"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return out



def finish_step_benchmark(tool: str, args: argparse.Namespace, rows: List[Dict], table: str, title: str,
                          step: str, drop_path: str, extra: str = "") -> None:
    """The end of a training-step benchmark: print its table (with ``--report``, write it to
    docs/BENCHMARKS.md as run by ``python tools/TOOL``, described by ``step``, ``drop_path`` and
    ``extra``), then the op chains of ``--profile-dir`` and the rows of ``--json``."""
    precision = "bf16 autocast" if args.device.startswith("cuda") else "fp32 timing, bf16-autocast analysis columns"
    body = (f"{step}, {args.img_size}x{args.img_size}, {precision}, {drop_path}, {args.warmup} warm-up + "
            f"{args.iters} timed steps, one process per row and batch.{extra}\n\n{table}\n")
    print_and_report(tool, table, "", args.report, title, args.device, body)
    print_op_chains(args.profile_dir, rows)
    write_rows_json(args.json, rows)
