"""What the COCO checks tell the user, word for word: each refusal names the file, the key
or the annotation id and says what is expected; each warning gives the count, the first ten
ids and what follows from them. Also the edges of each check (a one-pixel RLE, a run of 0,
ten against eleven ids), the file read as UTF-8 whatever the locale, the image mapper that
names only image errors, and the registration of detectron2's own COCO datasets
(``check_registered_coco_datasets``), on catalogs emptied for the test."""
import json
import locale
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
from coco_helpers import ann, checked_mapper, coco, image, write
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import SizeMismatchError

from revcolv2_d2.data.coco_checks import (
    CocoInputError,
    check_registered_coco_datasets,
    register_checked_coco_instances,
    validate_coco_instances_json,
)

LOGGER = "revcolv2_d2.data.coco_checks"


def refusal(tmp_path, content):
    """The file written, and the one-line message validate_coco_instances_json refuses it with."""
    path = write(tmp_path, content)
    with pytest.raises(CocoInputError) as e:
        validate_coco_instances_json(path)
    return path, str(e.value)


def annotation_refusal(tmp_path, bad, images=None):
    """The message refusing the annotation ``bad`` (after a good one), with the file name and
    annotation id prefix taken off: what the check says about it."""
    path, msg = refusal(tmp_path, coco([ann(1), bad], images=images))
    where = f"COCO annotation file {path}: annotation id {bad['id']} "
    assert msg.startswith(where), msg
    return msg[len(where):]


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# --------------------------------------------------------------------------- the file as a whole
def test_a_file_holding_a_list_is_refused_word_for_word(tmp_path):
    path, msg = refusal(tmp_path, [{"images": []}])
    assert msg == f"COCO annotation file {path} holds a list, not an object"


@pytest.mark.parametrize("key, value", [("images", [1, 2]), ("annotations", {"id": 1}), ("categories", "a")])
def test_a_key_that_is_not_a_list_of_objects_is_named(tmp_path, key, value):
    content = coco([ann(1)])
    content[key] = value
    path, msg = refusal(tmp_path, content)
    assert msg == f"COCO annotation file {path}: '{key}' must be a list of objects"


def test_the_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    """COCO files are UTF-8 JSON; a process whose locale says ASCII (LC_CTYPE=C) still reads
    a non-ASCII category name instead of calling the file 'not valid JSON'."""
    path = tmp_path / "instances.json"
    path.write_bytes(json.dumps(coco([ann(1)], categories=[{"id": 1, "name": "café"}]),
                                ensure_ascii=False).encode("utf-8"))
    before = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C")
        data = validate_coco_instances_json(str(path))
    finally:
        locale.setlocale(locale.LC_CTYPE, before)
    assert data["categories"] == [{"id": 1, "name": "café"}]


def test_an_unknown_image_id_is_refused_word_for_word(tmp_path):
    path, msg = refusal(tmp_path, coco([ann(1), ann(4, image_id=9)]))
    assert msg == (f"COCO annotation file {path}: annotation id 4 refers to image_id 9, which is not in the "
                   "'images' list")


# --------------------------------------------------------------------------- duplicate ids
def test_one_repeated_id_is_named_with_its_key(tmp_path):
    path, msg = refusal(tmp_path, coco([], images=[image("a7"), image("a7")]))
    assert msg == (f"COCO annotation file {path}: image id 'a7' appears more than once in 'images'; "
                   "every image needs its own id")


def test_two_repeated_ids_name_the_second(tmp_path):
    path, msg = refusal(tmp_path, coco([ann(1), ann(2), ann(1), ann(2), ann(3)]))
    assert msg == (f"COCO annotation file {path}: annotation id 1 appears more than once in 'annotations' "
                   "(and 1 other id(s): [2]); every annotation needs its own id")


def test_many_repeated_ids_are_counted_and_the_next_five_named(tmp_path):
    cats = [{"id": i, "name": str(i)} for i in range(1, 8)] * 2
    path, msg = refusal(tmp_path, coco([], categories=cats))
    assert msg == (f"COCO annotation file {path}: category id 1 appears more than once in 'categories' "
                   "(and 6 other id(s): [2, 3, 4, 5, 6]); every category needs its own id")


# --------------------------------------------------------------------------- boxes and areas
def test_box_and_area_refusals_word_for_word(tmp_path):
    bbox = {k: v for k, v in ann(7).items() if k != "bbox"}
    assert annotation_refusal(tmp_path, bbox) == (
        "has no bbox; detectron2 needs [x, y, width, height] for every annotation (it does not derive one from "
        "the segmentation)")
    assert annotation_refusal(tmp_path, ann(7, bbox=[1, 1, 4])) == (
        "has bbox [1, 1, 4]; expected [x, y, width, height], four finite numbers")
    assert annotation_refusal(tmp_path, ann(7, bbox=[1, 1, -4, 4])) == (
        "has bbox [1, 1, -4, 4] with a negative width or height")
    assert annotation_refusal(tmp_path, ann(7, area="12")) == (
        "has area '12'; expected a number >= 0 (the object's pixel area)")


