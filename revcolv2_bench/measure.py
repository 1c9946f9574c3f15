"""Timing and memory of a step, and the fresh-process workers every benchmark row runs in.

A benchmark runs each row in its own process (``python -m revcolv2_bench.NAME --worker ...``),
so that no row inherits another's allocator state, compiled kernels or memory peak; the
worker prints its figures as JSON after ``RESULT ``.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESULT = "RESULT "


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
    their trace is written there (Chrome trace format) and
    :func:`revcolv2_bench.profiling.profile_breakdown` adds the kernel time per step by kind.
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
        from .profiling import profile_breakdown

        out.update(profile_breakdown(step, device, profile_path))
    return out


def print_result(figures: Dict) -> None:
    """A worker's last word: its figures, as the JSON line its parent collects."""
    print(RESULT + json.dumps(figures), flush=True)


def _result(stdout: str) -> Optional[Dict]:
    line = [ln for ln in stdout.splitlines() if ln.startswith(RESULT)]
    return json.loads(line[0][len(RESULT):]) if line else None


def run_workers(module: str, labels: Sequence[str], args: Sequence[str], tag: str) -> List[Dict]:
    """Run ``python -m MODULE --worker LABEL *args`` once per label, each in a fresh process
    (so peak memory does not leak between models); collect the JSON each prints after ``RESULT ``."""
    rows = []
    for label in labels:
        print(f"[{tag}] {label} ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", module, "--worker", label, *map(str, args)],
                              capture_output=True, text=True)
        figures = _result(proc.stdout)
        if proc.returncode or figures is None:
            raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
        rows.append({"model": label, **figures})
        print("   ", rows[-1], flush=True)
    return rows


def run_step_workers(module: str, jobs: Sequence[Tuple[str, int, Sequence[str]]], args: Sequence[str],
                     timeout: int, tag: str) -> List[Dict]:
    """Run ``python -m MODULE --worker KEY --batch B *args *extra`` per (key, batch, extra) in a
    fresh process. A failed worker (out of memory, say) gives a row with its error instead of
    stopping the others."""
    rows = []
    for key, batch, extra in jobs:
        print(f"[{tag}] {key} batch {batch} ...", flush=True)
        try:
            proc = subprocess.run([sys.executable, "-m", module, "--worker", key, "--batch", str(batch),
                                   *map(str, args), *extra], capture_output=True, text=True, timeout=timeout)
            figures = _result(proc.stdout)
            if proc.returncode or figures is None:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"error": err[:120]}
                print(proc.stderr[-3000:], file=sys.stderr)
            else:
                row = figures
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {timeout} s"}
        rows.append({"key": key, "batch": batch, **row})
        print("   ", rows[-1], flush=True)
    return rows
