"""Helpers shared by the benchmark scripts in tools/ (command line, timing, memory, reporting).

The scripts import it as a sibling module (a script's folder is on ``sys.path``). Every
benchmark prints its table; only ``--report [PATH]`` writes it to docs/BENCHMARKS.md, as the
current table of its benchmark (:func:`update_report`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPORT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "BENCHMARKS.md")


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


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {cpu}, no GPU used (torch {torch.__version__})"


class SavedActivations:
    """Bytes of distinct tensor storages that autograd saves for backward inside ``with``.

    Parameters (saved by linear layers, say) are weights, not activations, and are not
    counted; a storage saved twice counts once.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen = set()
        self.total = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of (allocated - freed) tensor bytes during ``fn()``, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step: Callable[[], None], device: str, warmup: int, iters: int) -> Tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of ``step`` after ``warmup`` calls
    (:func:`timed_steps` without the per-step times).

    CPU seconds (all threads of this process) do not grow when other processes share the
    cores, so they compare models fairly on a busy machine; wall time is what a user sees.
    """
    for _ in range(warmup):
        step()
    sec, cpu_sec, _ = timed_steps(step, device, iters)
    return sec, cpu_sec


def run_workers(script: str, labels: Sequence[str], args: Sequence[str], tag: str) -> List[Dict]:
    """Run ``script --worker LABEL *args`` once per label, each in a fresh process (so peak
    memory does not leak between models); collect the JSON each prints after ``RESULT ``."""
    rows = []
    for label in labels:
        print(f"[{tag}] {label} ...", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", label, *map(str, args)],
                              capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
        rows.append({"model": label, **json.loads(line[0][len("RESULT "):])})
        print("   ", rows[-1], flush=True)
    return rows


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


CURRENT_HEADING = "## Current results"
HISTORY_HEADING = "## History"
HISTORY_INTRO = "Superseded runs, newest first."
_REPORT_END = "<!-- /report -->"
_SKELETON = (
    "# Benchmarks\n\nEvery table below is written by a script in `tools/` with `--report`, which replaces the "
    "current table of its benchmark and machine kind and moves the one it replaces to the history.\n\n"
    f"{CURRENT_HEADING}\n\n{HISTORY_HEADING}\n\n{HISTORY_INTRO}\n"
)


def update_report(path: str, title: str, command: str, device: str, body: str) -> str:
    """Write a run (command, machine, date, commit, ``body``) as the current table of its
    benchmark and machine kind (``title`` + GPU/CPU) in docs/BENCHMARKS.md.

    The section it replaces moves, unchanged, to the top of the history section; a first
    run of its kind goes at the end of the current results. Returns the section's key.
    """
    key = f"{title} ({'GPU' if device.startswith('cuda') else 'CPU'})"
    begin = f"<!-- report: {key} -->"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        rev = ""
    section = (f"{begin}\n### {key}\n\n- command: `{command}`\n- machine: {machine_description(device)}\n"
               f"- date: {when}" + (f" (commit {rev})" if rev else "") + f"\n\n{body.strip()}\n{_REPORT_END}\n")
    text = open(path).read() if os.path.exists(path) else _SKELETON
    for heading in (CURRENT_HEADING, HISTORY_HEADING):
        if heading not in text:
            text = text.rstrip("\n") + f"\n\n{heading}\n"
    if begin in text:
        i = text.index(begin)
        j = text.index(_REPORT_END, i) + len(_REPORT_END)
        old = text[i + len(begin):j - len(_REPORT_END)].strip("\n")
        text = text[:i] + section.rstrip("\n") + text[j:]
        h = text.index(HISTORY_HEADING)
        intro = text.find(HISTORY_INTRO, h)
        at = intro + len(HISTORY_INTRO) if intro != -1 else h + len(HISTORY_HEADING)
        text = text[:at] + "\n\n" + old + text[at:]
    else:
        h = text.index(HISTORY_HEADING)
        text = text[:h].rstrip("\n") + "\n\n" + section + "\n" + text[h:]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return key


# --------------------------------------------------------------------------- training-step benchmarks
# the device-independent columns of analyze_training_step, and those of profile_breakdown
ANALYSIS_COLUMNS = ["act peak (MB/img)", "GFLOPs/img (fwd+bwd)", "block evals/step", "non-GEMM MB/img", "ops/step"]
PROFILE_COLUMNS = ["GEMM ms/step", "attention ms/step", "other ms/step", "kernels/step (profiled)"]


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


def profile_args(args: argparse.Namespace, key: str, batch: int, first_batch: int) -> List:
    """``--profile-dir`` for the (row, batch) workers that ``--profile-rows`` selects."""
    rows = args.profile_rows.split(",") if args.profile_rows else None
    if not args.profile_dir or (rows is not None and (key not in rows or batch != first_batch)):
        return []
    return ["--profile-dir", args.profile_dir]


def finish_step_benchmark(script: str, args: argparse.Namespace, rows: List[Dict], table: str, title: str,
                          step: str, drop_path: str, extra: str = "") -> None:
    """The end of a training-step benchmark: print its table (with ``--report``, write it to
    docs/BENCHMARKS.md, described by ``step``, ``drop_path`` and ``extra``), then the op chains
    of ``--profile-dir`` and the rows of ``--json``."""
    precision = "bf16 autocast" if args.device.startswith("cuda") else "fp32 timing, bf16-autocast analysis columns"
    body = (f"{step}, {args.img_size}x{args.img_size}, {precision}, {drop_path}, {args.warmup} warm-up + "
            f"{args.iters} timed steps, one process per row and batch.{extra}\n\n{table}\n")
    print_and_report(script, table, "", args.report, title, args.device, body)
    print_op_chains(args.profile_dir, rows)
    write_rows_json(args.json, rows)


def write_rows_json(path: Optional[str], rows: List[Dict]) -> None:
    """``--json PATH``: the measured rows, for a script that checks targets across benchmarks."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def worker_args(args: argparse.Namespace) -> List:
    """The options every (row, batch) worker process gets from the parent's command line."""
    out = ["--device", args.device, "--img-size", args.img_size, "--warmup", args.warmup, "--iters", args.iters,
           "--variant", args.variant]
    return out


