"""Where a training step's kernel time goes, from ``torch.profiler``: kernel time per step by
kind (GEMM, attention, other) and by the chain of ops that launched each kernel
(``--profile-dir`` of the training-step benchmarks)."""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

# the columns of profile_breakdown
PROFILE_COLUMNS = ["GEMM ms/step", "attention ms/step", "other ms/step", "kernels/step (profiled)"]

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

