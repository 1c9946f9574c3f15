"""The benchmark package ``revcolv2_bench``: its measurement of detectron2 models (what
benchmark_detection.py and benchmark_segmentation.py report), on the tiny demo Mask R-CNN on
the CPU, how the step benchmarks' ``--profile-dir`` sorts kernels by kind, the report editor
the GPU targets' verdicts, and that the tools are only entry points."""
import ast
from pathlib import Path

import pytest
import torch
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES

from revcolv2_bench import gpu_targets, profiling, report
from revcolv2_bench.detection import synthetic_batch
from revcolv2_bench.detectron2_runs import detectron2_train_infer

SIZE = 64
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_mask_rcnn():
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(DEMO_CONFIG)
    # synthetic_batch draws COCO's 80 classes
    model_overrides = [o for o in TINY_OVERRIDES if o.startswith("model.") and "square_pad" not in o]
    cfg = LazyConfig.apply_overrides(cfg, model_overrides + ["model.roi_heads.num_classes=80",
                                                             f"model.backbone.square_pad={SIZE}",
                                                             f"model.backbone.bottom_up.square_pad={SIZE}"])
    torch.manual_seed(0)
    return instantiate(cfg.model)


class _Entered:
    def __init__(self):
        self.enters, self.inside = 0, False

    def __enter__(self):
        self.enters += 1
        self.inside = True
        return self

    def __exit__(self, *exc):
        self.inside = False


@pytest.mark.slow
def test_train_and_infer_figures_on_cpu(tiny_mask_rcnn):
    model = tiny_mask_rcnn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder, seen = _Entered(), []

    def after_training(step_seconds):
        assert model.training and not recorder.inside  # between training and inference
        seen.append(step_seconds)
        return {"extra": 1}

    out = detectron2_train_infer(
        model, opt, synthetic_batch(1, SIZE, "cpu", with_targets=True), synthetic_batch(1, SIZE, "cpu", False),
        "cpu", warmup=0, iters=1, record_forward=recorder, after_training=after_training, infer_cpu_digits=3)

    # the CPU columns, in the order the tables and the progress lines show them
    assert list(out) == ["train s/step", "saved activations (MB)", "train CPU-s/step", "fwd+bwd adds (MB)",
                         "extra", "infer img/s", "infer img/CPU-s"]
    assert all(out[k] > 0 for k in out), out
    assert recorder.enters == 1 and seen == [pytest.approx(out["train s/step"], abs=1e-3)]
    # training steps ran (the optimizer moved the weights); the model is left evaluating with no gradients
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_ratio_columns_use_cpu_time_on_cpu_and_wall_time_on_cuda():
    rows = [{"train s/step": 1.0, "train CPU-s/step": 4.0, "infer img/s": 2.0, "infer img/CPU-s": 1.0,
             "train peak GPU mem (GiB)": 3.0, "fwd+bwd adds (MB)": 30.0},
            {"train s/step": 2.0, "train CPU-s/step": 2.0, "infer img/s": 1.0, "infer img/CPU-s": 4.0,
             "train peak GPU mem (GiB)": 1.5, "fwd+bwd adds (MB)": 10.0}]
    cols = report.add_ratio_columns(rows, rows[1], "Ref", cuda=False)
    assert cols == ("train CPU-s/step", "infer img/CPU-s", "fwd+bwd adds (MB)")
    assert (rows[0]["train time vs Ref"], rows[0]["train memory vs Ref"], rows[0]["infer vs Ref"]) == \
        ("2.00x", "3.00x", "0.25x")
    assert rows[1]["train time vs Ref"] == rows[1]["infer vs Ref"] == "1.00x"
    report.add_ratio_columns(rows, rows[1], "Ref", cuda=True)
    assert (rows[0]["train time vs Ref"], rows[0]["train memory vs Ref"], rows[0]["infer vs Ref"]) == \
        ("0.50x", "2.00x", "2.00x")


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
     "__5x_cublas", "GEMM"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "GEMM"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128>>(Params)",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)"
     "::{lambda()#3}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul> >(int, ...)", "other"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>(...)", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, ...>>>",
     "other"),
    ("aten::addmm", "GEMM"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::add_", "other"), ("aten::native_layer_norm", "other"),
])
def test_profiled_kernels_are_sorted_by_kind(name, kind):
    """``--profile-dir`` splits a step's kernel time into GEMM / attention / other by name."""
    assert profiling.kernel_kind(name) == kind


