"""The benchmark options whose effect is on what runs (rows, batch sizes, sizes, steps,
budgets, timeouts, profiled rows, output folders), each asserted on the benchmark's own
output with the costly measurement replaced by a stand-in that records what it was asked.

The step benchmarks (``benchmark_backbone.py``, ``benchmark_pretrain.py``) run their parent
in this process; each (row, batch) worker is a stand-in answering the ``RESULT`` line a real
worker prints (one test runs a real worker that outlives ``--worker-timeout``). The
detection and segmentation benchmarks run their real worker command line in this process,
with the model and its measurement replaced. The GPU-targets script runs on the CPU with the
CUDA checks, its smoke check and its benchmark subprocesses replaced, and a clock that the
stand-in steps advance.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

from revcolv2_bench import backbone, detection, gpu_targets, measure, pretrain, segmentation

REAL_RUN = subprocess.run


# ----------------------------------------------------------------------------- step benchmarks
def _step_benchmark(module, argv, monkeypatch, capsys, tmp_path, sleeping=()):
    """``module.main()`` with ``argv``, every (row, batch) worker a stand-in; returns the
    workers' calls ({key, batch, cmd, timeout}), the rows of ``--json`` and the printed text.

    A key in ``sleeping`` runs a real process that sleeps for a minute (under the timeout the
    parent gives it)."""
    calls = []

    def run(cmd, capture_output, text, timeout):
        key, batch = cmd[cmd.index("--worker") + 1], int(cmd[cmd.index("--batch") + 1])
        calls.append({"key": key, "batch": batch, "cmd": cmd, "timeout": timeout})
        if key in sleeping:
            return REAL_RUN([sys.executable, "-c", "import time; time.sleep(60)"], capture_output=capture_output,
                            text=text, timeout=timeout)
        figures = {"img/s": 10.0 * batch, "ms/step": 100.0, "ms/step range": "90.0-110.0",
                   "host CPU-s/step": 0.1 * (1 + len(key)), "peak RSS (MB)": 500.0}
        if "--profile-dir" in cmd:  # what a profiled worker writes next to its trace, and its columns
            folder = cmd[cmd.index("--profile-dir") + 1]
            with open(os.path.join(folder, f"{key}-b{batch}.chains.txt"), "w") as f:
                f.write(f"kernel ms/step 1.00; op chains of {key} at batch {batch}\n")
            figures.update({"GEMM ms/step": 1.0, "attention ms/step": 0.5, "other ms/step": 0.25})
        return subprocess.CompletedProcess(cmd, 0, stdout="log line\nRESULT " + json.dumps(figures) + "\n", stderr="")

    monkeypatch.setattr(measure, "subprocess", SimpleNamespace(run=run, TimeoutExpired=subprocess.TimeoutExpired))
    rows_path = os.path.join(tempfile.mkdtemp(dir=tmp_path), "rows.json")
    monkeypatch.setattr(sys, "argv", [module.TOOL, "--device", "cpu", "--variant", "revcolv2_tiny", "--json", rows_path,
                                      *map(str, argv)])
    module.main()
    with open(rows_path) as f:
        rows = json.load(f)
    return calls, rows, capsys.readouterr().out


def _table(out):
    """The printed markdown table's rows, as {column: cell}."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


# (module, an eager row that saves memory, one that does not)
STEP_BENCHMARKS = [(backbone, "rev", "vit"), (pretrain, "rev", "mae")]


@pytest.mark.parametrize("module,saving,other", STEP_BENCHMARKS, ids=["backbone", "pretrain"])
def test_all_batches_runs_every_row_at_every_batch_size(module, saving, other, monkeypatch, capsys, tmp_path):
    """Without --all-batches a row that does not save memory runs at the first batch size only;
    with it, every row runs (and is reported) at every batch size."""
    argv = ["--rows", f"{other},{saving}", "--batch-sizes", "2,4", "--no-analysis"]
    calls, rows, out = _step_benchmark(module, argv, monkeypatch, capsys, tmp_path)
    assert [(c["key"], c["batch"]) for c in calls] == [(other, 2), (saving, 2), (saving, 4)]
    assert [(r["key"], r["batch"]) for r in rows] == [(other, 2), (saving, 2), (saving, 4)]
    assert [r["batch"] for r in _table(out)] == ["2", "2", "4"]
    calls, rows, out = _step_benchmark(module, [*argv, "--all-batches"], monkeypatch, capsys, tmp_path)
    assert [(c["key"], c["batch"]) for c in calls] == [(other, 2), (saving, 2), (other, 4), (saving, 4)]
    assert [(r["key"], r["batch"]) for r in rows] == [(other, 2), (saving, 2), (other, 4), (saving, 4)]
    assert [r["batch"] for r in _table(out)] == ["2", "2", "4", "4"]


