"""tools/export.py: MIM, fine-tuned and detectron2 checkpoints -> a timm folder that
``timm.create_model`` loads back with the same weights."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.export import backbone_state_dict, export_to_folder
from revcolv2.mim import create_mim_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(embed_dim=32, num_heads=2)


def _levels(model, x):
    with torch.no_grad():
        return model.eval().forward_intermediates(x, intermediates_only=True)


def _assert_same_levels(a, b, x):
    for u, v in zip(_levels(a, x), _levels(b, x)):
        assert torch.equal(u, v)


def test_mim_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    mim = create_mim_model("revcolv2_tiny", **SMALL)
    ckpt = {"model": mim.state_dict(), "epoch": 3, "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}
    export_to_folder(ckpt, str(tmp_path), verbose=False)  # preset and sizes from the recorded config
    x = torch.randn(2, 3, 32, 32)
    _assert_same_levels(mim, timm.create_model(f"local-dir:{tmp_path}", pretrained=True), x)
    from_file = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=0, **SMALL,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors")))
    _assert_same_levels(mim, from_file, x)


@pytest.mark.slow
def test_mim_checkpoint_round_trip_through_the_cli(tmp_path):
    torch.manual_seed(0)
    mim = create_mim_model("revcolv2_tiny", **SMALL)
    ckpt = tmp_path / "checkpoint-last.pth"
    # what tools/pretrain.py writes: the weights plus the config that names the preset
    torch.save({"model": mim.state_dict(), "epoch": 3,
                "config": {"model": {"name": "revcolv2_tiny", "kwargs": SMALL}}}, ckpt)
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export.py"), str(ckpt), "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "revcolv2_tiny" and config["num_classes"] == 0
    assert config["model_args"]["embed_dim"] == 32

    x = torch.randn(2, 3, 32, 32)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    _assert_same_levels(mim, from_dir, x)
    from_file = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=0, **SMALL,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    _assert_same_levels(mim, from_file, x)
    # a classifier on top of the exported backbone: the head is new, the backbone is the MIM's
    clf = timm.create_model("revcolv2_tiny", pretrained=True, num_classes=10, **SMALL,
                            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=0))
    _assert_same_levels(mim, clf, x)
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


def test_detectron2_checkpoint_exports_its_backbone(tmp_path):
    from revcolv2_d2.backbone import RevColV2Backbone

    torch.manual_seed(0)
    backbone = RevColV2Backbone("revcolv2_tiny", window_size=0, **SMALL)
    sd = {"backbone.bottom_up." + k: v for k, v in backbone.state_dict().items()}
    sd["backbone.fpn_lateral2.weight"] = torch.zeros(256, 8, 1, 1)
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(5, 1024)
    export_to_folder({"model": sd, "iteration": 10}, str(tmp_path), "revcolv2_tiny", SMALL, verbose=False)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    _assert_same_levels(backbone.net, loaded, torch.randn(1, 3, 64, 64))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="patch embedding"):
        backbone_state_dict({"fpn.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="records no model name"):
        export_to_folder({"model": timm.create_model("revcolv2_tiny", **SMALL).state_dict()}, str(tmp_path))
    wide = timm.create_model("revcolv2_tiny", num_classes=0, embed_dim=64, num_heads=2).state_dict()
    with pytest.raises(ValueError, match="patch_embed.proj.weight.*different model size"):
        export_to_folder(wide, str(tmp_path), "revcolv2_tiny", SMALL, verbose=False)


@pytest.mark.slow
def test_the_base_preset_loads_a_local_safetensors_file(tmp_path, monkeypatch):
    """The issue's line: timm.create_model("revcolv2_base", pretrained=True,
    pretrained_cfg_overlay=dict(file="model.safetensors")), on a real exported file."""
    torch.manual_seed(0)
    model = timm.create_model("revcolv2_base").eval()
    export_to_folder({"model": model.state_dict()}, str(tmp_path), "revcolv2_base", verbose=False)
    monkeypatch.chdir(tmp_path)  # the file named relative to the working directory, as in the issue
    loaded = timm.create_model("revcolv2_base", pretrained=True,
                               pretrained_cfg_overlay=dict(file="model.safetensors")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
