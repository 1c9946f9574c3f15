"""The training-step benchmarks run end to end on a tiny model and fill every column.

They are scripts (run the way a user runs them), so they are tested through a subprocess.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run_benchmark(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / script), "--variant", "revcolv2_tiny",
                           "--batch-sizes", "2", "--warmup", "0", "--iters", "1", *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    return header, rows


def test_backbone_benchmark_fills_the_analysis_and_profile_columns(tmp_path):
    header, rows = run_benchmark("benchmark_backbone.py", "--rows", "rev,vit-ckpt", "--profile-dir", str(tmp_path))
    assert "error" not in header, rows
    for col in ("act peak (MB/img)", "GFLOPs/img (fwd+bwd)", "block evals/step", "non-GEMM MB/img", "ops/step",
                "GEMM ms/step", "attention ms/step", "other ms/step"):
        assert all(float(r[col]) > 0 for r in rows), (col, rows)
    for r in rows:  # each step timed on its own: "min-max" around the mean (which also counts
        # the loop between steps, hence the 5% margin above)
        low, high = (float(v) for v in r["ms/step range"].split("-"))
        assert low <= high and low - 0.1 <= float(r["ms/step"]) <= high * 1.05 + 0.1
    by = {r["model"]: r for r in rows}
    rev = by["revcolv2_tiny reversible"]
    ckpt = by["vit_tiny_patch16_224 (timm) + set_grad_checkpointing()"]
    # 2 BU columns x 4 levels + the top TD level, each evaluated in forward and once in backward,
    # except the last update (the top TD level), whose graph the forward keeps for the backward
    assert int(rev["block evals/step"]) == 17
    assert int(ckpt["block evals/step"]) == 24
    for key in ("rev", "vit-ckpt"):
        trace = json.loads((tmp_path / f"{key}-b2.json").read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
        chains = (tmp_path / f"{key}-b2.chains.txt").read_text()  # the op-chain table printed after the rows
        assert "op chains" in chains and " > aten::" in chains


def test_pretrain_benchmark_fills_the_analysis_columns():
    header, rows = run_benchmark("benchmark_pretrain.py", "--rows", "rev")
    assert "error" not in header, rows
    (rev,) = rows
    # MIM reads every level: 12 blocks, twice, but the last update (TD level 0) keeps its graph
    assert int(rev["block evals/step"]) == 23
    assert float(rev["non-GEMM MB/img"]) > 0 and float(rev["GFLOPs/img (fwd+bwd)"]) > 0