@pytest.mark.parametrize("module,saving,other", STEP_BENCHMARKS, ids=["backbone", "pretrain"])
def test_compile_adds_the_compiled_rows(module, saving, other, monkeypatch, capsys, tmp_path):
    """--compile adds each row's compiled counterpart (at the first batch size, unless
    --all-batches), and the table names them compiled."""
    argv = ["--rows", f"{other},{saving}", "--batch-sizes", "2,4", "--no-analysis"]
    calls, _, _ = _step_benchmark(module, argv, monkeypatch, capsys, tmp_path)
    assert not any(c["key"].endswith("-compiled") for c in calls)
    calls, rows, out = _step_benchmark(module, [*argv, "--compile"], monkeypatch, capsys, tmp_path)
    compiled = [f"{other}-compiled", f"{saving}-compiled"]
    assert [(c["key"], c["batch"]) for c in calls] == [
        (other, 2), (saving, 2), *((k, 2) for k in compiled), (saving, 4)]
    models = [r["model"] for r in _table(out)]
    assert [m.endswith("compiled") or m.endswith("compiled levels") for m in models] == [False, False, True, True,
                                                                                         False], models
    assert {r["key"] for r in rows} == {other, saving, *compiled}
    calls, _, _ = _step_benchmark(module, [*argv, "--compile", "--all-batches"], monkeypatch, capsys, tmp_path)
    assert {(k, 4) for k in compiled} <= {(c["key"], c["batch"]) for c in calls}


@pytest.mark.slow  # the first torch.compile of a process imports dynamo (seconds)
@pytest.mark.parametrize("module,other", [(backbone, "vit"), (backbone, "plain"), (pretrain, "mae")],
                         ids=["vit", "plain", "mae"])
def test_a_compiled_row_measures_the_compiled_model(module, other):
    """The worker of a ``-compiled`` row that --compile adds measures ``torch.compile`` of its
    model, the eager row the model itself (built here, not run: compiling a step on the CPU
    takes over a minute; ``rev-compiled`` switches dynamo's recompile limit for its whole
    process, so it is left to its own worker process)."""
    optimized = torch._dynamo.eval_frame.OptimizedModule
    assert isinstance(module.build(f"{other}-compiled", "revcolv2_tiny", 32, "cpu"), optimized)
    assert not isinstance(module.build(other, "revcolv2_tiny", 32, "cpu"), optimized)


def test_worker_timeout_reports_a_worker_that_outlives_it(monkeypatch, capsys, tmp_path):
    """--worker-timeout S: each (row, batch) process gets S seconds; one that takes longer (a
    real process sleeping for a minute) is stopped and reported as timed out, and the other
    rows are still measured."""
    argv = ["--rows", "vit,rev", "--batch-sizes", "2", "--no-analysis"]
    calls, _, _ = _step_benchmark(backbone, argv, monkeypatch, capsys, tmp_path)
    assert {c["timeout"] for c in calls} == {420}  # the default
    start = time.perf_counter()
    calls, rows, out = _step_benchmark(backbone, [*argv, "--worker-timeout", "1"], monkeypatch, capsys, tmp_path,
                                       sleeping={"vit"})
    assert time.perf_counter() - start < 30  # not the sleeping minute
    assert {c["timeout"] for c in calls} == {1}
    by = {r["key"]: r for r in rows}
    assert by["vit"]["error"] == "timed out after 1 s" and "img/s" not in by["vit"]
    assert "error" not in by["rev"] and by["rev"]["img/s"] == 20.0
    table = {r["model"]: r for r in _table(out)}
    assert table["vit_tiny_patch16_224 (timm)"]["error"] == "timed out after 1 s"
    assert table["revcolv2_tiny reversible"]["error"] == ""


