"""Checkpoints written before structure v2 (tests/fixtures/pre_v2, commit 566b9ce) still load
and compute what they computed then: a classifier, a MIM model (and its training state,
which resumes), and a detectron2 Mask R-CNN."""
import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from training_helpers import REPO, run_tool, tiny_dataset

import revcolv2
from revcolv2.checkpoint import load_file
from revcolv2.mim import create_mim_model

FIXTURES = Path(__file__).parent / "fixtures" / "pre_v2"
SIZE = dict(embed_dim=16, num_heads=2, patch_size=8)
SIZE_YAML = "{embed_dim: 16, num_heads: 2, patch_size: 8}"
# the demo Mask R-CNN config shrunk to the fixture's size
D2_OVERRIDES = json.loads((FIXTURES / "mask_rcnn_overrides.json").read_text())


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "reference_outputs.pt", weights_only=True)


def test_finetuned_classifier_gives_the_same_logits(ref):
    model = timm.create_model("revcolv2_tiny", num_classes=4, img_size=32, **SIZE).eval()
    report = revcolv2.load_checkpoint(model, FIXTURES / "finetune_checkpoint-best.pth", verbose=False)
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        torch.testing.assert_close(model(ref["images"]), ref["finetune_logits"], rtol=1e-5, atol=1e-6)


def test_mim_checkpoint_gives_the_same_reconstruction(ref):
    model = create_mim_model("revcolv2_tiny", img_size=32, **SIZE).eval()
    model.load_state_dict(load_file(FIXTURES / "pretrain_checkpoint-last.pth")["model"])
    with torch.no_grad():
        out = model(ref["images"], visible_ids=ref["mim_ids_keep"])
    torch.testing.assert_close(out["pred"], ref["mim_pred"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ref["mim_loss"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_mim_training_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(FIXTURES / "pretrain_checkpoint-last.pth", out / "checkpoint-last.pth")
    (out / "last_checkpoint").write_text("checkpoint-last.pth")
    data = tiny_dataset(tmp_path / "data")  # 32 images: the 4 steps per epoch it was written with
    result = run_tool(
        "pretrain", "--config", REPO / "configs/pretrain/revcolv2_tiny_demo.yaml", "--data-path", data,
        "--output-dir", out, "--resume", "auto", "--num-workers", "0", "--device", "cpu", "--opts",
        f"model.kwargs={SIZE_YAML}", "data.input_size=32", "optim.batch_size=8", "train.batch_per_gpu=4",
        "schedule.epochs=2", "schedule.warmup_epochs=1", "train.vis_images=0")
    assert sorted(result["history"]) == [6, 7, 8]  # steps 6-8 after the saved step 5
    assert result["trainer"].step == 8 and (out / "checkpoint-0002.pth").is_file()


def test_detectron2_checkpoint_gives_the_same_features(ref):
    from detectron2.config import instantiate

    from revcolv2_d2.checkpoint import RevColV2Checkpointer
    from revcolv2_d2.safe_config import load_lazy_config
    from revcolv2_d2.train_net import apply_overrides

    cfg = load_lazy_config(str(REPO / "projects/RevColV2/configs/demo/mask_rcnn_revcolv2_tiny_shapes.py"))
    model = instantiate(apply_overrides(cfg, D2_OVERRIDES).model).eval()
    incompatible = RevColV2Checkpointer(model).load(str(FIXTURES / "mask_rcnn_model_final.pth"))
    assert incompatible["iteration"] == 9
    with torch.no_grad():
        feats = model.backbone(ref["d2_image"])
    for name, value in feats.items():
        torch.testing.assert_close(value, ref["d2_fpn_" + name], rtol=1e-5, atol=1e-6)
