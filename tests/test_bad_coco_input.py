"""Broken COCO-format inputs fail with an error that names the file or the annotation id:
malformed files, unknown ids, bad boxes, empty segmentations and unreadable images, on any
dataset the configs use (coco_2017_* included), checked before training starts; the
built-in dataset folder is never deleted."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from coco_helpers import ann, checked_mapper, image, write
from coco_helpers import coco as coco_file
from d2_helpers import MINI_SPLITS, ROOT
from detectron2.data import DatasetCatalog

from revcolv2_d2.data.coco_checks import (
    CocoInputError,
    register_checked_coco_instances,
    validate_coco_instances_json,
)
from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes, synthetic_shapes_paths


def coco(annotations):
    """One 10x10 image, a.jpg, and one category."""
    return coco_file(annotations, images=[image(width=10, file_name="a.jpg")])


# --------------------------------------------------------------------------- annotation files
def test_missing_annotation_file(tmp_path):
    path = str(tmp_path / "nowhere" / "instances_val.json")
    with pytest.raises(FileNotFoundError, match="nowhere/instances_val.json"):
        validate_coco_instances_json(path)


def test_annotation_file_that_is_not_json(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text("<html>not json</html>")
    with pytest.raises(CocoInputError, match=f"{path}.*not valid JSON"):
        validate_coco_instances_json(str(path))


def test_annotation_file_without_coco_keys(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(CocoInputError, match="lacks the key"):
        validate_coco_instances_json(str(path))


def test_category_id_not_in_categories(tmp_path):
    path = write(tmp_path, coco([ann(10, category_id=7)]))
    with pytest.raises(CocoInputError, match=r"annotation id 10 has category_id 7.*not in the 'categories'"):
        validate_coco_instances_json(path)


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


# --------------------------------------------------------------------------- registered datasets
def test_registered_dataset_validates_when_loaded(tmp_path):
    path = write(tmp_path, coco([ann(10, category_id=99)]))
    register_checked_coco_instances("_test_bad_category", {}, path, str(tmp_path))
    try:
        with pytest.raises(CocoInputError, match="category_id 99") as e:
            DatasetCatalog.get("_test_bad_category")
        assert path in str(e.value)
        register_checked_coco_instances("_test_bad_category", {}, str(tmp_path / "gone.json"), str(tmp_path))
        with pytest.raises(FileNotFoundError, match="gone.json"):
            DatasetCatalog.get("_test_bad_category")
    finally:
        DatasetCatalog.remove("_test_bad_category")


def test_valid_file_loads(tmp_path):
    path = write(tmp_path, coco([ann(1)]))
    register_checked_coco_instances("_test_good", {}, path, str(tmp_path))
    try:
        records = DatasetCatalog.get("_test_good")
        assert records[0]["file_name"] == os.path.join(str(tmp_path), "a.jpg")
    finally:
        DatasetCatalog.remove("_test_good")


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


# --------------------------------------------------------------------------- image files
def test_missing_image_file(tmp_path):
    record = {"file_name": str(tmp_path / "missing.jpg"), "image_id": 5, "height": 32, "width": 32}
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        checked_mapper()(record)


def test_unreadable_image_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(CocoInputError, match="cannot read image file .*broken.jpg"):
        checked_mapper()({"file_name": str(bad), "image_id": 5, "height": 32, "width": 32})


def test_readable_image_passes(tmp_path):
    import cv2

    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((32, 48, 3), np.uint8))
    out = checked_mapper()({"file_name": str(good), "image_id": 5, "height": 32, "width": 48})
    assert tuple(out["image"].shape) == (3, 32, 48)


# --------------------------------------------------------------------------- the built-in dataset folder
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


# ----------------------------------------------------------------------------- ids and areas
def _coco_file(tmp_path, images, annotations, categories, name="ids.json"):
    return write(tmp_path, coco_file(annotations, images, categories), name)


def _image(i, w=64, h=48):
    return image(i, height=h, width=w)


def _ann(i, image_id, category_id, bbox=(4, 6, 20, 10), **extra):
    x, y, w, h = bbox
    return {"id": i, "image_id": image_id, "category_id": category_id, "bbox": list(bbox), "area": w * h,
            "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]], **extra}


def test_a_duplicate_image_id_is_refused_naming_file_and_id(tmp_path):
    """pycocotools would keep one of the two images and give it both images' annotations."""
    path = _coco_file(tmp_path, [_image(7), dict(_image(7), file_name="other.jpg")],
                      [_ann(1, 7, 1), _ann(2, 7, 1)], [{"id": 1, "name": "a"}])
    with pytest.raises(CocoInputError, match=r"image id 7 appears more than once in 'images'") as e:
        validate_coco_instances_json(path)
    assert path in str(e.value)


@pytest.mark.parametrize("what", ["annotation", "category"])
def test_duplicate_annotation_and_category_ids_are_refused(tmp_path, what):
    anns = [_ann(1, 1, 1), _ann(1 if what == "annotation" else 2, 1, 1)]
    cats = [{"id": 1, "name": "a"}] + ([{"id": 1, "name": "b"}] if what == "category" else [])
    with pytest.raises(CocoInputError, match=f"{what} id 1 appears more than once"):
        validate_coco_instances_json(_coco_file(tmp_path, [_image(1)], anns, cats))


@pytest.mark.parametrize("area", [-5.0, "12", float("nan"), None])
def test_a_negative_or_non_numeric_area_is_refused(tmp_path, area):
    path = _coco_file(tmp_path, [_image(1)], [_ann(3, 1, 1, area=area)], [{"id": 1, "name": "a"}])
    with pytest.raises(CocoInputError, match=r"annotation id 3 has area .*expected a number >= 0") as e:
        validate_coco_instances_json(path)
    assert path in str(e.value)


def test_a_zero_area_is_counted_in_a_warning(tmp_path, caplog):
    import logging

    path = _coco_file(tmp_path, [_image(1)], [_ann(3, 1, 1, area=0), _ann(4, 1, 1), _ann(5, 1, 1, area=0)],
                      [{"id": 1, "name": "a"}])
    with caplog.at_level(logging.WARNING, logger="revcolv2_d2.data.coco_checks"):
        validate_coco_instances_json(path)
    assert f"{path}: 2 annotation(s) with area 0 (ids [3, 5])" in caplog.text


def test_non_contiguous_category_ids_are_mapped_as_detectron2_does(tmp_path):
    """Ids 3, 7, 12 become classes 0, 1, 2 in id order; COCOEvaluator maps them back, so
    predictions equal to the ground truth score AP 100."""
    import torch
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, Instances

    cats = [{"id": 12, "name": "twelve"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    anns = [_ann(1, 1, 3, (2, 2, 20, 12)), _ann(2, 1, 12, (30, 20, 16, 16)), _ann(3, 2, 7, (10, 5, 30, 30))]
    path = _coco_file(tmp_path, [_image(1), _image(2)], anns, cats)
    name = "_test_non_contiguous_ids"
    register_checked_coco_instances(name, {}, path, str(tmp_path))
    try:
        records = DatasetCatalog.get(name)
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["three", "seven", "twelve"]
        assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1, 12: 2}
        assert [[a["category_id"] for a in r["annotations"]] for r in records] == [[0, 2], [1]]

        evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=None)
        evaluator.reset()
        for r in records:
            boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in r["annotations"])]
            pred = Instances((r["height"], r["width"]), pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
                             scores=torch.ones(len(boxes)),
                             pred_classes=torch.tensor([a["category_id"] for a in r["annotations"]]))
            evaluator.process([{"image_id": r["image_id"]}], [{"instances": pred}])
        assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
