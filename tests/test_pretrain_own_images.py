"""Pre-training on your own images: ``--data-path`` as a flat folder (searched recursively) or
a text file of image paths, unreadable files skipped and counted; ``--init CKPT`` starts a new
run from a MIM, fine-tuned or detectron2 checkpoint (``revcolv2.checkpoint_models``)."""
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from training_helpers import REPO, TINY_MODEL, run_tool

from revcolv2.checkpoint import CheckpointError, ShapeMismatchError
from revcolv2.checkpoint_models import init_from_checkpoint
from revcolv2.data import ImageFiles, UnreadableImageError, list_image_files
from revcolv2.mim import create_mim_model

CONFIG = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


def write_flat_images(root: Path, count: int = 12) -> Path:
    """``count`` 40x40 images in nested folders without classes, plus a non-image file and
    a broken image."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        ext = ".png" if i % 3 else ".JPG"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"img{i:02d}{ext}", format="PNG" if ext == ".png" else "JPEG")
    (root / "notes.txt").write_text("not an image")
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


# ------------------------------------------------------------------------- the data
def test_a_flat_folder_is_searched_recursively(tmp_path):
    root = write_flat_images(tmp_path / "imgs")
    files = list_image_files(str(root))
    assert len(files) == 13 and files == sorted(files, key=lambda p: (Path(p).parent.as_posix(), p))
    assert not any(f.endswith("notes.txt") for f in files)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) of 13 in .*imgs: .*broken\.jpg"):
        ds = ImageFiles(str(root))
    assert len(ds) == 12 and len(ds.skipped) == 1
    image, target = ds[0]
    assert image.size == (40, 40) and image.mode == "RGB" and target == 0
    with pytest.raises(UnreadableImageError, match=r"1 unreadable image file\(s\) in .*strict data mode"):
        ImageFiles(str(root), strict=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnreadableImageError, match="no image files"):
        list_image_files(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such folder or image list"):
        list_image_files(str(tmp_path / "missing"))


def test_a_list_file_names_the_images(tmp_path):
    root = write_flat_images(tmp_path / "imgs")
    listing = tmp_path / "train.txt"
    listing.write_text("# my images\nimgs/a/img01.png\n\n" + str(root / "b" / "deeper" / "img00.JPG")
                       + "\nimgs/a/gone.png\n")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable .* of 3 in .*train\.txt: .*gone\.png"):
        ds = ImageFiles(str(listing))
    assert [Path(p).name for p, _ in ds.samples] == ["img01.png", "img00.JPG"]
    # with a large list the up-front decode is skipped: missing files are still dropped
    with pytest.warns(UserWarning, match="gone.png"):
        assert len(ImageFiles(str(listing), verify=False)) == 2


# ------------------------------------------------------------------------- --init
@pytest.fixture
def mim_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = create_mim_model("revcolv2_tiny", img_size=32, **TINY)
    path = tmp_path / "mim.pth"
    torch.save({"model": source.state_dict(), "config": {"model": {"name": "revcolv2_tiny", "kwargs": TINY}}}, path)
    return path, source


def test_init_from_a_mim_checkpoint_loads_encoder_and_decoder(mim_checkpoint):
    path, source = mim_checkpoint
    torch.manual_seed(2)
    model = create_mim_model("revcolv2_tiny", img_size=32, **TINY)
    lines = []
    report = init_from_checkpoint(model, str(path), log=lines.append)
    assert not report.missing and not report.unexpected
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert any(re.search(r"loaded (\d+) of the model's \1 tensors", line) for line in lines)


def test_init_from_a_classifier_loads_what_matches_and_lists_the_rest(tmp_path):
    classifier = timm.create_model("revcolv2_tiny", num_classes=5, img_size=32, **TINY)
    torch.save({"model": classifier.state_dict()}, tmp_path / "ft.pth")
    model = create_mim_model("revcolv2_tiny", img_size=32, **TINY)
    lines = []
    report = init_from_checkpoint(model, str(tmp_path / "ft.pth"), log=lines.append)
    text = "\n".join(lines)
    # the classifier builds only the top level of its TD column; it has no mask token or decoder
    assert {"mask_token", "decoder_pred.weight"} <= set(report.missing)
    assert any(k.startswith("columns.2.levels.0.") for k in report.missing)
    assert {"head.weight", "fc_norm.weight"} <= set(report.unexpected)
    assert "left at their initial values" in text and "decoder_pred.* (2)" in text
    assert "left out" in text and "head.* (2)" in text
    assert torch.equal(model.state_dict()["columns.0.levels.0.blocks.0.attn.qkv.weight"],
                       classifier.state_dict()["columns.0.levels.0.blocks.0.attn.qkv.weight"])


def test_init_from_a_detectron2_checkpoint_takes_its_backbone(mim_checkpoint, tmp_path):
    _, source = mim_checkpoint
    sd = {f"backbone.bottom_up.net.{k}": v for k, v in source.state_dict().items()
          if not k.startswith(("mask_token", "decoder"))}
    sd["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(4, 8)
    sd["backbone.fpn_lateral2.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save({"model": sd, "iteration": 10}, tmp_path / "d2.pth")
    model = create_mim_model("revcolv2_tiny", img_size=32, **TINY)
    lines = []
    report = init_from_checkpoint(model, str(tmp_path / "d2.pth"), log=lines.append)
    assert set(report.missing) == {"mask_token", "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight",
                                   "decoder_pred.bias"}
    assert set(report.unexpected) == {"roi_heads.box_predictor.cls_score.weight", "backbone.fpn_lateral2.weight"}
    assert any("below 'backbone.bottom_up.net.'" in line for line in lines)
    key = "columns.2.levels.0.blocks.0.mlp.fc1.weight"
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])


def test_init_from_another_size_names_the_tensor(mim_checkpoint, tmp_path):
    path, _ = mim_checkpoint
    model = create_mim_model("revcolv2_tiny", img_size=32, embed_dim=64, num_heads=2, patch_size=8)
    with pytest.raises(ShapeMismatchError, match=r"mim\.pth: checkpoint tensor '.*' has shape"):
        init_from_checkpoint(model, str(path), log=None)
    (tmp_path / "other.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        init_from_checkpoint(model, str(tmp_path / "other.pth"), log=None)


# ------------------------------------------------------------------------- end to end
def pretrain(data, out, *opts, extra=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_tool("pretrain", "--config", CONFIG, "--data-path", data, "--output-dir", out,
                        "--num-workers", "0", *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}",
                        "optim.batch_size=4", "train.batch_per_gpu=4", "schedule.epochs=1",
                        "schedule.warmup_epochs=0", "train.vis_every=1", "train.vis_images=2", *opts)


def _weights(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["model"], ckpt


@pytest.mark.slow  # tools/pretrain.py runs three times (a few seconds each)
def test_pretraining_on_a_flat_folder_then_init_from_its_checkpoint(tmp_path, capsys):
    flat = write_flat_images(tmp_path / "imgs")
    first = pretrain(flat, tmp_path / "first", "optim.base_lr=0.5")  # moves the weights off their seeded start
    out = capsys.readouterr().out
    assert f"12 training images in {flat}" in out  # 12 readable of 13, in nested folders
    assert len(first["history"]) == 3  # 12 images / batch 4
    assert Image.open(tmp_path / "first" / "reconstructions" / "epoch_0001.png").height > 32  # 2 rows
    ckpt = tmp_path / "first" / "checkpoint-0001.pth"

    # a list file works the same way
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(p for p in list_image_files(str(flat))[:8]))
    second = pretrain(listing, tmp_path / "second", "optim.base_lr=1e-12", "optim.weight_decay=0",
                      extra=("--init", ckpt, "--stop-at-step", "1"))
    out = capsys.readouterr().out
    assert re.search(rf"--init {re.escape(str(ckpt))}: loaded (\d+) of the model's \1 tensors", out)
    assert "training images in" in out and str(listing) in out
    assert sorted(second["history"]) == [1]  # a new run: step 1, not the first run's step 4
    start, _ = _weights(ckpt)
    after, state = _weights(tmp_path / "second" / (tmp_path / "second" / "last_checkpoint").read_text())
    assert state["step"] == 1 and _weights(ckpt)[1]["step"] == 3  # fresh schedule and optimizer state
    assert all(s["step"].item() == 1 for s in state["optimizer"]["state"].values())
    # one step at lr 1e-12 left the initial weights in place: they are the checkpoint's
    for k in ("columns.2.levels.0.blocks.0.attn.qkv.weight", "decoder_pred.weight", "mask_token"):
        assert torch.allclose(after[k], start[k], atol=1e-6), k
    fresh = pretrain(listing, tmp_path / "fresh", "optim.base_lr=1e-12", extra=("--stop-at-step", "1"))
    fresh_weights, _ = _weights(tmp_path / "fresh" / (tmp_path / "fresh" / "last_checkpoint").read_text())
    assert fresh["history"] and not torch.allclose(fresh_weights["decoder_pred.weight"], start["decoder_pred.weight"],
                                                   atol=1e-3)

    # the same command again continues the run: --init is not applied over it
    pretrain(listing, tmp_path / "second", "optim.base_lr=1e-12", "optim.weight_decay=0",
             extra=("--init", ckpt, "--resume", "auto"))
    assert "not applied: continuing the run" in capsys.readouterr().out


@pytest.mark.slow  # tools/pretrain.py starts
def test_init_from_another_size_stops_the_tool_in_one_line(mim_checkpoint, tmp_path):
    path, _ = mim_checkpoint  # embed_dim 32; the run below builds 64
    flat = write_flat_images(tmp_path / "imgs")
    with pytest.raises(SystemExit, match=r"^--init: .*mim\.pth: checkpoint tensor '.*' has shape .* but the model "
                                         r"expects"):
        pretrain(flat, tmp_path / "out", "model.kwargs={embed_dim: 64, num_heads: 2, patch_size: 8}",
                 extra=("--init", path))
