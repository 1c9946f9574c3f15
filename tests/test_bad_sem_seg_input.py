"""Bad semantic-segmentation inputs give a clear error naming the file (training and test
mappers), and the ADE20K conversion script refuses what it cannot convert."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import transforms as T
from PIL import Image

from revcolv2_d2.data.ade20k import SemSegDatasetMapper

NUM_CLASSES = 6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO, "tools", "prepare_ade20k_sem_seg.py")


def write_pair(tmp_path, label, image_hw=(32, 48), name="x"):
    image_file, label_file = tmp_path / f"{name}.jpg", tmp_path / f"{name}.png"
    Image.fromarray(np.full((*image_hw, 3), 128, np.uint8)).save(image_file)
    Image.fromarray(label).save(label_file)
    return {"file_name": str(image_file), "sem_seg_file_name": str(label_file)}


def mapper(is_train):
    return SemSegDatasetMapper(is_train, augmentations=[T.RandomFlip()], image_format="RGB",
                               num_classes=NUM_CLASSES, ignore_label=255)


@pytest.mark.parametrize("is_train", [True, False])
def test_valid_label_with_ignore_pixels_is_mapped(tmp_path, is_train):
    label = np.zeros((32, 48), np.uint8)
    label[:, 10:] = NUM_CLASSES - 1
    label[:4] = 255
    out = mapper(is_train)(write_pair(tmp_path, label))
    assert out["image"].shape == (3, 32, 48)
    assert set(out["sem_seg"].unique().tolist()) == {0, NUM_CLASSES - 1, 255}


@pytest.mark.parametrize("is_train", [True, False])
def test_label_size_differs_from_image(tmp_path, is_train):
    d = write_pair(tmp_path, np.zeros((32, 40), np.uint8), image_hw=(32, 48), name="wrong_size")
    with pytest.raises(ValueError, match=r"wrong_size\.png is 40x32 .*wrong_size\.jpg is 48x32"):
        mapper(is_train)(d)


@pytest.mark.parametrize("is_train", [True, False])
def test_label_value_above_class_count(tmp_path, is_train):
    label = np.zeros((32, 48), np.uint8)
    label[0, 0] = 255  # fine
    label[5, 5] = NUM_CLASSES  # one too many
    label[6, 6] = 200
    d = write_pair(tmp_path, label, name="bad_values")
    with pytest.raises(ValueError, match=r"bad_values\.png has values \[6, 200\]"):
        mapper(is_train)(d)


def test_colour_label_png(tmp_path):
    d = write_pair(tmp_path, np.zeros((32, 48, 3), np.uint8), name="colour")
    with pytest.raises(ValueError, match=r"colour\.png .*single-channel"):
        mapper(True)(d)


def _fake_release(root, label, image_hw=(20, 30)):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((*image_hw, 3), np.uint8)).save(root / "images" / split / "a.jpg")
        Image.fromarray(label, mode="L").save(root / "annotations" / split / "a.png")


def prepare(root) -> subprocess.CompletedProcess:
    """Run tools/prepare_ade20k_sem_seg.py on ``root`` as a script (numpy + PIL: starts fast)."""
    return subprocess.run([sys.executable, PREPARE, "--root", str(root)], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_prepare_script_shifts_labels_and_maps_other_to_255(tmp_path):
    label = np.array([[0, 1, 150]], np.uint8).repeat(20, 0).repeat(10, 1)  # 20x30
    _fake_release(tmp_path, label)
    proc = prepare(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = np.asarray(Image.open(tmp_path / "annotations_detectron2" / "validation" / "a.png"))
    assert out.shape == (20, 30)
    assert out[0, 0] == 255 and out[0, 10] == 0 and out[0, 29] == 149


def _one_line_error(proc) -> str:
    """The script stopped with status 1 and one line on stderr (no traceback); returns it."""
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_prepare_script_rejects_values_above_150(tmp_path):
    _fake_release(tmp_path, np.full((20, 30), 151, np.uint8))
    assert re.search(r"a\.png: value 151 above the 150 ADE20K classes", _one_line_error(prepare(tmp_path)))


@pytest.mark.slow
def test_prepare_script_rejects_a_label_of_another_size(tmp_path):
    _fake_release(tmp_path, np.ones((20, 31), np.uint8))
    assert re.search(r"a\.png: label is 31x20 but .*a\.jpg is 30x20", _one_line_error(prepare(tmp_path)))


@pytest.mark.slow
def test_prepare_script_names_an_unreadable_label(tmp_path):
    _fake_release(tmp_path, np.ones((20, 30), np.uint8))
    (tmp_path / "annotations" / "training" / "a.png").write_bytes(b"\x89PNG but cut short")
    assert str(tmp_path / "annotations" / "training" / "a.png") in _one_line_error(prepare(tmp_path))
