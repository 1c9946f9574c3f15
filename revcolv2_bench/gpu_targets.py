"""Every GPU target of the reversible engine, measured in one command (``--budget-s``, 450 s
by default, bounds it; not yet run on a GPU), with the op chains that show where the time goes.

    python tools/benchmark_gpu_targets.py --out runs/gpu-targets            # prints the targets
    python tools/benchmark_gpu_targets.py --out runs/gpu-targets --report   # ... and docs/BENCHMARKS.md

It runs, each (row, batch) in a fresh process, bf16 autocast, AdamW, 224x224:

1. a smoke check: one reversible and one plain step of ``revcolv2_tiny`` on the GPU, whose
   gradients must agree (a broken engine stops the run here, in seconds);
2. ``benchmark_backbone.py`` RevColV2-B: ViT-B/16 with and without ``set_grad_checkpointing()``,
   plain and reversible, at batch 128 and (memory-saving rows) 512; ``--profile-dir`` for the
   reversible and checkpointed rows at 128;
3. ``benchmark_pretrain.py`` at batch 256: MAE ViT-B (8x512 decoder), RevColV2-B plain and
   reversible, profiled;
4. ``benchmark_backbone.py`` RevColV2-L against ViT-L/16 + checkpointing at batch 128;
5. the compiled rows at batch 128: ``torch.compile`` of ViT-B, ViT-B + checkpointing and
   plain RevColV2-B, and reversible RevColV2-B with ``compile_levels()``;
6. ``benchmark_detection.py``: Mask R-CNN RevColV2-B against ViTDet-B, 1024x1024, batch 2.

Steps run in that order (the targets first); once ``--budget-s`` is spent the remaining steps
are skipped and reported as such. Everything lands in ``--out``: each step's log and JSON
rows, the op-chain tables (``<row>.chains.txt``) and the targets table (``"targets.md"``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from .report import REPORT, update_report

# (name, benchmark module of this package, arguments); --json, --out paths and timeouts are added by run_step
STEPS = [
    ("backbone-b", "backbone",
     ["--variant", "revcolv2_base", "--rows", "vit,vit-ckpt,plain,rev", "--batch-sizes", "128,512",
      "--no-analysis", "--profile-rows", "rev,vit-ckpt"]),
    ("pretrain-b", "pretrain",
     ["--variant", "revcolv2_base", "--rows", "mae,plain,rev", "--batch-sizes", "256", "--no-analysis",
      "--profile-rows", "rev,mae"]),
    ("backbone-l", "backbone",
     ["--variant", "revcolv2_large", "--rows", "vit-ckpt,rev", "--batch-sizes", "128", "--no-analysis"]),
    ("compiled-b", "backbone",
     ["--variant", "revcolv2_base", "--rows", "vit-compiled,vit-ckpt-compiled,plain-compiled,rev-compiled",
      "--batch-sizes", "128", "--no-analysis", "--worker-timeout", "240"]),
    ("detection-b", "detection", []),
]
PROFILED = {"backbone-b", "pretrain-b"}

# (target, step, row, reference step, reference row, batch, minimum speed ratio, maximum memory ratio)
TARGETS = [
    ("reversible RevColV2-B >= 1.30x ViT-B+ckpt, memory <= it (batch 128)", "backbone-b", "rev", "vit-ckpt",
     128, 1.30, 1.0),
    ("reversible RevColV2-B >= 1.30x ViT-B+ckpt, memory <= it (batch 512)", "backbone-b", "rev", "vit-ckpt",
     512, 1.30, 1.0),
    ("plain RevColV2-B >= 1.25x ViT-B (batch 128)", "backbone-b", "plain", "vit", 128, 1.25, None),
    ("MIM reversible >= 1.0x MAE, memory <= 0.4x MAE (batch 256)", "pretrain-b", "rev", "mae", 256, 1.0, 0.4),
    ("reversible RevColV2-L >= 1.20x ViT-L+ckpt, memory <= it (batch 128)", "backbone-l", "rev", "vit-ckpt",
     128, 1.20, 1.0),
    ("compiled plain RevColV2-B >= 1.30x compiled ViT-B (batch 128)", "compiled-b", "plain-compiled",
     "vit-compiled", 128, 1.30, None),
    ("compile_levels() reversible >= 1.20x compiled ViT-B+ckpt, memory <= it (batch 128)", "compiled-b",
     "rev-compiled", "vit-ckpt-compiled", 128, 1.20, 1.0),
]


def smoke_check() -> None:
    """One bf16 training step of revcolv2_tiny, reversible and plain, on the GPU: finite
    gradients that agree (the CPU tests bound the same comparison)."""
    import timm
    import torch

    import revcolv2  # noqa: F401

    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=10, drop_path_rate=0.1).cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    grads = []
    for reversible in (True, False):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None]))
    rel = ((grads[0] - grads[1]).norm() / grads[1].norm()).item()
    ok = all(torch.isfinite(g).all() for g in grads) and rel < 1e-2
    print(f"smoke check on {torch.cuda.get_device_name(0)}: reversible vs plain bf16 gradients, relative "
          f"error {rel:.2e} ({'ok' if ok else 'FAILED'})", flush=True)
    if not ok:
        raise SystemExit(1)


def run_step(name: str, module: str, extra: List[str], out: str, seconds_left: float) -> Optional[List[Dict]]:
    """Run one benchmark (``python -m revcolv2_bench.MODULE``, its log to OUT/NAME.log); its rows,
    or None if it failed."""
    rows_path = os.path.join(out, f"{name}.json")
    cmd = [sys.executable, "-m", f"{__package__}.{module}", "--device", "cuda", "--json", rows_path, *extra]
    if name in PROFILED:
        cmd += ["--profile-dir", os.path.join(out, "profile")]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=max(seconds_left, 1))
            log.write(proc.stdout)
            print(proc.stdout[-6000:], flush=True)
        except subprocess.TimeoutExpired as e:
            log.write((e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
            print(f"[{name}] stopped: the budget ran out after {time.time() - start:.0f} s", flush=True)
            return None
    print(f"[{name}] {time.time() - start:.0f} s", flush=True)
    if proc.returncode or not os.path.exists(rows_path):
        return None
    with open(rows_path) as f:
        return json.load(f)


def _row(rows: Optional[List[Dict]], key: str, batch: int) -> Optional[Dict]:
    for r in rows or []:
        if r.get("key") == key and r.get("batch") == batch and "error" not in r:
            return r
    return None


def targets_table(results: Dict[str, Optional[List[Dict]]], device: str) -> str:
    lines = [f"| target ({device}) | measured | verdict |", "|---|---|---|"]
    for text, step, key, ref_key, batch, min_speed, max_mem in TARGETS:
        row, ref = _row(results.get(step), key, batch), _row(results.get(step), ref_key, batch)
        if row is None or ref is None:
            lines.append(f"| {text} | not measured ({step} did not give both rows) | - |")
            continue
        speed = row["img/s"] / ref["img/s"]
        mem = row["peak GiB"] / ref["peak GiB"]
        ok = speed >= min_speed and (max_mem is None or mem <= max_mem)
        measured = f"{row['img/s']:.0f} vs {ref['img/s']:.0f} img/s: **{speed:.2f}x**; peak {row['peak GiB']:.2f} vs " \
                   f"{ref['peak GiB']:.2f} GiB ({mem:.2f}x)"
        lines.append(f"| {text} | {measured} | {'met' if ok else 'missed'} |")
    det = results.get("detection-b")
    if det:
        rev = next((r for r in det if r.get("model") == "RevColV2-B reversible"), None)
        if rev:
            lines.append(f"| Mask R-CNN RevColV2-B reversible vs ViTDet-B (1024x1024, batch 2) | train step "
                         f"{rev.get('train time vs ViTDet')} of ViTDet-B's time, "
                         f"memory {rev.get('train memory vs ViTDet')}, "
                         f"inference {rev.get('infer vs ViTDet')} | (re-measured) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="output/gpu-targets",
                    help="folder for the logs, rows, op chains and targets table")
    ap.add_argument("--budget-s", type=float, default=450, help="skip the steps that would start after this")
    ap.add_argument("--steps", default=",".join(s[0] for s in STEPS), help="comma-separated subset of the steps")
    ap.add_argument("--report", nargs="?", const=None, default=False, metavar="PATH",
                    help="write the targets and the tables to docs/BENCHMARKS.md (or PATH) as the current GPU run")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in {name for name, _, _ in STEPS}]
    if unknown:
        raise SystemExit(f"--steps: unknown steps {unknown}; choose from {[name for name, _, _ in STEPS]}")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmark_gpu_targets.py measures GPU targets: no CUDA device is available")
    if args.smoke:
        smoke_check()
        return
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    # in its own process, so that this one holds no CUDA context while the rows run
    if subprocess.run([sys.executable, "-m", __spec__.name, "--smoke"]).returncode:
        raise SystemExit("smoke check failed: the engine is broken on this GPU, nothing measured")
    results: Dict[str, Optional[List[Dict]]] = {}
    for name, module, extra in STEPS:
        if name not in wanted:
            continue
        left = args.budget_s - (time.time() - start)
        if left < 20:
            print(f"[{name}] skipped: {args.budget_s:.0f} s budget spent", flush=True)
            continue
        results[name] = run_step(name, module, extra, args.out, left)
    device = torch.cuda.get_device_name(0)  # no context needed for the name
    table = targets_table(results, device)
    with open(os.path.join(args.out, "targets.md"), "w") as f:
        f.write(table + "\n")
    print(f"\n{table}\n\ntotal {time.time() - start:.0f} s", flush=True)
    if args.report is not False:
        logs = []
        for name in results:
            with open(os.path.join(args.out, f"{name}.log")) as f:
                tables = [ln for ln in f.read().splitlines() if ln.startswith("|")]
            logs.append(f"{name}:\n\n" + "\n".join(tables))
        body = table + "\n\n" + "\n\n".join(logs)
        command = "python tools/benchmark_gpu_targets.py " + " ".join(sys.argv[1:])
        update_report(args.report or REPORT, "Reversible engine: the GPU targets", command.strip(), "cuda", body)


if __name__ == "__main__":
    main()