def _op(tid, ts, dur, name):
    return {"cat": "cpu_op", "ph": "X", "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_op_chains_attribute_cuda_kernels_to_the_ops_that_launched_them():
    """Each kernel is charged to the CPU ops enclosing its launch (matched by correlation id),
    innermost ``depth`` of them, outermost first; rows are per step and largest first."""
    def launch(tid, ts, corr):
        return {"cat": "cuda_runtime", "ph": "X", "tid": tid, "ts": ts, "dur": 1, "name": "cudaLaunchKernel",
                "args": {"correlation": corr}}

    def kernel(corr, dur, name):
        return {"cat": "kernel", "ph": "X", "tid": 7, "ts": 1000 + corr, "dur": dur, "name": name,
                "args": {"correlation": corr}}

    events = [
        _op(1, 0, 100, "_LevelStep"), _op(1, 10, 40, "aten::layer_norm"), _op(1, 12, 30, "aten::native_layer_norm"),
        launch(1, 20, 1), kernel(1, 3000, "vectorized_layer_norm_kernel<float>"),
        _op(1, 60, 30, "aten::linear"), launch(1, 70, 2), kernel(2, 8000, "nvjet_tst_128x256_h_bz"),
        # the same chain again in the second step: launches add up
        _op(1, 200, 100, "_LevelStep"), _op(1, 210, 40, "aten::layer_norm"), _op(1, 212, 30, "aten::native_layer_norm"),
        launch(1, 220, 3), kernel(3, 1000, "vectorized_layer_norm_kernel<float>"),
        _op(2, 0, 50, "aten::add"), launch(2, 5, 4), kernel(4, 500, "elementwise_kernel"),
    ]
    rows = profiling.op_chains({"traceEvents": events}, steps=2, depth=2)
    assert rows == [(4.0, 0, "GEMM", "_LevelStep > aten::linear"),
                    (2.0, 1, "other", "aten::layer_norm > aten::native_layer_norm"),
                    (0.25, 0, "other", "aten::add")]
    text = profiling.format_op_chains(rows, top=2)
    assert "kernel ms/step 6.25" in text and "aten::add" not in text


def test_op_chains_of_a_cpu_trace_use_the_innermost_aten_ops(tmp_path):
    from torch.profiler import ProfilerActivity, profile

    w = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            torch.nn.functional.layer_norm(torch.randn(32, 64) @ w, (64,))
    path = str(tmp_path / "trace.json")
    prof.export_chrome_trace(path)
    import json

    with open(path) as f:
        rows = profiling.op_chains(json.load(f), steps=2)
    chains = {chain: (n, kind) for _, n, kind, chain in rows}
    mm = [c for c in chains if c.endswith("aten::mm")]
    norm = [c for c in chains if c.endswith("aten::native_layer_norm")]
    assert mm and chains[mm[0]] == (1, "GEMM")
    assert norm and chains[norm[0]][1] == "other" and norm[0].startswith("aten::layer_norm")


def test_report_replaces_the_current_table_and_keeps_the_old_one_in_the_history(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "machine_description", lambda device: f"a {device} machine")
    path = str(tmp_path / "BENCHMARKS.md")
    command = "python tools/benchmark_backbone.py"
    key = report.update_report(path, "Backbone step", command, "cpu", "| a |\n|---|\n| 1 |")
    assert key == "Backbone step (CPU)"
    report.update_report(path, "Backbone step", command, "cuda", "| a |\n|---|\n| 5 |")
    report.update_report(path, "Backbone step", command, "cpu", "| a |\n|---|\n| 2 |")
    text = open(path).read()
    current, history = text.split(report.HISTORY_HEADING)
    # one current table per benchmark and machine kind, the newest
    assert current.count("### Backbone step (CPU)") == 1 and current.count("### Backbone step (GPU)") == 1
    assert "| 2 |" in current and "| 1 |" not in current and "| 5 |" in current
    # the replaced run is kept, whole, below
    assert history.count("### Backbone step (CPU)") == 1 and "| 1 |" in history
    assert text.count("<!-- report: Backbone step (CPU) -->") == 1


def test_gpu_targets_table_judges_speed_and_memory_from_the_measured_rows():
    rows = {"backbone-b": [
        {"key": "rev", "batch": 128, "img/s": 2600.0, "peak GiB": 2.80},
        {"key": "vit-ckpt", "batch": 128, "img/s": 2000.0, "peak GiB": 2.86},
        {"key": "rev", "batch": 512, "img/s": 2700.0, "peak GiB": 8.50},  # faster, but more memory
        {"key": "vit-ckpt", "batch": 512, "img/s": 2000.0, "peak GiB": 8.28},
        {"key": "plain", "batch": 128, "img/s": 2900.0, "peak GiB": 7.0},
        {"key": "vit", "batch": 128, "img/s": 2400.0, "peak GiB": 9.5},
    ], "pretrain-b": [{"key": "rev", "batch": 256, "error": "out of memory"}, {"key": "mae", "batch": 256}]}
    lines = {ln.split(" | ")[0].lstrip("| "): ln for ln in gpu_targets.targets_table(rows, "card").splitlines()[2:]}
    verdict = {k.split(" (")[0] + (" 512" if "512" in k else ""): ln.rsplit("|", 2)[-2].strip()
               for k, ln in lines.items()}
    assert verdict["reversible RevColV2-B >= 1.30x ViT-B+ckpt, memory <= it"] == "met"  # 1.30x, 0.98x memory
    assert verdict["reversible RevColV2-B >= 1.30x ViT-B+ckpt, memory <= it 512"] == "missed"  # 1.35x, 1.03x
    assert verdict["plain RevColV2-B >= 1.25x ViT-B"] == "missed"  # 1.21x
    assert verdict["MIM reversible >= 1.0x MAE, memory <= 0.4x MAE"] == "-"  # a failed row is not measured
    assert "not measured" in lines["compiled plain RevColV2-B >= 1.30x compiled ViT-B (batch 128)"]


BENCHMARK_TOOLS = {"benchmark_backbone": "backbone", "benchmark_pretrain": "pretrain",
                   "benchmark_detection": "detection", "benchmark_segmentation": "segmentation",
                   "benchmark_gpu_targets": "gpu_targets", "benchmark_activation_peak": "activation_peak",
                   "benchmark_loader": "loader"}


@pytest.mark.parametrize("tool", sorted(BENCHMARK_TOOLS))
def test_benchmark_tool_is_a_docstring_an_import_and_main(tool):
    """The code of a benchmark is in the package; its tool names the usage and calls ``main``."""
    tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
    assert f"python tools/{tool}.py" in ast.get_docstring(tree)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [
        (f"revcolv2_bench.{BENCHMARK_TOOLS[tool]}", ["main"])]
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    assert not defs, f"tools/{tool}.py defines {[getattr(d, 'name', '=') for d in defs]}: belongs in the package"


def test_no_tool_is_longer_than_150_lines():
    long = {p.name: n for p in (REPO / "tools").glob("*.py") if (n := len(p.read_text().splitlines())) > 150}
    assert not long, f"tools/ holds entry points; move the code of {long} into a package"