def step_benchmark_start(description: str, rows: Sequence[str], default_rows: Sequence[str],
                         default_cuda_batches: str, worker: Callable[[argparse.Namespace], Dict]):
    """Parse a training-step benchmark's command line. In a worker process, run ``worker``,
    print its ``RESULT`` line and return None; in the parent, return (args, row keys,
    batch sizes)."""
    args = step_benchmark_parser(description, rows, default_rows, default_cuda_batches).parse_args()
    keys = resolve_step_args(args, rows)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return None
    cuda = args.device.startswith("cuda")
    batches = [int(b) for b in (args.batch_sizes or (default_cuda_batches if cuda else "2")).split(",")]
    return args, keys, batches


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


def timed_steps(step: Callable[[], None], device: str, iters: int) -> Tuple[float, float, List[float]]:
    """(wall seconds per step, process CPU seconds per step, each step's seconds).

    Each step's own time shows how much the mean can be trusted: a ratio between two rows
    smaller than their steps' spread is noise. On CUDA it comes from events recorded on the
    stream around every step, so the GPU is never drained between steps; on the CPU from
    ``time.perf_counter``.
    """
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    wall, cpu = time.perf_counter(), time.process_time()
    each: List[float] = []
    if cuda:
        marks[0].record()
    for i in range(iters):
        t = time.perf_counter()
        step()
        if cuda:
            marks[i + 1].record()
        else:
            each.append(time.perf_counter() - t)
    if cuda:
        torch.cuda.synchronize()
        each = [a.elapsed_time(b) / 1000 for a, b in zip(marks, marks[1:])]
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters, each


