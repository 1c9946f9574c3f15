"""export_onnx on the smallest RevColV2 (one bottom-up and one top-down column, two levels,
width 8), in-process: its defaults (224 pixels, the logits of a classifier, the level maps of
a backbone, the line it prints and nothing else), the file onnxruntime reads (input 'images'
with a dynamic 'batch', the outputs' names and shapes, a batch size neither exported nor
checked), the folder it creates or reuses, and the check against PyTorch: a runtime that
differs by more than ``atol`` or returns another shape is an error naming the file, a
difference equal to ``atol`` passes. Each export runs the dynamo exporter (seconds on a CPU):
slow, and named in the mutation tool's row of revcolv2/export.py."""
import onnxruntime as ort
import pytest
import timm
import torch
from training_helpers import randomize_parameters

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.export import export_onnx

pytestmark = pytest.mark.slow  # the dynamo exporter: a few seconds per export on a CPU

TINY = dict(embed_dim=8, num_heads=1, num_levels=2, num_bu_columns=1, num_td_columns=1, blocks_per_level=1)


def _model(num_classes):
    torch.manual_seed(0)
    return randomize_parameters(timm.create_model("revcolv2_tiny", num_classes=num_classes, **TINY)).eval()


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_a_classifier_exports_its_logits_at_224_into_a_new_folder(tmp_path, capsys):
    model = _model(3)
    path = tmp_path / "export" / "model.onnx"  # export/ does not exist yet
    worst = export_onnx(model, str(path))  # every default: 224 pixels, logits, checked on batches 1 and 3
    assert 0 <= worst <= 1e-4
    # the one line, and nothing from the exporter or onnxruntime
    assert capsys.readouterr().out == (
        f"wrote {path}: logits (3 classes), input 'images' (batch dynamic, 3x224x224); "
        f"onnxruntime matches PyTorch to {worst:.2g} on batches (1, 3)\n")
    session = _session(path)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("images", ["batch", 3, 224, 224])]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("logits", ["batch", 3])]
    x = torch.randn(4, 3, 224, 224)  # a batch size neither exported nor checked
    (got,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(got) - model(x)).abs().max() <= 1e-4


def test_a_backbone_exports_its_level_maps_into_an_existing_folder(tmp_path, capsys):
    model = _model(0)
    path = tmp_path / "backbone.onnx"  # tmp_path exists already
    worst = export_onnx(model, str(path), img_size=32)  # features: by default for a model without classifier
    assert capsys.readouterr().out == (
        f"wrote {path}: the 2 level maps (level0, level1), input 'images' (batch dynamic, 3x32x32); "
        f"onnxruntime matches PyTorch to {worst:.2g} on batches (1, 3)\n")
    session = _session(path)
    assert [(o.name, o.shape) for o in session.get_outputs()] == [("level0", ["batch", 8, 2, 2]),
                                                                  ("level1", ["batch", 8, 2, 2])]
    x = torch.randn(4, 3, 32, 32)
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(ref) == 2
    assert all((torch.from_numpy(g) - r).abs().max() <= 1e-4 for g, r in zip(got, ref))


class _Runtime(ort.InferenceSession):
    """onnxruntime with its outputs changed by ``change`` (a runtime that computes wrongly)."""

    change = staticmethod(lambda out: out)

    def run(self, *args, **kwargs):
        return [self.change(o) for o in super().run(*args, **kwargs)]


def test_a_runtime_differing_by_more_than_atol_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(_Runtime, "change", staticmethod(lambda out: out + 1e-3))
    monkeypatch.setattr(ort, "InferenceSession", _Runtime)
    path = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError) as e:
        export_onnx(_model(3), str(path), img_size=16, verbose=False)  # the default atol, 1e-4
    assert str(e.value) == f"{path}: onnxruntime differs from PyTorch by 0.001 (> 0.0001) on batches (1, 3)"


def test_a_runtime_giving_another_shape_is_an_error_naming_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(_Runtime, "change", staticmethod(lambda out: out[:, :2]))
    monkeypatch.setattr(ort, "InferenceSession", _Runtime)
    path = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError) as e:  # features=True: a classifier's level maps, not its logits
        export_onnx(_model(3), str(path), img_size=16, features=True, verbose=False)
    assert str(e.value) == (f"{path}: output level0 has shape (1, 2, 1, 1) under onnxruntime, "
                            "PyTorch gives (1, 8, 1, 1) (batch 1)")


def test_a_difference_equal_to_atol_passes(tmp_path):
    model = _model(3)
    with torch.no_grad():  # a zero head: logits exactly 0 in PyTorch and onnxruntime alike
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert export_onnx(model, str(tmp_path / "m.onnx"), img_size=16, atol=0.0, verbose=False) == 0.0
