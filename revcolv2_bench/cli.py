"""The one benchmark command line: the options every benchmark has, those of the
model-comparison benchmarks (detection, segmentation) and of the training-step benchmarks
(backbone, pre-training), and their device defaults."""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

import torch

from .report import REPORT


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark has: device, warm-up / timed steps, ``--report``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: depends on the device)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default: depends on the device)")
    ap.add_argument("--report", nargs="?", const=REPORT, default=None, metavar="PATH",
                    help="write the table to docs/BENCHMARKS.md (or PATH) as its benchmark's current table, moving the "
                         "previous one to the history; without it the table is only printed")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows, as measured, to PATH")
    return ap


def benchmark_parser(description: str, workers: Sequence[str]) -> argparse.ArgumentParser:
    """Command line of the model-comparison benchmarks (detection, segmentation); a script
    adds its input-size flag."""
    ap = base_parser(description)
    ap.add_argument("--batch", type=int, default=None, help="default: depends on the device (see the script)")
    ap.add_argument("--worker", choices=list(workers), help=argparse.SUPPRESS)
    return ap


def fill_device_defaults(args: argparse.Namespace, batch: Tuple[int, int], warmup: Tuple[int, int],
                         iters: Tuple[int, int]) -> bool:
    """Fill unset --batch/--warmup/--iters with the (CPU, CUDA) defaults; returns is-CUDA."""
    cuda = args.device.startswith("cuda")
    pick = 1 if cuda else 0
    args.batch = args.batch or batch[pick]
    args.warmup = args.warmup if args.warmup is not None else warmup[pick]
    args.iters = args.iters or iters[pick]
    return cuda


def step_benchmark_parser(description: str, rows: Sequence[str], default_rows: Sequence[str],
                          default_cuda_batches: str) -> argparse.ArgumentParser:
    """Command line of the training-step benchmarks (backbone, pre-training).

    Rows are named by key; ``--compile`` adds each row's compiled counterpart. Every (row,
    batch) pair runs in a fresh process. Nothing is written to docs/BENCHMARKS.md without
    ``--report``.
    """
    ap = base_parser(description)
    ap.add_argument("--rows", default=",".join(default_rows),
                    help=f"comma-separated rows out of: {', '.join(rows)} (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="also run the compiled counterpart of every row")
    ap.add_argument("--batch-sizes", default=None,
                    help=f"comma-separated; default 2 on CPU, {default_cuda_batches} on CUDA. Compiled rows and "
                         "rows that do not save memory run at the first batch size only, unless --all-batches")
    ap.add_argument("--all-batches", action="store_true", help="run every row at every batch size")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--variant", default="revcolv2_base", help="RevColV2 preset (revcolv2_tiny for a quick check)")
    ap.add_argument("--no-analysis", action="store_true",
                    help="skip the activation-peak / FLOP / block-evaluation columns")
    ap.add_argument("--worker-timeout", type=int, default=420, help="seconds per (row, batch) process")
    ap.add_argument("--profile-dir", default=None, metavar="DIR",
                    help="profile two more steps per row with torch.profiler: a Chrome trace per row in DIR, "
                         "the kernel time per step by kind (GEMM, attention, other) in the table, and each "
                         "row's top 20 op chains by kernel time printed after it")
    ap.add_argument("--profile-rows", default=None, metavar="ROWS",
                    help="with --profile-dir: profile only these comma-separated rows (default: all), at the "
                         "first batch size")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    return ap


def resolve_step_args(args: argparse.Namespace, rows: Sequence[str]) -> List[str]:
    """Fill the device defaults; returns the row keys to run (compiled ones added with --compile)."""
    cuda = args.device.startswith("cuda")
    # CUDA: enough warm-up for the caching allocator and the GEMM heuristics to settle
    # (a step that still grows the allocator's pool calls cudaMalloc and stalls), and enough
    # timed steps that "ms/step range" says how far a ratio between rows can be trusted
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.iters = args.iters or (20 if cuda else 2)
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(rows)}")
    if args.compile:
        keys += [k + "-compiled" for k in keys if not k.endswith("-compiled") and k + "-compiled" in rows
                 and k + "-compiled" not in keys]
    return keys


def profile_args(args: argparse.Namespace, key: str, batch: int, first_batch: int) -> List:
    """``--profile-dir`` for the (row, batch) workers that ``--profile-rows`` selects."""
    rows = args.profile_rows.split(",") if args.profile_rows else None
    if not args.profile_dir or (rows is not None and (key not in rows or batch != first_batch)):
        return []
    return ["--profile-dir", args.profile_dir]


def worker_args(args: argparse.Namespace) -> List:
    """The options every (row, batch) worker process gets from the parent's command line."""
    return ["--device", args.device, "--img-size", args.img_size, "--warmup", args.warmup, "--iters", args.iters,
            "--variant", args.variant]
