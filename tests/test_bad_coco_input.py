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
