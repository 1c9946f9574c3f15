"""One reading of a rotated photo for every loader: the classification loader applies the
EXIF orientation tag as detectron2's read_image does (which tools/visualize.py and the
detection / segmentation mappers use)."""
import numpy as np
from detectron2.data.detection_utils import read_image
from PIL import Image

from revcolv2.data import RobustImageFolder, load_rgb


def _rotated_jpeg(path, orientation: int = 6) -> np.ndarray:
    """A 451x300 (W x H) JPEG tagged 'rotate 90 degrees clockwise to view' (orientation 6),
    as a phone held upright writes it; returns the stored pixels."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((300, 451, 3), np.uint8)
    pixels[:100, :150] = (250, 10, 10)  # a red block in the stored top-left corner
    pixels[150:] = rng.integers(0, 255, (150, 451, 3), dtype=np.uint8) // 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    return pixels


def test_a_rotated_jpeg_reads_the_same_in_every_loader(tmp_path):
    _rotated_jpeg(tmp_path / "upright.jpg")
    ours = np.asarray(load_rgb(str(tmp_path / "upright.jpg")))
    theirs = read_image(str(tmp_path / "upright.jpg"), format="RGB")
    assert ours.shape == theirs.shape == (451, 300, 3)  # H x W: displayed upright, as a viewer shows it
    np.testing.assert_array_equal(ours, theirs)
    r, g, b = ours[:140, -90:].reshape(-1, 3).mean(axis=0)  # the stored top-left block, now top-right
    assert r > 230 and g < 30 and b < 30, (r, g, b)


def test_the_image_folder_returns_the_upright_image(tmp_path):
    (tmp_path / "cls").mkdir()
    _rotated_jpeg(tmp_path / "cls" / "upright.jpg")
    image, _ = RobustImageFolder(str(tmp_path))[0]
    assert image.size == (300, 451)  # PIL: W x H
