"""tools/visualize.py never writes over an input, whatever the folder layout, and never
reports a drawing written that is not: a write that fails (here a file-size limit, as a full
disk) stops the tool naming the file, and leaves nothing under its name."""
import os
import resource
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
from d2_helpers import DEMO_CONFIG, ROOT, TINY_OVERRIDES, make_mini_shapes

from revcolv2_d2 import visualization as visualize


def _photos(folder, names=("a.png", "b.jpg")):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(folder / name), np.full((64, 96, 3), 40 * (i + 1), np.uint8))
    return {n: (folder / n).read_bytes() for n in names}


def _visualize(inputs, output):
    return visualize.main(["--config-file", DEMO_CONFIG, "--checkpoint", "", "--device", "cpu", "--output",
                           str(output), "--input", *map(str, inputs), "--opts", *TINY_OVERRIDES])


def test_output_into_the_input_folder_is_refused_before_anything_is_written(tmp_path):
    """The issue's case: ``--input photos/ --output photos/`` would replace photos/a.png."""
    before = _photos(tmp_path / "photos")
    with pytest.raises(visualize.VisualizationWriteError) as e:
        _visualize([tmp_path / "photos"], tmp_path / "photos")
    msg = str(e.value)
    assert str(tmp_path / "photos" / "a.png") in msg and "would replace the input" in msg and "\n" not in msg, msg
    assert {n: (tmp_path / "photos" / n).read_bytes() for n in before} == before
    assert sorted(os.listdir(tmp_path / "photos")) == sorted(before)


def test_an_output_folder_that_links_to_the_inputs_is_refused(tmp_path):
    before = _photos(tmp_path / "photos")
    os.symlink(tmp_path / "photos", tmp_path / "vis")
    with pytest.raises(visualize.VisualizationWriteError, match="would replace the input"):
        _visualize([tmp_path / "photos" / "a.png"], tmp_path / "vis")
    assert (tmp_path / "photos" / "a.png").read_bytes() == before["a.png"]


def test_a_hard_link_to_an_input_is_not_written_through(tmp_path):
    before = _photos(tmp_path / "photos", ["a.png"])
    (tmp_path / "vis").mkdir()
    os.link(tmp_path / "photos" / "a.png", tmp_path / "vis" / "a.png")
    with pytest.raises(visualize.VisualizationWriteError, match="would replace the input"):
        _visualize([tmp_path / "photos" / "a.png"], tmp_path / "vis")
    assert (tmp_path / "photos" / "a.png").read_bytes() == before["a.png"]


def test_ground_truth_drawings_are_not_written_over_the_datasets_images(tmp_path):
    from detectron2.data import DatasetCatalog

    before = _photos(tmp_path / "images", ["a.png"])
    name = "png_images_for_test_visualize_writes"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"file_name": str(tmp_path / "images" / "a.png"), "image_id": 0,
                                                "height": 64, "width": 96, "annotations": []}])
    try:
        with pytest.raises(visualize.VisualizationWriteError, match="would replace the input"):
            visualize.main(["--dataset", name, "--output", str(tmp_path / "images")])
    finally:
        DatasetCatalog.remove(name)
    assert (tmp_path / "images" / "a.png").read_bytes() == before["a.png"]


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))


@pytest.mark.slow  # a subprocess that imports detectron2
def test_a_drawing_that_cannot_be_written_is_an_error_naming_it(tmp_path):
    root = tmp_path / "datasets"
    make_mini_shapes(str(root))
    out = tmp_path / "vis"
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-W", "ignore", os.path.join(ROOT, "tools", "visualize.py"), "--dataset",
                           "synthetic_shapes_val", "--num-images", "1", "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cannot write ") and str(out) in last and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Drew the ground truth" not in proc.stdout + proc.stderr
    assert os.listdir(out) == []  # no drawing, no partial file, no temporary file
