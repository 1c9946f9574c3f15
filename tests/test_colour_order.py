"""Every detectron2 config feeds its model images in the colour order the model normalises.

The models normalise RGB images (ImageNet mean in R, G, B order; the detection model also
says ``input_format="RGB"``). A mapper that decodes BGR hands them images whose red and blue
are swapped, which no loss or evaluation oracle notices (the oracles ignore pixel colours):
each config's train and test mapper runs here on an image whose three channels differ.
"""
import glob
import os
import random

import numpy as np
import pytest
from detectron2.config import LazyConfig, instantiate
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")
CONFIG_FILES = sorted(os.path.relpath(p, CONFIGS) for d in ("COCO", "ADE20K", "demo")
                      for p in glob.glob(os.path.join(CONFIGS, d, "*.py")))

RED = (230, 40, 20)  # R, G, B: a red whose channels all differ
IMAGENET_MEAN_RGB = [123.675, 116.28, 103.53]


def model_colour_order(cfg) -> str:
    """'RGB' or 'BGR': the order the model's pixel_mean is written in (and its input_format, if any)."""
    mean = [float(v) for v in cfg.model.pixel_mean]
    if mean == IMAGENET_MEAN_RGB:
        order = "RGB"
    elif mean == IMAGENET_MEAN_RGB[::-1]:
        order = "BGR"
    else:
        raise AssertionError(f"pixel_mean {mean} is neither ImageNet's RGB nor its BGR mean")
    fmt = cfg.model.get("input_format", order)
    assert fmt == order, f"input_format {fmt} but pixel_mean in {order} order"
    return order


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colour")
    image = np.empty((64, 96, 3), np.uint8)
    image[:] = RED
    Image.fromarray(image).save(folder / "red.png")  # lossless: the pixels stay exactly RED
    label = np.zeros((64, 96), np.uint8)
    label[:, 48:] = 1  # two classes, so that category-area-constrained crops accept any window
    Image.fromarray(label, mode="L").save(folder / "red_label.png")
    return folder


def dataset_dict(files):
    return {"file_name": str(files / "red.png"), "sem_seg_file_name": str(files / "red_label.png"),
            "height": 64, "width": 96, "image_id": 0}


def test_every_config_with_a_dataloader_is_covered():
    assert {"COCO/mask_rcnn_revcolv2_b_50ep.py", "ADE20K/upernet_revcolv2_b_160k.py",
            "ADE20K/mask2former_revcolv2_b_160k.py", "demo/mask_rcnn_revcolv2_tiny_shapes.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_mappers_decode_images_in_the_models_colour_order(rel, files):
    cfg = LazyConfig.load(os.path.join(CONFIGS, rel))
    order = model_colour_order(cfg)
    expected = RED if order == "RGB" else RED[::-1]  # what channels 0, 1, 2 must hold
    reddest = expected.index(max(expected))

    # test time: resizing a flat image keeps its colour exactly
    out = instantiate(cfg.dataloader.test.mapper)(dataset_dict(files))
    image = out["image"].numpy()  # (3, H, W)
    got = tuple(int(v) for v in image.reshape(3, -1).mean(axis=1).round())
    assert got == expected, f"test mapper: channels hold {got}, the {order} model needs {expected}"

    # training: flips, crops and photometric distortion (brightness, contrast, saturation,
    # hue within +-36 degrees) may change the values, but a red stays red
    mapper = instantiate(cfg.dataloader.train.mapper)
    for seed in range(4):
        np.random.seed(seed)
        random.seed(seed)
        image = mapper(dataset_dict(files))["image"].numpy().astype(float)
        means = image.reshape(3, -1).mean(axis=1)
        assert int(means.argmax()) == reddest, (
            f"train mapper (seed {seed}): channel means {means.round(1).tolist()}, the {order} model "
            f"needs the red channel at index {reddest}")
