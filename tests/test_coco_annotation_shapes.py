"""COCO annotations that detectron2 accepts at load time and then crashes on in a loader
worker (a bare KeyError, TypeError or AssertionError) are refused up front, naming the JSON
file and the annotation id: a missing ``bbox``, a segmentation written as one flat list,
and an RLE whose ``size`` is not its image's."""
import json

import numpy as np
import pycocotools.mask as mask_util
import pytest

from revcolv2_d2.data.coco_checks import CocoInputError, validate_coco_instances_json


def coco(annotations, height=10, width=12):
    return {"images": [{"id": 1, "file_name": "a.jpg", "height": height, "width": width}],
            "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def ann(i, **fields):
    base = {"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
            "segmentation": [[1, 1, 5, 1, 5, 5]]}
    return {k: v for k, v in dict(base, **fields).items() if v is not DROP}


DROP = object()


def write(tmp_path, content):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    return str(path)


def refused(tmp_path, annotation, *phrases):
    path = write(tmp_path, coco([ann(1), annotation]))
    with pytest.raises(CocoInputError) as e:
        validate_coco_instances_json(path)
    msg = str(e.value)
    assert path in msg and f"annotation id {annotation['id']} " in msg and "\n" not in msg, msg
    for phrase in phrases:
        assert phrase in msg, msg


def rle(height, width, compressed=True):
    mask = np.zeros((height, width), np.uint8, order="F")
    mask[2:5, 3:7] = 1
    encoded = mask_util.encode(mask)
    if compressed:
        return {"size": encoded["size"], "counts": encoded["counts"].decode()}
    flat = mask.flatten(order="F")  # uncompressed RLE: run lengths, column-major, starting with zeros
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    return {"size": [height, width], "counts": runs + [count]}


def test_an_annotation_without_bbox_is_refused(tmp_path):
    refused(tmp_path, ann(7, bbox=DROP), "has no bbox", "[x, y, width, height]")


def test_a_flat_polygon_list_is_refused(tmp_path):
    refused(tmp_path, ann(8, segmentation=[1, 1, 5, 1, 5, 5]), "flat list", "[[x1, y1, x2, y2, ...]")


def test_a_polygon_with_something_else_than_numbers_is_refused(tmp_path):
    refused(tmp_path, ann(9, segmentation=[[1, 1, "5", 1, 5, 5]]), "polygon 0", "numbers")


def test_an_rle_of_another_size_than_its_image_is_refused(tmp_path):
    refused(tmp_path, ann(11, segmentation=rle(20, 12)), "RLE size [20, 12]", "image id 1 is 10 x 12")


def test_an_uncompressed_rle_whose_runs_do_not_cover_the_image_is_refused(tmp_path):
    bad = rle(10, 12, compressed=False)
    bad["counts"] = bad["counts"][:-1]
    refused(tmp_path, ann(12, segmentation=bad, iscrowd=1), "counts", "120")


def test_good_polygons_and_rles_pass(tmp_path):
    path = write(tmp_path, coco([ann(1), ann(2, segmentation=rle(10, 12)),
                                 ann(3, segmentation=rle(10, 12, compressed=False), iscrowd=1),
                                 ann(4, segmentation=[[1, 1, 5, 1, 5, 5], [6.5, 6, 8, 6, 8, 8]])]))
    assert len(validate_coco_instances_json(path)["annotations"]) == 4


@pytest.mark.parametrize("case", ["no_bbox", "flat_polygon", "rle_size"])
def test_what_the_check_refuses_is_what_detectron2_crashes_on(tmp_path, case):
    """Without the check, detectron2 loads each file and its mapper fails with an error
    that names neither the file nor the annotation: the reason for each check."""
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json
    from PIL import Image

    bad = {"no_bbox": ann(2, bbox=DROP), "flat_polygon": ann(2, segmentation=[1, 1, 5, 1, 5, 5]),
           "rle_size": ann(2, segmentation=rle(20, 12))}[case]
    Image.new("RGB", (12, 10)).save(tmp_path / "a.jpg")
    path = write(tmp_path, coco([bad]))
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB", use_instance_mask=True,
                           instance_mask_format="bitmask" if case == "rle_size" else "polygon")
    with pytest.raises((KeyError, TypeError, AssertionError)) as e:
        mapper(load_coco_json(path, str(tmp_path), "_shapes_check")[0])
    assert path not in str(e.value)
