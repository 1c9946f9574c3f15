"""tools/export.py: MIM, fine-tuned, linear-probe and detectron2 checkpoints -> a timm folder
that ``timm.create_model`` loads back with the same weights (after ``import revcolv2``), with
what is left out listed; ONNX (dynamo exporter, dynamic batch) checked under onnxruntime;
detectron2 models traced to TorchScript through detectron2's ``TracingAdapter``."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from training_helpers import randomize_parameters

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.classification import LinearProbe
from revcolv2.export import backbone_state_dict, export_onnx, export_to_folder
from revcolv2.mim import create_mim_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(embed_dim=32, num_heads=2)


def _levels(model, x):
    with torch.no_grad():
        return model.eval().forward_intermediates(x, intermediates_only=True)


def _assert_same_levels(a, b, x):
    la, lb = _levels(a, x), _levels(b, x)
    assert len(la) == len(lb) == 4
    for u, v in zip(la, lb):
        assert torch.equal(u, v)


def _mim_checkpoint():
    torch.manual_seed(0)
    mim = randomize_parameters(create_mim_model("revcolv2_tiny", **SMALL))  # norms, alphas: not their initial values
    return mim, {"model": mim.state_dict(), "epoch": 3, "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}


@pytest.mark.slow
def test_mim_checkpoint_round_trip(tmp_path, capsys):
    mim, ckpt = _mim_checkpoint()
    export_to_folder(ckpt, str(tmp_path))  # preset and sizes from the recorded config
    out = capsys.readouterr().out
    assert "left out: 5 pre-training-only tensors (mask_token, decoder_norm.{weight, bias}, " \
           "decoder_pred.{weight, bias})" in out
    assert f"`import revcolv2; timm.create_model('local-dir:{tmp_path}', pretrained=True)`" in out
    x = torch.randn(2, 3, 32, 32)
    # the folder holds every level: features_only reads the last column's four levels
    feats = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True).eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(feats(x), _levels(mim, x)))
    # the default model is the classifier: it takes the levels it builds, and its top level is the MIM's
    clf = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert clf.num_classes == 0 and clf.plan.pruned_levels()
    with torch.no_grad():
        assert torch.equal(clf.forward_features(x), _levels(mim, x)[3].flatten(2).transpose(1, 2))
    from_file = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=0, out_levels="all", **SMALL,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    _assert_same_levels(mim, from_file, x)


@pytest.mark.slow
def test_mim_checkpoint_round_trip_through_the_cli(tmp_path):
    mim, ckpt = _mim_checkpoint()
    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)  # what tools/pretrain.py writes: the weights plus the config that names the preset
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), str(path), "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "import revcolv2" in proc.stdout  # the load line names the import that registers the presets
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "revcolv2_tiny" and config["num_classes"] == 0
    assert config["model_args"]["embed_dim"] == 32 and "out_levels" not in config["model_args"]

    x = torch.randn(2, 3, 32, 32)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True, out_levels="all")
    _assert_same_levels(mim, from_dir, x)
    # a classifier on top of the exported backbone: the head is new, the backbone is the MIM's
    clf = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=10, **SMALL,
                            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0))
    with torch.no_grad():
        assert torch.equal(clf.eval().forward_features(x), _levels(mim, x)[3].flatten(2).transpose(1, 2))
    assert clf(x).shape == (2, 10)


def test_fine_tuned_classifier_keeps_its_head(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=5, **SMALL).eval()
    export_to_folder({"model_ema": model.state_dict()}, str(tmp_path), "revcolv2_tiny", SMALL, verbose=False)
    loaded = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=5, **SMALL,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"), num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
        assert torch.equal(model(x), timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(x))


def test_detectron2_checkpoint_exports_its_backbone(tmp_path, capsys):
    from revcolv2_d2.backbone import RevColV2Backbone

    torch.manual_seed(0)
    backbone = RevColV2Backbone("revcolv2_tiny", window_size=0, **SMALL)
    sd = {"backbone.bottom_up." + k: v for k, v in backbone.state_dict().items()}
    sd["backbone.fpn_lateral2.weight"] = torch.zeros(256, 8, 1, 1)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 1024)
    export_to_folder({"model": sd, "iteration": 10}, str(tmp_path), "revcolv2_tiny", SMALL)
    out = capsys.readouterr().out
    # the pyramid adapters (8 tensors), the FPN and the heads are not part of the RevColV2 model
    assert "left out: 10 tensors outside the RevColV2 model (backbone.bottom_up.to_strides.0.0.{weight, bias}" in out
    assert "backbone.fpn_lateral2.{weight}, roi_heads.box_predictor.cls_score.{weight})" in out
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), _levels(backbone.net, x)))


def test_linear_probe_checkpoint_lists_its_head(tmp_path, capsys):
    """A probe's head reads the last BU level, which timm's classifier has no head for: the
    export is the backbone, and the output says so, naming the head's tensors."""
    torch.manual_seed(0)
    probe = LinearProbe(timm.create_model("revcolv2_tiny", num_classes=0, reversible=False, **SMALL), 7)
    ckpt = {"model": probe.state_dict(), "epoch": 1,
            "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}
    model = export_to_folder(ckpt, str(tmp_path))
    out = capsys.readouterr().out
    assert "left out: the linear-probe head (head.0.{running_mean, running_var, num_batches_tracked}, " \
           "head.1.{weight, bias}; 7 classes)" in out
    assert "tools/linear_probe.py --eval" in out and "tensors outside" not in out
    assert model.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval().forward_bottom_up(x)[-1], probe.eval().backbone.forward_bottom_up(x)[-1])


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="patch embedding"):
        backbone_state_dict({"fpn.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="records no model name"):
        export_to_folder({"model": timm.create_model("revcolv2_tiny", **SMALL).state_dict()}, str(tmp_path))
    wide = timm.create_model("revcolv2_tiny", num_classes=0, embed_dim=64, num_heads=2).state_dict()
    with pytest.raises(ValueError, match="patch_embed.proj.weight.*different model size"):
        export_to_folder(wide, str(tmp_path), "revcolv2_tiny", SMALL, verbose=False)


# --------------------------------------------------------------------------- ONNX
@pytest.mark.slow  # the dynamo exporter takes about half a minute per model on a CPU
@pytest.mark.parametrize("head", [5, 0], ids=["classifier", "backbone"])
def test_onnx_matches_pytorch_under_onnxruntime_with_a_dynamic_batch(tmp_path, head):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = randomize_parameters(timm.create_model("revcolv2_tiny", num_classes=head, **SMALL)).eval()
    path = str(tmp_path / "model.onnx")
    worst = export_onnx(model, path, img_size=64, verbose=False)
    assert worst <= 1e-4
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.shape[0] for i in session.get_inputs()] == ["batch"]
    x = torch.randn(4, 3, 64, 64)  # a batch size neither exported nor checked by export_onnx
    got = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = [model(x)] if head else model.forward_intermediates(x, intermediates_only=True)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape) and (torch.from_numpy(g) - r).abs().max() <= 1e-4


