"""Broken COCO inputs fail with an error that names the file or the id."""
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog

from revcolv2_d2.data.coco_checks import (
    CheckedDatasetMapper,
    CocoInputError,
    register_checked_coco_instances,
    validate_coco_instances_json,
)


def _coco(tmp_path, **changes):
    content = {
        "images": [{"id": 1, "file_name": "a.jpg", "height": 32, "width": 32}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8], "area": 64,
                         "iscrowd": 0, "segmentation": [[1, 1, 9, 1, 9, 9, 1, 9]]}],
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }
    content.update(changes)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return str(path)


def _mapper():
    return CheckedDatasetMapper(is_train=False, augmentations=[], image_format="RGB")


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
    anns = [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 1, 8, 8], "iscrowd": 0}]
    path = _coco(tmp_path, annotations=anns)
    with pytest.raises(CocoInputError, match=r"annotation id 10 has category_id 7.*not in the 'categories'"):
        validate_coco_instances_json(path)


def test_registered_dataset_validates_when_loaded(tmp_path):
    anns = [{"id": 10, "image_id": 1, "category_id": 99, "bbox": [1, 1, 8, 8], "iscrowd": 0}]
    path = _coco(tmp_path, annotations=anns)
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
    path = _coco(tmp_path)
    register_checked_coco_instances("_test_good", {}, path, str(tmp_path))
    try:
        records = DatasetCatalog.get("_test_good")
        assert records[0]["file_name"] == os.path.join(str(tmp_path), "a.jpg")
    finally:
        DatasetCatalog.remove("_test_good")


def test_missing_image_file(tmp_path):
    record = {"file_name": str(tmp_path / "missing.jpg"), "image_id": 5, "height": 32, "width": 32}
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        _mapper()(record)


def test_unreadable_image_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(CocoInputError, match="cannot read image file .*broken.jpg"):
        _mapper()({"file_name": str(bad), "image_id": 5, "height": 32, "width": 32})


def test_readable_image_passes(tmp_path):
    import cv2

    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((32, 48, 3), np.uint8))
    out = _mapper()({"file_name": str(good), "image_id": 5, "height": 32, "width": 48})
    assert tuple(out["image"].shape) == (3, 32, 48)


# ----------------------------------------------------------------------------- ids and areas
def _coco_file(tmp_path, images, annotations, categories, name="ids.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path)


def _image(i, w=64, h=48):
    return {"id": i, "file_name": f"{i}.jpg", "height": h, "width": w}


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
