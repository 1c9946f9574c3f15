"""tools/visualize.py never writes two inputs to one file: a/x.jpg, a/x.png and b/x.jpg give
three pictures, and files of an earlier run that are replaced are counted in the log."""
import logging
import os

import cv2
import numpy as np
import pytest
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES

from revcolv2_d2 import visualization as visualize


def test_output_names_are_distinct_and_keep_the_folders():
    assert visualize.output_names(["in/a/x.jpg", "in/a/x.png", "in/b/x.jpg"]) == \
        ["a/x.jpg.png", "a/x.png.png", os.path.join("b", "x.png")]
    assert visualize.output_names(["/data/one.jpg"]) == ["one.png"]
    assert visualize.output_names(["v/clip.mp4", "v/clip.jpg"], video=[True, False]) == ["clip.mp4", "clip.png"]
    assert visualize.output_names(["p/q/r.png", "p/s.png"]) == [os.path.join("q", "r.png"), "s.png"]


@pytest.mark.slow
def test_three_inputs_named_x_give_three_pictures(tmp_path, caplog):
    images = {"a/x.jpg": 40, "a/x.png": 120, "b/x.jpg": 200}  # three different grey levels
    for rel, grey in images.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), np.full((64, 96, 3), grey, np.uint8))
    out = tmp_path / "vis"
    argv = ["--config-file", DEMO_CONFIG, "--checkpoint", "", "--confidence-threshold", "1.1", "--device", "cpu",
            "--output", str(out), "--input", *(str(tmp_path / rel) for rel in images), "--opts", *TINY_OVERRIDES]
    written = visualize.main(argv)
    assert sorted(os.path.relpath(p, out) for p in written) == ["a/x.jpg.png", "a/x.png.png", "b/x.png"]
    for rel, grey in images.items():  # nothing drawn above threshold 1.1: each picture is its own input
        picture = cv2.imread(str(out / visualize.output_names(list(images))[list(images).index(rel)]))
        assert abs(float(picture.mean()) - grey) < 3, rel
    d2_logger = logging.getLogger("detectron2")  # setup_logger stops it propagating to caplog's root handler
    d2_logger.addHandler(caplog.handler)
    try:
        visualize.main(argv)
    finally:
        d2_logger.removeHandler(caplog.handler)
    assert f"Replacing 3 file(s) of an earlier run in {out}" in caplog.text
