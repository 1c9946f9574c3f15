"""tools/export.py: an ONNX file goes into a folder that does not exist yet (created, as
every output of the project); an --img-size the model cannot take is one line before the
exporter runs; no output replaces the checkpoint it reads."""
import importlib.util
import os
import subprocess
import sys

import pytest
import timm
import torch

import revcolv2  # noqa: F401  (registers the presets)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(embed_dim=32, num_heads=2)


def _classifier_checkpoint(path):
    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=3, **SMALL)
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}, path)
    return path


def _export(*argv):
    """tools/export.py's main() in this process (loaded from its file: tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("export_tool", os.path.join(ROOT, "tools", "export.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main([str(a) for a in argv])


def test_an_img_size_the_model_cannot_take_is_one_line_before_exporting(tmp_path, monkeypatch):
    def exporter_runs(*args, **kwargs):
        raise AssertionError("the exporter ran before the input size was checked")

    monkeypatch.setattr(torch.onnx, "export", exporter_runs)
    ckpt = _classifier_checkpoint(tmp_path / "checkpoint-best.pth")
    with pytest.raises(SystemExit) as e:
        _export(ckpt, "--format", "onnx", "--output", tmp_path / "m.onnx", "--img-size", "40")
    msg = str(e.value)
    assert "--img-size 40 is not divisible by the patch size 16" in msg and "--img-size 48" in msg, msg
    assert "\n" not in msg and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt", ["onnx", "timm"])
def test_no_output_replaces_the_checkpoint(tmp_path, fmt):
    ckpt = _classifier_checkpoint(tmp_path / ("model.safetensors" if fmt == "timm" else "checkpoint-best.pth"))
    before = ckpt.read_bytes()
    output = tmp_path if fmt == "timm" else ckpt
    with pytest.raises(SystemExit, match="would replace the input"):
        _export(ckpt, "--format", fmt, "--output", output)
    assert ckpt.read_bytes() == before


@pytest.mark.slow  # the dynamo exporter takes about half a minute on a CPU
def test_the_readmes_onnx_example_creates_its_folder(tmp_path):
    ckpt = _classifier_checkpoint(tmp_path / "checkpoint-best.pth")
    out = tmp_path / "export" / "revcolv2_base.onnx"  # export/ does not exist yet
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), str(ckpt), "--format", "onnx",
                           "--output", str(out), "--img-size", "32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and "onnxruntime matches PyTorch" in proc.stdout
