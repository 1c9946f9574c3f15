"""Small shared helpers for the benchmark scripts in tools/ (timing, memory, reporting)."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import subprocess
import time
from typing import Callable, Dict, List

import torch


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


class SavedTensorBytes:
    """Counts bytes handed to autograd's saved-tensor hooks (activation memory) inside ``with``."""

    def __init__(self):
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step: Callable[[], None], device: str, warmup: int, iters: int) -> float:
    """Seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def append_report(path: str, title: str, command: str, device: str, body: str) -> None:
    """Append a dated section (command, machine, date, table) to docs/BENCHMARKS.md."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False).stdout.strip()
    except OSError:
        rev = ""
    with open(path, "a") as f:
        if new:
            f.write("# Benchmarks\n\nEvery table is appended by a script in `tools/`; each says how it was made.\n")
        f.write(f"\n## {title}\n\n- command: `{command}`\n- machine: {machine_description(device)}\n"
                f"- date: {when}" + (f" (commit {rev})" if rev else "") + "\n\n" + body + "\n")