def test_zero_boxes_and_zero_areas_are_warned_word_for_word(tmp_path, caplog):
    path = write(tmp_path, coco([ann(1), ann(2, bbox=[1, 1, 0, 4]), ann(3, area=0)]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_coco_instances_json(path)
    assert warnings_of(caplog) == [
        f"COCO annotation file {path}: 1 annotation(s) with a zero-width or zero-height box (ids [2]); "
        "they are ignored in training",
        f"COCO annotation file {path}: 1 annotation(s) with area 0 (ids [3]); "
        "COCO evaluation counts them as small objects",
    ]


@pytest.mark.parametrize("n, ids", [
    (10, "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"),
    (11, "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] ..."),
    (12, "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] ..."),
])
def test_a_warning_lists_the_first_ten_ids(tmp_path, caplog, n, ids):
    path = write(tmp_path, coco([ann(i, area=0) for i in range(1, n + 1)]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        validate_coco_instances_json(path)
    assert warnings_of(caplog) == [
        f"COCO annotation file {path}: {n} annotation(s) with area 0 (ids {ids}); "
        "COCO evaluation counts them as small objects"]


def test_an_annotation_without_area_is_not_counted_as_area_0(tmp_path, caplog):
    no_area = {k: v for k, v in ann(2).items() if k != "area"}
    path = write(tmp_path, coco([ann(1), no_area]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(validate_coco_instances_json(path)["annotations"]) == 2
    assert warnings_of(caplog) == []


# --------------------------------------------------------------------------- segmentations
def test_segmentation_refusals_word_for_word(tmp_path):
    assert annotation_refusal(tmp_path, ann(2, segmentation=[])) == (
        "has an empty segmentation ([]); give it a polygon or RLE, or remove the 'segmentation' key")
    assert annotation_refusal(tmp_path, ann(2, segmentation=[1, 1, 5, 1, 5, 5])) == (
        "has its polygon as one flat list [x1, y1, ...]; COCO polygons are a list of polygons: "
        "write [[x1, y1, x2, y2, ...]]")
    assert annotation_refusal(tmp_path, ann(2, segmentation=5)) == (
        "has a segmentation of type int; expected a list of polygons or an RLE dict")


def test_a_bad_polygon_is_quoted_up_to_80_characters(tmp_path):
    long_polygon = [100, 200] * 20 + ["x"]
    assert annotation_refusal(tmp_path, ann(2, segmentation=[[1, 1, 5, 1, 5, 5], long_polygon])) == (
        "has [100, 200, 100, 200, 100, 200, 100, 200, 100, 200, 100, 200, 100, 200, 100, 200, as polygon 1 "
        "of its segmentation; each polygon is a list of finite numbers [x1, y1, x2, y2, ...]")


def compressed_rle(height, width):
    mask = np.zeros((height, width), np.uint8, order="F")
    mask[0, 0] = 1
    encoded = mask_util.encode(mask)
    return {"size": encoded["size"], "counts": encoded["counts"].decode()}


@pytest.mark.parametrize("size", [[10, 12, 5], [10, "12"], [0, 12], [10, -12], [10.0, 12], "10x12"])
def test_an_rle_size_that_is_not_two_positive_integers_is_refused(tmp_path, size):
    shown = repr(size)
    assert annotation_refusal(tmp_path, ann(2, segmentation={"size": size, "counts": "abc"})) == (
        f"has an RLE size {shown}; expected [height, width], two positive integers")


def test_a_one_pixel_high_rle_on_a_one_pixel_high_image_passes(tmp_path):
    path = write(tmp_path, coco([ann(1, segmentation=compressed_rle(1, 12))], images=[image(height=1)]))
    assert validate_coco_instances_json(path)["annotations"][0]["segmentation"]["size"] == [1, 12]


@pytest.mark.parametrize("counts", [[60.0, 60], [True, 119], [-1, 121], [60, "60"]])
def test_uncompressed_counts_must_be_non_negative_integers(tmp_path, counts):
    """Each of these sums to the image's 120 pixels: only the type or sign check refuses them."""
    assert annotation_refusal(tmp_path, ann(2, iscrowd=1, segmentation={"size": [10, 12], "counts": counts})) == (
        "has uncompressed RLE counts that are not all non-negative integers")


def test_uncompressed_counts_may_start_with_a_run_of_0(tmp_path):
    """COCO's runs start with background; a mask whose first pixel is foreground starts with 0."""
    rle = {"size": [10, 12], "counts": [0, 3, 117]}
    path = write(tmp_path, coco([ann(1, iscrowd=1, segmentation=rle)]))
    assert validate_coco_instances_json(path)["annotations"][0]["segmentation"] == rle
    assert mask_util.decode(mask_util.frPyObjects(rle, 10, 12)).sum() == 3  # pycocotools reads it as 3 pixels


def test_rle_counts_refusals_word_for_word(tmp_path):
    assert annotation_refusal(tmp_path, ann(2, iscrowd=1, segmentation={"size": [10, 12], "counts": [100, 19]})) == (
        "has uncompressed RLE counts summing to 119 pixels; its size [10, 12] has 120")
    assert annotation_refusal(tmp_path, ann(2, segmentation={"size": [10, 12], "counts": 5})) == (
        "has RLE counts of type int; expected a string (compressed) or a list of run lengths")


# --------------------------------------------------------------------------- images
def _png(tmp_path, height=32, width=48):
    import cv2

    path = tmp_path / "good.png"
    cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
    return str(path)


def test_a_missing_image_is_named_with_its_image_id(tmp_path):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(FileNotFoundError) as e:
        checked_mapper()({"file_name": missing, "image_id": 5, "height": 32, "width": 32})
    assert str(e.value) == f"image file not found: {missing} (image_id 5)"


def test_an_unreadable_image_is_named_with_the_error_type(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(CocoInputError) as e:
        checked_mapper()({"file_name": str(bad), "image_id": 5, "height": 32, "width": 32})
    assert str(e.value).startswith(f"cannot read image file {bad}: UnidentifiedImageError: cannot identify image file")


def test_an_error_that_is_not_the_image_is_passed_on_unchanged(tmp_path):
    """A readable image whose record gives another size: detectron2's own error, not 'cannot read'."""
    good = _png(tmp_path)
    with pytest.raises(SizeMismatchError, match=r"got \(48, 32\), expect \(48, 33\)"):
        checked_mapper()({"file_name": good, "image_id": 5, "height": 33, "width": 48})


def test_an_image_that_cannot_be_read_in_the_mappers_format_is_named(tmp_path):
    """Whether the image is the problem is judged in the mapper's own format: a palette PNG
    decodes, but PIL cannot convert it to a mapper's "I;16" (16-bit grey), so this file
    cannot be read as the mapper reads it; the error names it, with PIL's reason."""
    from PIL import Image

    palette = str(tmp_path / "palette.png")
    Image.new("P", (48, 32)).save(palette)
    with pytest.raises(CocoInputError) as e:
        checked_mapper("I;16")({"file_name": palette, "image_id": 5, "height": 32, "width": 48})
    assert str(e.value) == f"cannot read image file {palette}: ValueError: conversion not supported"


# --------------------------------------------------------------------------- registration
@pytest.fixture
def empty_catalogs(monkeypatch):
    """detectron2's catalogs, emptied for the test (its built-ins come back afterwards)."""
    monkeypatch.setattr(DatasetCatalog, "data", {})
    monkeypatch.setattr(MetadataCatalog, "data", {})


def test_register_checked_coco_instances_sets_the_metadata(tmp_path, empty_catalogs):
    path = write(tmp_path, coco([ann(1)]))
    register_checked_coco_instances("mine", {"note": "kept"}, path, str(tmp_path / "images"))
    meta = MetadataCatalog.get("mine")
    assert (meta.json_file, meta.image_root, meta.evaluator_type, meta.coco_checked, meta.note) == (
        path, str(tmp_path / "images"), "coco", True, "kept")
    assert check_registered_coco_datasets() == []  # already checked: not wrapped a second time


def test_every_unchecked_coco_dataset_is_wrapped_once(tmp_path, empty_catalogs):
    bad = write(tmp_path, coco([ann(1, category_id=99)]), "bad.json")
    good = write(tmp_path, coco([ann(1)]), "good.json")
    calls = []

    def loader(name):
        def load():
            calls.append(name)
            return [{"loaded": name}]
        return load

    datasets = {  # name: metadata; in registration order
        "other_type": {"evaluator_type": "sem_seg", "json_file": bad},
        "no_json": {"evaluator_type": "coco"},
        "checked": {"evaluator_type": "coco", "json_file": bad, "coco_checked": True},
        "coco_bad": {"evaluator_type": "coco", "json_file": bad},
        "coco_good": {"evaluator_type": "coco", "json_file": good},
    }
    loaders = {}
    for name, meta in datasets.items():
        loaders[name] = loader(name)
        DatasetCatalog.register(name, loaders[name])
        MetadataCatalog.get(name).set(**meta)

    assert check_registered_coco_datasets() == ["coco_bad", "coco_good"]
    for name in ("other_type", "no_json", "checked"):
        assert DatasetCatalog[name] is loaders[name]
        assert DatasetCatalog.get(name) == [{"loaded": name}]
    with pytest.raises(CocoInputError, match=f"COCO annotation file {bad}: annotation id 1 has category_id 99"):
        DatasetCatalog.get("coco_bad")
    assert DatasetCatalog.get("coco_good") == [{"loaded": "coco_good"}]
    assert calls == ["other_type", "no_json", "checked", "coco_good"]  # the bad file's loader never ran
    assert MetadataCatalog.get("coco_good").coco_checked is True

    wrapped = DatasetCatalog["coco_good"]
    assert check_registered_coco_datasets() == []  # idempotent
    assert DatasetCatalog["coco_good"] is wrapped