def step_worker_result(step: Callable[[], None], analysis: Callable[[], Dict], device: str, batch: int,
                       warmup: int, iters: int, profile_path: Optional[str] = None) -> Dict:
    """Time ``step`` (after ``warmup`` steps) and measure memory; ``analysis()`` adds its columns.

    With ``profile_path``, two more steps run under ``torch.profiler`` after the timed ones:
    their trace is written there (Chrome trace format) and :func:`profile_breakdown` adds
    the kernel time per step by kind.
    """
    cuda = device.startswith("cuda")
    out: Dict = {}
    out.update(analysis())
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sec, cpu_sec, each = timed_steps(step, device, iters)
    out.update({"img/s": round(batch / sec, 1), "ms/step": round(sec * 1000, 1),
                "ms/step range": f"{min(each) * 1000:.1f}-{max(each) * 1000:.1f}",
                "host CPU-s/step": round(cpu_sec, 3)})
    if cuda:
        out["peak GiB"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    else:
        out["peak RSS (MB)"] = round(peak_rss_mb(), 0)
    if profile_path:
        out.update(profile_breakdown(step, device, profile_path))
    return out


# substrings of CUDA kernel names (cuBLAS / cuBLASLt / CUTLASS / cuDNN, flash and memory-
# efficient attention) and of the aten ops that are the CPU's kernels
_ATTENTION_NAMES = ("flash", "fmha", "attention", "_scaled_dot_product")
_GEMM_NAMES = ("gemm", "cutlass", "xmma", "nvjet", "cublas", "cudnn", "convolution", "aten::mm", "aten::addmm",
               "aten::_addmm_activation", "aten::bmm", "aten::baddbmm")


def kernel_kind(name: str) -> str:
    """'attention', 'GEMM' or 'other' for a kernel (CUDA) or aten op (CPU) name."""
    low = name.lower()
    if any(k in low for k in _ATTENTION_NAMES):
        return "attention"
    if any(k in low for k in _GEMM_NAMES):
        return "GEMM"
    return "other"


def profile_breakdown(step: Callable[[], None], device: str, path: str, steps: int = 2) -> Dict:
    """Kernel time per training step by kind (GEMM, attention, other) from ``torch.profiler``.

    CUDA: the device time of every kernel, by kernel name. CPU: the self time of every aten
    op (the CPU's "kernels"). The trace of the ``steps`` profiled steps goes to ``path``
    (open it in Perfetto or chrome://tracing). "other" is the element-wise, norm, copy,
    reduction and optimizer work that separates models with the same FLOPs. The step
    includes the optimizer step.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path) as f:
        chains = op_chains(json.load(f), steps)
    with open(os.path.splitext(path)[0] + ".chains.txt", "w") as f:
        f.write(format_op_chains(chains) + "\n")
    totals = {"GEMM": 0.0, "attention": 0.0, "other": 0.0}
    launches = 0
    for evt in prof.key_averages():
        if cuda:
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = evt.self_device_time_total
        else:
            if not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        if us <= 0:
            continue
        totals[kernel_kind(evt.key)] += us
        launches += evt.count
    out = {f"{kind} ms/step": round(us / steps / 1000, 2) for kind, us in totals.items()}
    if cuda:  # on the CPU, nested aten ops would count twice
        out["kernels/step (profiled)"] = launches // steps
    return out


def op_chains(trace: Dict, steps: int = 2, depth: int = 4) -> List[Tuple[float, int, str, str]]:
    """Kernel time of a ``torch.profiler`` Chrome trace by the chain of CPU ops that launched it.

    Returns ``(ms per step, launches per step, kind, chain)`` rows, largest first; the chain
    is the innermost ``depth`` CPU ops enclosing the launch, outermost first (``_LevelStep >
    aten::layer_norm > aten::native_layer_norm``). A CUDA kernel is matched to its launching
    runtime call by correlation id. A CPU-only trace has no kernels: there each ``aten::`` op
    stands for one, with its self time (its duration less its child ops'), and ends its chain.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ops: Dict = {}  # thread -> [(start, end, name)]
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("ph") == "X":
            ops.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    kernels = [(e["args"].get("correlation"), e["dur"], e["name"]) for e in events if e.get("cat") == "kernel"]
    launches = {e["args"].get("correlation"): (e["tid"], e["ts"]) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    points = {}  # (tid, ts) -> [(dur, kernel name)] to attribute to the ops enclosing ts
    if kernels:
        for corr, dur, name in kernels:
            if corr in launches:
                points.setdefault(launches[corr], []).append((dur, name))
    else:
        for tid, spans in ops.items():
            for start, self_us, name in _self_times(spans):
                if name.startswith("aten::") and self_us > 0:
                    points.setdefault((tid, start), []).append((self_us, name))
    time_of: Dict[Tuple[str, str], float] = {}
    count_of: Dict[Tuple[str, str], int] = {}
    for tid, spans in ops.items():
        spans = sorted(spans, key=lambda sp: (sp[0], -sp[1]))
        here = sorted(ts for t, ts in points if t == tid)
        stack: List[Tuple[float, float, str]] = []
        i = 0
        for ts in here:
            while i < len(spans) and spans[i][0] <= ts:
                while stack and stack[-1][1] < spans[i][0]:
                    stack.pop()
                stack.append(spans[i])
                i += 1
            while stack and stack[-1][1] < ts:
                stack.pop()
            enclosing = [sp[2] for sp in stack if sp[0] <= ts <= sp[1]]
            chain = " > ".join(enclosing[-depth:]) or "?"
            for dur, name in points[(tid, ts)]:
                key = (kernel_kind(name), chain)
                time_of[key] = time_of.get(key, 0.0) + dur
                count_of[key] = count_of.get(key, 0) + 1
    rows = [(us / 1000 / steps, count_of[key] // steps, key[0], key[1]) for key, us in time_of.items()]
    return sorted(rows, key=lambda r: -r[0])


def _self_times(spans: List[Tuple[float, float, str]]) -> List[Tuple[float, float, str]]:
    """(start, duration less that of the spans directly inside it, name) of one thread's spans."""
    spans = sorted(spans, key=lambda sp: (sp[0], -sp[1]))
    own = [sp[1] - sp[0] for sp in spans]
    stack: List[int] = []
    for k, (start, _, _) in enumerate(spans):
        while stack and spans[stack[-1]][1] < start:
            stack.pop()
        if stack:
            own[stack[-1]] -= spans[k][1] - spans[k][0]
        stack.append(k)
    return [(sp[0], own[k], sp[2]) for k, sp in enumerate(spans)]


def format_op_chains(rows: List[Tuple[float, int, str, str]], top: int = 20) -> str:
    """The first ``top`` rows of :func:`op_chains` as a text table, with the total."""
    total = sum(r[0] for r in rows)
    lines = [f"kernel ms/step {total:.2f}; top {min(top, len(rows))} op chains (outermost op first):",
             f"{'ms/step':>8} {'launches':>8}  {'kind':<9} chain"]
    lines += [f"{ms:8.2f} {n:8d}  {kind:<9} {chain}" for ms, n, kind, chain in rows[:top]]
    return "\n".join(lines)


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
    (:func:`analyze_training_step`, eager rows only) use bf16 autocast on every device.
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


def analyze_training_step(model: torch.nn.Module, loss_at: Callable[[int], torch.Tensor]) -> Dict:
    """Device-independent figures of one training step (forward + backward, no optimizer):

    - activation peak per image (MB): :func:`revcolv2.memory.activation_peak_per_image`;
    - GFLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over forward + backward
      at batch 2 (one multiply-add = 2 FLOPs, its convention);
    - block forward evaluations per step: calls of every module whose class is ``Block``
      (ours and timm's), recomputations in backward included;
    - non-GEMM MB per image and ops per step: :func:`revcolv2.memory.traffic_per_image`,
      the bytes read and written by every op that is not a matrix product or attention
      (element-wise updates, norms, casts, reductions), and the ops launched, views excluded.
      On a GPU those bytes, not FLOPs, set the time of that part of an eager step.

    ``loss_at(batch)`` runs the forward (under the caller's autocast) and returns the loss.
    """
    from revcolv2.flops import training_step_gflops
    from revcolv2.memory import activation_peak_per_image, traffic_per_image

    def fwd_bwd(batch: int) -> None:
        loss_at(batch).backward()

    peak = activation_peak_per_image(fwd_bwd)
    model.zero_grad(set_to_none=True)
    gflops = training_step_gflops(lambda: fwd_bwd(2), per=2)
    model.zero_grad(set_to_none=True)
    calls = []
    # pre-hooks: checkpointing's recomputation stops early inside the block's forward, so
    # forward (post) hooks would not see it
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules()
             if type(m).__name__ == "Block"]
    fwd_bwd(1)
    for h in hooks:
        h.remove()

    def fresh(batch: int) -> None:  # as a training step after zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        fwd_bwd(batch)

    traffic = traffic_per_image(fresh)
    model.zero_grad(set_to_none=True)
    return {"act peak (MB/img)": round(peak / 2 ** 20, 3), "GFLOPs/img (fwd+bwd)": round(gflops, 1),
            "block evals/step": len(calls), "non-GEMM MB/img": round(traffic["non_gemm_bytes"] / 2 ** 20, 1),
            "ops/step": traffic["ops"]}


def run_step_workers(script: str, jobs: Sequence[Tuple[str, int, Sequence[str]]], args: Sequence[str],
                     timeout: int, tag: str) -> List[Dict]:
    """Run ``script --worker KEY --batch B *args *extra`` per (key, batch, extra) in a fresh
    process. A failed worker (out of memory, say) gives a row with its error instead of
    stopping the others."""
    rows = []
    for key, batch, extra in jobs:
        print(f"[{tag}] {key} batch {batch} ...", flush=True)
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", key, "--batch", str(batch),
                                   *map(str, args), *extra], capture_output=True, text=True, timeout=timeout)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"error": err[:120]}
                print(proc.stderr[-3000:], file=sys.stderr)
            else:
                row = json.loads(line[0][len("RESULT "):])
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {timeout} s"}
        rows.append({"key": key, "batch": batch, **row})
        print("   ", rows[-1], flush=True)
    return rows


# --------------------------------------------------------------------------- detectron2 model benchmarks


def detectron2_train_infer(model: torch.nn.Module, opt: torch.optim.Optimizer, train_batch: List[Dict],
                           test_batch: List[Dict], device: str, warmup: int, iters: int,
                           record_forward: AbstractContextManager | None = None,
                           after_training: Callable[[float], Dict] | None = None,
                           infer_cpu_digits: int = 2) -> Dict:
    """Training-step and inference figures of a detectron2 model (detection, segmentation).

    A training step is forward (the sum of the model's losses on ``train_batch``) + backward +
    ``opt`` step; inference is a no-grad forward with post-processing of ``test_batch``; both
    under bf16 autocast on CUDA, fp32 elsewhere, inside detectron2's event storage (its losses
    log there). One untimed step first allocates the optimizer state. Columns, in order:

    - ``train s/step``, ``saved activations (MB)`` (:class:`SavedActivations` over one training
      forward, which runs inside ``record_forward`` when given), and on CPU ``train CPU-s/step``;
    - ``train peak GPU mem (GiB)`` on CUDA, ``fwd+bwd adds (MB)`` (:func:`cpu_peak_bytes` of one
      forward + backward, gradient buffers already there) on CPU;
    - whatever ``after_training(wall seconds per step)`` returns (the model is still training);
    - ``infer img/s``, and ``infer peak GPU mem (GiB)`` on CUDA or ``infer img/CPU-s`` (rounded
      to ``infer_cpu_digits``) on CPU.
    """
    from detectron2.utils.events import EventStorage

    from revcolv2.amp import autocast

    cuda = device.startswith("cuda")
    images = len(test_batch)

    def losses() -> torch.Tensor:
        with autocast(device, "bf16"):
            return sum(model(train_batch).values())

    def train_step() -> None:
        losses().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer() -> None:
        with autocast(device, "bf16"):
            model(test_batch)

    def timed_with_peak(fn: Callable[[], None]) -> Tuple[float, float, float | None]:
        """:func:`timed`, plus on CUDA the peak GiB allocated while it ran (None elsewhere)."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sec, cpu_sec = timed(fn, device, warmup, iters)
        return sec, cpu_sec, round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None

    out: Dict = {}
    with EventStorage(0):
        model.train()
        train_step()  # allocate the optimizer state before measuring
        with record_forward or nullcontext(), SavedActivations(model) as saved:
            loss = losses()
        loss.backward()
        opt.zero_grad(set_to_none=True)
        sec, cpu_sec, peak_gib = timed_with_peak(train_step)
        out.update({"train s/step": round(sec, 3), "saved activations (MB)": round(saved.total / 2 ** 20, 1)})
        if cuda:
            out["train peak GPU mem (GiB)"] = peak_gib
        else:
            out["train CPU-s/step"] = round(cpu_sec, 2)
            losses().backward()  # gradient buffers exist (and stay) from here on
            opt.zero_grad(set_to_none=False)
            out["fwd+bwd adds (MB)"] = round(cpu_peak_bytes(lambda: losses().backward()) / 2 ** 20, 1)
        if after_training is not None:
            out.update(after_training(sec))

        model.eval()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        sec, cpu_sec, peak_gib = timed_with_peak(infer)
        out["infer img/s"] = round(images / sec, 2)
        if cuda:
            out["infer peak GPU mem (GiB)"] = peak_gib
        else:
            out["infer img/CPU-s"] = round(images / cpu_sec, infer_cpu_digits)
    return out


def add_ratio_columns(rows: List[Dict], reference: Dict, name: str, cuda: bool) -> Tuple[str, str, str]:
    """Add ``train time vs NAME``, ``train memory vs NAME`` and ``infer vs NAME`` (``1.23x``)
    to every row of :func:`detectron2_train_infer` figures, relative to ``reference``.

    Returns the (training step, inference speed, training memory) columns the ratios use: on
    a CPU they are process CPU time, which other load on the machine does not inflate, and the
    memory forward + backward adds.
    """
    step = "train s/step" if cuda else "train CPU-s/step"
    speed = "infer img/s" if cuda else "infer img/CPU-s"
    mem = "train peak GPU mem (GiB)" if cuda else "fwd+bwd adds (MB)"
    for r in rows:
        r[f"train time vs {name}"] = f"{r[step] / reference[step]:.2f}x"
        r[f"train memory vs {name}"] = f"{r[mem] / reference[mem]:.2f}x"
        r[f"infer vs {name}"] = f"{r[speed] / reference[speed]:.2f}x"
    return step, speed, mem


# the CPU caveat of the detectron2 model benchmarks' reports; each script adds its GPU targets
CPU_RATIO_NOTE = ("CPU run: the ratios use process CPU time (all threads), which other load does not inflate; "
                  "2-core ratios are not GPU ratios, and the memory columns count activations (saved for backward, "
                  "or added by forward + backward), not the allocator's peak with weights and optimizer state. ")


def print_op_chains(profile_dir: Optional[str], rows: List[Dict]) -> None:
    """After a ``--profile-dir`` run, print each profiled row's op-chain table
    (:func:`format_op_chains`, written by its worker next to its trace)."""
    if not profile_dir:
        return
    for r in rows:
        path = os.path.join(profile_dir, f"{r['key']}-b{r['batch']}.chains.txt")
        if os.path.exists(path):
            with open(path) as f:
                print(f"\n### {r['key']} batch {r['batch']} ({path})\n{f.read().rstrip()}")


def print_and_report(script: str, table: str, summary: str, report: str | None, title: str, device: str,
                     body: str) -> None:
    """Print the table and a one-line summary; with ``--report PATH``, write ``body`` to PATH
    as the current section ``title`` (:func:`update_report`), naming the command line
    (``python tools/SCRIPT ...``)."""
    print(table)
    if summary:
        print(summary)
    if report:
        command = (f"python tools/{os.path.basename(script)} " + " ".join(sys.argv[1:])).strip()
        key = update_report(report, title, command, device, body)
        print(f"updated '{key}' in {report}")
