"""COCO-format input checks on any dataset the configs use (coco_2017_* included): bad boxes,
empty segmentations, malformed files, each named with the file and annotation id, before
training starts; the built-in dataset folder is never deleted."""
import json
import logging
import os
import subprocess
import sys

import pytest

from d2_helpers import MINI_SPLITS, ROOT
from revcolv2_d2.data.coco_checks import CocoInputError, validate_coco_instances_json
from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes, synthetic_shapes_paths


def coco(annotations):
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }


def ann(i, bbox=(1, 1, 4, 4), **extra):
    return dict({"id": i, "image_id": 1, "category_id": 1, "bbox": list(bbox), "area": 16, "iscrowd": 0,
                 "segmentation": [[1, 1, 5, 1, 5, 5]]}, **extra)


def write(tmp_path, content, name="instances.json"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


@pytest.mark.parametrize("bbox, why", [((1, 1, -4, 4), "negative width or height"),
                                       ((1, 1, 4, -0.5), "negative width or height"),
                                       ((1, 1, 4), "four finite numbers"),
                                       ((1, 1, float("nan"), 4), "four finite numbers"),
                                       ((1, "1", 4, 4), "four finite numbers")])
def test_bad_boxes_are_rejected_with_the_annotation_id(tmp_path, bbox, why):
    path = write(tmp_path, coco([ann(1), ann(7, bbox=bbox)]))
    with pytest.raises(CocoInputError, match=why) as e:
        validate_coco_instances_json(path)
    assert path in str(e.value) and "annotation id 7" in str(e.value)


def test_zero_size_boxes_are_counted_and_warned(tmp_path, caplog):
    path = write(tmp_path, coco([ann(1), ann(2, bbox=(1, 1, 0, 4)), ann(3, bbox=(1, 1, 4, 0))]))
    with caplog.at_level(logging.WARNING):
        validate_coco_instances_json(path)
    assert "2 annotation(s) with a zero-width or zero-height box (ids [2, 3]" in caplog.text and path in caplog.text


@pytest.mark.parametrize("segm", [[], {}, None])
def test_empty_segmentation_is_rejected_with_the_annotation_id(tmp_path, segm):
    path = write(tmp_path, coco([ann(1), ann(5, segmentation=segm)]))
    with pytest.raises(CocoInputError, match="annotation id 5 has an empty segmentation"):
        validate_coco_instances_json(path)


def test_rle_without_counts_is_rejected(tmp_path):
    path = write(tmp_path, coco([ann(3, segmentation={"size": [10, 10]})]))
    with pytest.raises(CocoInputError, match="annotation id 3 has an RLE segmentation"):
        validate_coco_instances_json(path)


def _load_coco_2017_val(datasets):
    code = ("from revcolv2_d2.data import register_all; register_all(); "
            "from detectron2.data import DatasetCatalog; print(len(DatasetCatalog.get('coco_2017_val')))")
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets),
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "projects", "RevColV2")]))
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # a subprocess / second process: end to end
@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps(dict(coco([ann(1)]), annotations=[ann(4, category_id=99)])), "annotation id 4 has category_id 99"),
    (json.dumps(coco([ann(1), ann(8, segmentation=[])])), "annotation id 8 has an empty segmentation"),
])
def test_coco_2017_is_checked_in_the_main_process_with_the_file_name(tmp_path, content, message):
    json_file = tmp_path / "coco" / "annotations" / "instances_val2017.json"
    json_file.parent.mkdir(parents=True)
    json_file.write_text(content)
    (tmp_path / "coco" / "val2017").mkdir()
    proc = _load_coco_2017_val(tmp_path)
    assert proc.returncode != 0
    assert "CocoInputError" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert str(json_file) in proc.stderr


def test_a_malformed_synthetic_shapes_file_is_reported_and_nothing_is_deleted(tmp_path):
    root = str(tmp_path)
    base = ensure_synthetic_shapes(root, MINI_SPLITS)
    _, json_file = synthetic_shapes_paths(root, "val")
    with open(json_file, "w") as f:
        f.write("{broken")
    mine = os.path.join(base, "my_notes.txt")
    with open(mine, "w") as f:
        f.write("keep me")
    before = sorted(os.listdir(base))
    with pytest.raises(CocoInputError, match="Nothing was deleted") as e:
        ensure_synthetic_shapes(root, MINI_SPLITS)
    assert json_file in str(e.value)
    assert sorted(os.listdir(base)) == before and open(mine).read() == "keep me"


def test_a_foreign_folder_is_not_deleted(tmp_path):
    base = tmp_path / "synthetic_shapes"
    base.mkdir()
    (base / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(CocoInputError, match="holds no synthetic_shapes annotation files"):
        ensure_synthetic_shapes(str(tmp_path), MINI_SPLITS)
    assert (base / "photo.jpg").read_bytes() == b"mine"


def test_an_older_version_is_moved_aside_not_deleted(tmp_path):
    root = str(tmp_path)
    ensure_synthetic_shapes(root, MINI_SPLITS)
    _, json_file = synthetic_shapes_paths(root, "train")
    with open(json_file) as f:
        content = json.load(f)
    content["info"]["version"] = 0
    with open(json_file, "w") as f:
        json.dump(content, f)
    ensure_synthetic_shapes(root, MINI_SPLITS)
    with open(json_file) as f:
        assert json.load(f)["info"]["version"] != 0  # regenerated
    with open(os.path.join(root, "synthetic_shapes.old", "annotations", "instances_train.json")) as f:
        assert json.load(f)["info"]["version"] == 0  # the old copy is still there