def test_profile_rows_profiles_only_the_rows_named_at_the_first_batch_size(monkeypatch, capsys, tmp_path):
    """--profile-dir alone profiles every (row, batch) job; with --profile-rows only the named
    rows, at the first batch size: only they get the kernel-time columns and an op-chain table
    printed after the rows."""
    argv = ["--rows", "vit,vit-ckpt,rev", "--batch-sizes", "2,4", "--no-analysis", "--profile-dir", tmp_path / "all"]
    os.makedirs(tmp_path / "all")
    calls, _, out = _step_benchmark(backbone, argv, monkeypatch, capsys, tmp_path)
    assert all("--profile-dir" in c["cmd"] for c in calls) and len(calls) == 5  # vit-ckpt and rev also at 4
    assert out.count("\n### ") == 5
    os.makedirs(tmp_path / "some")
    argv[argv.index(tmp_path / "all")] = tmp_path / "some"
    calls, rows, out = _step_benchmark(backbone, [*argv, "--profile-rows", "rev,vit"], monkeypatch, capsys, tmp_path)
    profiled = [(c["key"], c["batch"]) for c in calls if "--profile-dir" in c["cmd"]]
    assert profiled == [("vit", 2), ("rev", 2)]
    assert [(r["key"], r["batch"]) for r in rows if "GEMM ms/step" in r] == profiled
    chains = [ln for ln in out.splitlines() if ln.startswith("### ")]
    assert chains == [f"### vit batch 2 ({tmp_path / 'some' / 'vit-b2.chains.txt'})",
                      f"### rev batch 2 ({tmp_path / 'some' / 'rev-b2.chains.txt'})"]
    assert "op chains of rev at batch 2" in out and "op chains of vit-ckpt" not in out
    gemm = {(r["model"], r["batch"]): r["GEMM ms/step"] for r in _table(out)}
    assert gemm[("revcolv2_tiny reversible", "2")] == "1.0" and gemm[("revcolv2_tiny reversible", "4")] == ""


# ----------------------------------------------------------------------------- detection, segmentation
class _TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.sem_seg_head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)


@pytest.mark.parametrize("name,batch,size", [("detection", 3, 64), ("segmentation", 3, 96)])
def test_batch_and_size_are_what_the_workers_build_and_measure(name, batch, size, monkeypatch, capsys, tmp_path):
    """--batch B --size S of the detection and segmentation benchmarks: every model's worker
    (its real command line, run in this process) builds its model at S (detection: the square
    padding) and measures training and inference on B synthetic images of S x S with their
    targets at S x S; the report and the rows say so."""
    module = {"detection": detection, "segmentation": segmentation}[name]
    built, measured = [], []

    def build(label, *size_):
        built.append((label, *size_))
        return _TinyModel()

    def train_infer(model, opt, train_batch, test_batch, device, warmup, iters, **kw):
        targets = [r["instances"].gt_masks.tensor.shape[1:] if "instances" in r else r["sem_seg"].shape
                   for r in train_batch]
        measured.append({"train": [tuple(r["image"].shape) for r in train_batch], "targets": targets,
                         "test": [tuple(r["image"].shape) for r in test_batch], "device": device,
                         "steps": (warmup, iters)})
        return {"train s/step": 1.0, "saved activations (MB)": 10.0, "train CPU-s/step": 2.0,
                "fwd+bwd adds (MB)": 20.0, "infer img/s": 3.0, "infer img/CPU-s": 1.5}

    def run(cmd, capture_output, text):  # the worker's own command line, in this process
        stdout = io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(stdout):
            m.setattr(sys, "argv", [module.TOOL, *cmd[3:]])
            module.main()
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout.getvalue(), stderr="")

    monkeypatch.setattr(module, "build", build)
    monkeypatch.setattr(module, "detectron2_train_infer", train_infer)
    if module is detection:
        monkeypatch.setattr(module, "backbone_gflops", lambda backbone, s: float(s))
    monkeypatch.setattr(measure, "subprocess", SimpleNamespace(run=run))
    report, rows_path = tmp_path / "BENCHMARKS.md", tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", [module.TOOL, "--device", "cpu", "--batch", str(batch), "--size", str(size),
                                      "--warmup", "0", "--iters", "1", "--report", str(report), "--json",
                                      str(rows_path)])
    module.main()
    assert [b[0] for b in built] == module.MODELS
    if module is detection:
        assert {b[1] for b in built} == {size}  # the square padding
    for m in measured:
        assert m["train"] == m["test"] == [(3, size, size)] * batch, m
        assert m["targets"] == [(size, size)] * batch and m["steps"] == (0, 1)
    rows = json.loads(rows_path.read_text())
    assert [r["model"] for r in rows] == module.MODELS
    if module is detection:
        assert {r["backbone GFLOPs"] for r in rows} == {size}
    text = report.read_text()
    assert f"{size}x{size}" in text and f"batch {batch}," in text, text
    assert "| model |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- GPU targets
