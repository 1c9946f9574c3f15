"""Shared by the COCO-input tests: small COCO instances files, built from dicts and written
at test time, and the checked mapper."""
import json

from revcolv2_d2.data.coco_checks import CheckedDatasetMapper


def image(i=1, height=10, width=12, file_name=None) -> dict:
    return {"id": i, "file_name": file_name or f"{i}.jpg", "height": height, "width": width}


def ann(i, **fields) -> dict:
    """A valid annotation of image 1, category 1 (a 4x4 box and its triangle), ``fields`` replaced."""
    return dict({"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0,
                 "segmentation": [[1, 1, 5, 1, 5, 5]]}, **fields)


def coco(annotations, images=None, categories=None) -> dict:
    """A COCO instances file's content: one image and one category unless given."""
    return {"images": images if images is not None else [image()], "annotations": annotations,
            "categories": categories if categories is not None else [{"id": 1, "name": "thing"}]}


def write(tmp_path, content, name="instances.json") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return str(path)


def checked_mapper(image_format="RGB") -> CheckedDatasetMapper:
    return CheckedDatasetMapper(is_train=False, augmentations=[], image_format=image_format)
