"""Silent wrong results of the training entry points become errors that name the key, file
or folder: numbers, mask_ratio, 16-bit PNGs, train/val class names."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.config import check_number
from revcolv2.data import load_rgb
from revcolv2.mim import create_mim_model

PRETRAIN = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
FINETUNE = REPO / "configs" / "finetune" / "revcolv2_tiny_demo.yaml"
PROBE = REPO / "configs" / "linear_probe" / "revcolv2_tiny_demo.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))


def pretrain(data, out, *opts, extra=()):
    return run_tool(
        "pretrain", "--config", PRETRAIN, "--data-path", data, "--output-dir", out, "--num-workers", "0",
        *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
        "train.batch_per_gpu=8", "train.vis_images=0", "schedule.epochs=1", *opts,
    )


@pytest.mark.parametrize("override, key", [
    ("schedule.epochs=1.5", "schedule.epochs"),
    ("schedule.epochs=abc", "schedule.epochs"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("optim.batch_size=-8", "optim.batch_size"),
    ("optim.base_lr=fast", "optim.base_lr"),
    ("optim.base_lr=-1e-3", "optim.base_lr"),
    ("train.batch_per_gpu=0", "train.batch_per_gpu"),
    ("train.keep_last=-1", "train.keep_last"),
])
def test_bad_numbers_in_the_config_name_their_key(data, tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        pretrain(data, tmp_path, override)
    assert not (tmp_path / "config.yaml").exists()  # refused before anything was written


@pytest.mark.parametrize("tool, config", [("finetune", FINETUNE), ("linear_probe", PROBE)])
def test_bad_numbers_in_classification_configs(data, tmp_path, tool, config):
    with pytest.raises(ValueError, match=r"schedule\.epochs"):
        run_tool(tool, "--config", config, "--data-path", data, "--output-dir", tmp_path,
                 "--opts", "schedule.epochs=2.5")


@pytest.mark.parametrize("flag, value", [("--batch-per-gpu", "0"), ("--batch-per-gpu", "-4"),
                                         ("--batch-per-gpu", "2.5"), ("--num-workers", "-1")])
def test_bad_numbers_on_the_command_line_are_usage_errors(data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        pretrain(data, tmp_path, extra=(flag, value))
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_whole_floats_are_taken_as_integers():
    assert check_number(2.0, "schedule.epochs") == 2 and isinstance(check_number(2.0, "x"), int)
    assert check_number(0, "x", "nonneg_int") == 0
    with pytest.raises(ValueError, match="x must be a whole number"):
        check_number(True, "x")


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.99, 1.0, -0.5])
def test_mask_ratio_leaving_no_masked_or_no_visible_patch_is_refused(ratio):
    # 32x32 images, 8x8 patches: 16 patches; 0.01 masks none of them, 0.99 leaves none visible
    with pytest.raises(ValueError, match="mask_ratio"):
        create_mim_model("revcolv2_tiny", img_size=32, mask_ratio=ratio, embed_dim=32, num_heads=2, patch_size=8)


def test_mask_ratio_0_is_refused_by_pretraining(data, tmp_path):
    with pytest.raises(ValueError, match="mask_ratio"):
        pretrain(data, tmp_path, "model.mask_ratio=0")


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # what Pillow makes of it
    rgb = np.asarray(load_rgb(str(tmp_path / "deep.png"))).astype(np.float64)
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=0.51)
    assert (rgb == 255).mean() < 0.01 and abs(rgb.mean() - 127.5) < 1.0


@pytest.mark.parametrize("tool, config", [("finetune", FINETUNE), ("linear_probe", PROBE)])
def test_train_and_val_with_different_class_names_are_refused(data, tmp_path, tool, config):
    root = tmp_path / "data"
    shutil.copytree(data, root)
    val_classes = sorted(p.name for p in (root / "val").iterdir())
    (root / "val" / val_classes[0]).rename(root / "val" / "zz_renamed")  # same count, other names
    with pytest.raises(ValueError, match="zz_renamed"):
        run_tool(tool, "--config", config, "--data-path", root, "--output-dir", tmp_path / "out",
                 "--num-workers", "0", "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}",
                 "optim.batch_size=8", "train.batch_per_gpu=8", "train.eval_batch=8", "schedule.epochs=1")