class _Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def _gpu_targets(argv, monkeypatch, capsys):
    """``gpu_targets.main()`` on the CPU: CUDA said to be there, the smoke check and each
    benchmark step stand-ins that take 100 s of a fake clock (one given less is stopped at
    its timeout, as ``subprocess.run`` does) and write
    the rows and table a real step writes. Returns the steps' calls ({name, cmd, timeout})
    and the printed text."""
    clock, calls = _Clock(), []
    img_s = {"vit": 100, "vit-ckpt": 80, "plain": 130, "rev": 110, "mae": 100}
    peak = {"vit": 20.0, "vit-ckpt": 10.0, "plain": 20.0, "rev": 2.5, "mae": 30.0}

    def run(cmd, stdout=None, stderr=None, text=None, timeout=None):
        if cmd[-1] == "--smoke":
            clock.now += 5
            return subprocess.CompletedProcess(cmd, 0)
        rows_path = cmd[cmd.index("--json") + 1]
        name = os.path.basename(rows_path)[:-len(".json")]
        calls.append({"name": name, "cmd": cmd, "timeout": timeout})
        took = 100
        if took > timeout:
            clock.now += timeout
            raise subprocess.TimeoutExpired(cmd, timeout, output=f"{name}: partial log")
        clock.now += took
        if name == "detection-b":
            rows = [{"model": "RevColV2-B reversible", "train time vs ViTDet": "1.10x",
                     "train memory vs ViTDet": "0.60x", "infer vs ViTDet": "0.90x"}]
        else:
            keys = cmd[cmd.index("--rows") + 1].split(",")
            batches = [int(b) for b in cmd[cmd.index("--batch-sizes") + 1].split(",")]
            rows = [{"key": k, "batch": b, "img/s": img_s[k.replace("-compiled", "")],
                     "peak GiB": peak[k.replace("-compiled", "")]} for b in batches for k in keys]
        with open(rows_path, "w") as f:
            json.dump(rows, f)
        return subprocess.CompletedProcess(cmd, 0, stdout=f"[{name}] measuring\n| model | batch |\n|---|---|\n"
                                                          f"| {name} table | 128 |\n")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Stand-in GPU")
    monkeypatch.setattr(gpu_targets, "time", SimpleNamespace(time=clock.time))
    monkeypatch.setattr(gpu_targets, "subprocess", SimpleNamespace(
        run=run, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(sys, "argv", ["benchmark_gpu_targets.py", *map(str, argv)])
    gpu_targets.main()
    return calls, capsys.readouterr().out


def test_gpu_targets_out_and_steps(tmp_path, monkeypatch, capsys):
    """--steps runs the named steps only (in the script's order; an unknown name is refused);
    --out holds each step's log and JSON rows, the profiled steps' op chains and the targets
    table, whose verdicts come from the steps that ran."""
    out = tmp_path / "targets"
    calls, printed = _gpu_targets(["--out", out, "--steps", "pretrain-b,backbone-b"], monkeypatch, capsys)
    assert [c["name"] for c in calls] == ["backbone-b", "pretrain-b"]
    for c in calls:
        cmd = c["cmd"]
        assert cmd[cmd.index("--json") + 1] == str(out / f"{c['name']}.json")
        assert cmd[cmd.index("--profile-dir") + 1] == str(out / "profile")
    assert sorted(p.name for p in out.iterdir()) == ["backbone-b.json", "backbone-b.log", "pretrain-b.json",
                                                     "pretrain-b.log", "targets.md"]
    assert "| backbone-b table | 128 |" in (out / "backbone-b.log").read_text()
    targets = (out / "targets.md").read_text()
    assert targets.startswith("| target (Stand-in GPU) |")
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in targets.splitlines()[2:]}
    assert lines["reversible RevColV2-B >= 1.30x ViT-B+ckpt, memory <= it (batch 512)"].endswith(
        "**1.38x**; peak 2.50 vs 10.00 GiB (0.25x) | met |")
    assert lines["MIM reversible >= 1.0x MAE, memory <= 0.4x MAE (batch 256)"].endswith("| met |")
    assert "not measured (backbone-l did not give both rows)" in targets and "Mask R-CNN" not in targets
    assert targets.strip() in printed

    calls, _ = _gpu_targets(["--out", tmp_path / "two", "--steps", "detection-b,compiled-b"], monkeypatch, capsys)
    assert [c["name"] for c in calls] == ["compiled-b", "detection-b"]
    assert not any("--profile-dir" in c["cmd"] for c in calls)
    assert "Mask R-CNN RevColV2-B reversible vs ViTDet-B" in (tmp_path / "two" / "targets.md").read_text()
    with pytest.raises(SystemExit, match="unknown steps \\['backbone'\\]"):
        _gpu_targets(["--out", tmp_path / "three", "--steps", "backbone"], monkeypatch, capsys)


def test_gpu_targets_budget_skips_the_steps_it_has_no_time_for(tmp_path, monkeypatch, capsys):
    """--budget-s: each step may take what is left of it (a step still running when it is spent
    is stopped, its log kept), and the steps that would start with less than 20 s left are
    skipped and said to be; a budget large enough runs every step."""
    out = tmp_path / "short"
    calls, printed = _gpu_targets(["--out", out, "--budget-s", 250], monkeypatch, capsys)
    # the smoke check takes 5 s, each step 100 s
    assert [(c["name"], c["timeout"]) for c in calls] == [("backbone-b", 245), ("pretrain-b", 145),
                                                          ("backbone-l", 45)]
    assert "[backbone-l] stopped: the budget ran out after 45 s" in printed
    assert (out / "backbone-l.log").read_text() == "backbone-l: partial log"
    assert not (out / "backbone-l.json").exists()
    for name in ("compiled-b", "detection-b"):
        assert f"[{name}] skipped: 250 s budget spent" in printed
        assert not (out / f"{name}.log").exists()
    assert "not measured (backbone-l did not give both rows)" in (out / "targets.md").read_text()

    calls, printed = _gpu_targets(["--out", tmp_path / "long", "--budget-s", 1000], monkeypatch, capsys)
    assert [c["name"] for c in calls] == [s[0] for s in gpu_targets.STEPS] and "skipped" not in printed
    assert [c["timeout"] for c in calls] == [995, 895, 795, 695, 595]


def test_gpu_targets_report_writes_the_targets_and_tables_to_path(tmp_path, monkeypatch, capsys):
    """Without --report nothing is written but --out; --report PATH writes the targets table
    and each step's tables to PATH as the current GPU run; --report alone, to
    docs/BENCHMARKS.md."""
    default = tmp_path / "docs" / "BENCHMARKS.md"
    monkeypatch.setattr(gpu_targets, "REPORT", str(default))
    steps = ["--steps", "backbone-b,detection-b"]
    _gpu_targets(["--out", tmp_path / "a", *steps], monkeypatch, capsys)
    assert not default.exists()
    path = tmp_path / "elsewhere.md"
    _gpu_targets(["--out", tmp_path / "b", *steps, "--report", path], monkeypatch, capsys)
    assert not default.exists()
    text = path.read_text()
    assert "### Reversible engine: the GPU targets (GPU)" in text
    assert f"- command: `python tools/benchmark_gpu_targets.py --out {tmp_path / 'b'} " in text
    assert (tmp_path / "b" / "targets.md").read_text().strip() in text
    assert "backbone-b:\n\n| model | batch |\n|---|---|\n| backbone-b table | 128 |" in text
    assert "detection-b:\n\n" in text and "pretrain-b:" not in text
    _gpu_targets(["--out", tmp_path / "c", *steps, "--report"], monkeypatch, capsys)
    assert "### Reversible engine: the GPU targets (GPU)" in default.read_text()