@pytest.mark.slow
def test_onnx_through_the_cli(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("revcolv2_tiny", num_classes=3, **SMALL)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}, path)
    out = tmp_path / "model.onnx"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), str(path), "--format", "onnx",
                           "--output", str(out), "--img-size", "32"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and "logits (3 classes)" in proc.stdout and "onnxruntime matches PyTorch" in proc.stdout


# --------------------------------------------------------------------------- TorchScript (detectron2)
@pytest.mark.slow  # builds and traces the demo Mask R-CNN
def test_traced_mask_rcnn_demo_model_equals_eager(tmp_path):
    """tools/export.py --format torchscript on the demo config: traced on one image of its
    test dataset, equal to the eager model on three; the file then runs on its own."""
    from d2_helpers import DEMO_CONFIG, make_mini_shapes, run_tool
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import instantiate

    from revcolv2_d2.safe_config import load_lazy_config
    from revcolv2_d2.visualization import LazyPredictor, read_bgr

    datasets = tmp_path / "datasets"
    shapes = make_mini_shapes(str(datasets))
    cfg = load_lazy_config(DEMO_CONFIG)
    torch.manual_seed(0)  # an untrained model: its random scores still pass the 0.05 threshold
    DetectionCheckpointer(instantiate(cfg.model), save_dir=str(tmp_path)).save("model")
    ckpt, out = tmp_path / "model.pth", tmp_path / "ts"
    proc = run_tool([os.path.join(ROOT, "tools", "export.py"), str(ckpt), "--format", "torchscript",
                     "--config-file", DEMO_CONFIG, "--output", str(out), "--num-samples", "3"], str(datasets), 600)
    assert "traced outputs equal the eager model's on 3 images (largest difference 0)" in proc.stdout, proc.stdout

    traced = torch.jit.load(str(out / "model.ts"))  # no import of this project needed to run it
    predictor = LazyPredictor(cfg, str(ckpt), device="cpu")
    val = os.path.join(shapes, "val")
    image = predictor.prepare(read_bgr(os.path.join(val, sorted(os.listdir(val))[-1])))["image"]
    with torch.no_grad():
        boxes, classes, masks, scores, _ = traced(image)  # Instances fields in name order, then image size
        eager = predictor.model.inference([{"image": image}], do_postprocess=False)[0]
    assert len(scores) > 0
    assert torch.equal(boxes, eager.pred_boxes.tensor) and torch.equal(scores, eager.scores)
    assert torch.equal(classes, eager.pred_classes) and torch.equal(masks, eager.pred_masks)
