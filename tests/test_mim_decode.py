"""The MIM pipeline's decoder (revcolv2.data.RandomResizedCropDecoder): torchvision's
RandomResizedCrop + flip of the decoded image, pixel for pixel, from the same seed (so a
resumed run still sees exactly the samples of an uninterrupted one, and the output
distribution is the one of the transforms); close to it where it decodes at reduced size;
unreadable files raise the error the robust folder skips."""
import numpy as np
import pytest
import torch
from PIL import Image

from revcolv2.cli.pretrain import pretrain_decoder, pretrain_transform
from revcolv2.data import (
    RandomResizedCropDecoder,
    RobustImageFolder,
    SeededSamples,
    UnreadableImageError,
    load_rgb,
    normalize_uint8,
)

CFG = {"data": {"input_size": 224, "crop_scale": [0.2, 1.0], "hflip": 0.5}}


def _photo(width, height, seed):
    """Smooth colour fields with edges (not noise): a JPEG of a photo's kind."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(3, 12) + rng.uniform(0, 6)) + np.cos(y * rng.uniform(3, 12)) for _ in range(3)]
    pixels = np.stack(channels, -1) * 60 + 128 + rng.normal(0, 4, (height, width, 1))
    pixels[height // 3: height // 2, width // 4: width // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "a").mkdir()
    paths = {}
    for name, (w, h) in {"wide.jpg": (500, 375), "tall.jpg": (375, 500), "small.jpg": (300, 200)}.items():
        _photo(w, h, len(name)).save(folder / "a" / name, quality=90)
        paths[name] = folder / "a" / name
    _photo(500, 375, 7).save(folder / "a" / "png.png")
    _photo(500, 375, 8).convert("L").save(folder / "a" / "gray.jpg", quality=90)
    _photo(500, 375, 9).convert("CMYK").save(folder / "a" / "cmyk.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: load_rgb turns it upright first
    _photo(500, 375, 10).save(folder / "a" / "rotated.jpg", quality=90, exif=exif.tobytes())
    for name in ("png.png", "gray.jpg", "cmyk.jpg", "rotated.jpg"):
        paths[name] = folder / "a" / name
    big = tmp_path_factory.mktemp("big")
    _photo(1800, 1350, 11).save(big / "big.jpg", quality=90)
    return folder, paths, big / "big.jpg"


def _both(path, seed):
    torch.manual_seed(seed)
    reference = pretrain_transform(CFG)(load_rgb(str(path)))
    torch.manual_seed(seed)
    ours = pretrain_decoder(CFG)(str(path))
    return reference, ours


@pytest.mark.parametrize("name", ["wide.jpg", "tall.jpg", "small.jpg", "png.png", "gray.jpg", "cmyk.jpg",
                                  "rotated.jpg"])
def test_the_decoder_gives_torchvision_pixels_from_the_same_seed(images, name):
    _, paths, _ = images
    for seed in range(6):
        reference, ours = _both(paths[name], seed)
        assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
        assert torch.equal(normalize_uint8(ours), reference), (name, seed)  # the same crop, flip and values


def test_a_reduced_decode_happens_only_where_the_crop_allows_and_stays_close(images):
    from torchvision import transforms

    _, _, big = images
    reduced = 0
    for seed in range(12):
        torch.manual_seed(seed)
        _, _, h, w = transforms.RandomResizedCrop.get_params(Image.open(big), (0.2, 1.0), (3 / 4, 4 / 3))
        reference, ours = _both(big, seed)
        diff = (normalize_uint8(ours) - reference).abs()
        if min(h, w) >= 448:  # decoded at half size or less: close, not equal
            reduced += 1
            assert diff.mean() < 0.03, (seed, diff.mean())  # 0.03 ~ 1.6 grey levels
        else:
            assert diff.max() == 0, seed
    assert reduced >= 3  # the case was exercised


def test_seeded_samples_give_the_reference_samples_and_repeat_them(images):
    folder, _, _ = images
    ours = SeededSamples(RobustImageFolder(str(folder), loader=pretrain_decoder(CFG)), seed=3)
    reference = SeededSamples(RobustImageFolder(str(folder), transform=pretrain_transform(CFG)), seed=3)
    for key in [(0, 0), (2, 0), (2, 1), (5, 4)]:
        (a, label_a), (b, label_b) = ours[key], reference[key]
        assert label_a == label_b and torch.equal(normalize_uint8(a), b), key
        assert torch.equal(ours[key][0], a)  # a resumed run draws the same sample again
    assert not torch.equal(ours[(2, 0)][0], ours[(2, 1)][0])  # another epoch, another crop


def test_an_unreadable_file_raises_the_error_the_folder_skips(tmp_path, images):
    _, paths, _ = images
    (tmp_path / "a").mkdir()
    data = paths["wide.jpg"].read_bytes()
    (tmp_path / "a" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "a" / "text.jpg").write_text("not an image")
    decoder = RandomResizedCropDecoder(64, (0.2, 1.0))
    for name in ("cut.jpg", "text.jpg"):
        with pytest.raises(UnreadableImageError, match=name):
            decoder(str(tmp_path / "a" / name))
    (tmp_path / "a" / "good.jpg").write_bytes(data)
    with pytest.warns(UserWarning, match="skipped unreadable image"):
        folder = RobustImageFolder(str(tmp_path), loader=decoder, verify=False)
        samples = [folder[i][0] for i in range(len(folder))]
    assert all(s.shape == (3, 64, 64) for s in samples)
