"""tools/benchmark_loader.py: the GPU step rates it reads from docs/BENCHMARKS.md (and
names), the workers per GPU it derives, and a run of its rows end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from revcolv2_bench import loader

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_step_rates_come_from_the_current_gpu_tables_with_their_row_and_card():
    rates = loader.gpu_step_rates()
    (mim,) = rates["mim"]
    assert mim["row"] == "revcolv2_base reversible, batch 256" and "H200" in mim["card"]
    assert mim["img/s"] == pytest.approx(3263.6)  # the engine v2 table's figure
    eager, compiled = rates["ft"]
    assert (eager["img/s"], compiled["img/s"]) == (pytest.approx(1895.9), pytest.approx(2808.3))
    assert rates["lsj"] == []


def test_a_table_missing_from_the_report_gives_no_rate(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Current results\n\n## History\n\n### MIM pre-training step: revcolv2_base vs "
                    "MAE ViT-B/16 (GPU)\n\n| model | batch | img/s |\n|---|---|---|\n| revcolv2_base reversible | 256 "
                    "| 9999 |\n")
    assert loader.gpu_step_rates(str(path)) == {"mim": [], "ft": [], "lsj": []}  # history tables do not count


def test_workers_per_gpu_round_up_and_compare_with_the_reference_row():
    rows = [{"key": "mim-torchvision", "img/s per worker": 200.0}, {"key": "mim", "img/s per worker": 400.0},
            {"key": "lsj", "img/s per worker": 50.0}]
    loader.add_worker_columns(rows, {"mim": [{"img/s": 3264.0}], "lsj": []})
    assert rows[0]["workers per GPU"] == "17 at 3264 img/s" and rows[0]["vs reference"] == "1.00x"
    assert rows[1]["workers per GPU"] == "9 at 3264 img/s" and rows[1]["vs reference"] == "2.00x"
    assert rows[2]["workers per GPU"] == "no GPU rate in docs/BENCHMARKS.md"


@pytest.mark.slow
def test_the_benchmark_measures_every_pipeline_and_writes_its_table(tmp_path):
    report, data = tmp_path / "BENCHMARKS.md", tmp_path / "jpegs"
    assert loader.write_jpegs(str(data), 7)["images"] == 7  # read with --data instead of generated ones
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_loader.py"), "--images", "6", "--warmup",
                           "1", "--batch", "2", "--rows", "mim-torchvision,mim,ft,lsj", "--data", str(data),
                           "--report", str(report), "--json", str(tmp_path / "rows.json")],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [r["pipeline"] for r in rows] == ["MIM pre-training", "MIM pre-training", "fine-tuning", "COCO LSJ 1024"]
    assert all(float(r["img/s per worker"]) > 0 and float(r["ms/img (CPU)"]) > 0 for r in rows)
    assert rows[0]["workers per GPU"].endswith("at 3264 img/s") and float(rows[2]["mixup ms/img (CPU)"]) > 0
    text = report.read_text()
    assert "### Input pipelines: images per second per loader worker (CPU)" in text
    assert "command: `python tools/benchmark_loader.py --images 6" in text and "H200" in text
    assert "on 7 JPEGs of --data" in text and data.is_dir()  # its folder is read, and kept
    measured = json.loads((tmp_path / "rows.json").read_text())  # --json: the rows as measured
    assert [r["pipeline"] for r in measured] == [r["pipeline"] for r in rows], measured
