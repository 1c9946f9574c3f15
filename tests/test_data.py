"""Data: bad files in an image folder, the built-in synthetic dataset, resumable sampling."""
import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from training_helpers import REPO, TINY_MODEL, one_thread, tiny_dataset

from revcolv2.data import EpochSampler, RobustImageFolder, SeededSamples, UnreadableImageError, load_rgb, shard_indices
from revcolv2.synthetic_imagenet import ensure_synthetic_imagenet, generate_synthetic_imagenet

TO_TENSOR = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """ImageFolder with 2 good RGB images per class, a grayscale and an RGBA image, a
    truncated JPEG and a zero-byte file."""
    root = tiny_dataset(tmp_path / "data", classes=2, train_per_class=4, val_per_class=2)
    cls = sorted((root / "train").iterdir())[0]
    Image.fromarray(np.random.randint(0, 255, (40, 40), np.uint8), "L").save(cls / "gray.png")
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200  # red, but fully transparent on the left half
    rgba[:, 20:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(cls / "rgba.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.randint(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    (cls / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (cls / "empty.jpg").write_bytes(b"")
    return root


def test_gray_and_rgba_are_converted_and_bad_files_skipped_with_a_count(messy_folder):
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) of 12") as rec:
        ds = RobustImageFolder(str(messy_folder / "train"), transform=TO_TENSOR)
    msg = str(rec[0].message)
    assert "truncated.jpg" in msg and "empty.jpg" in msg
    assert len(ds) == 10 and len(ds.skipped) == 2
    for i in range(len(ds)):
        img, _ = ds[i]
        assert img.shape == (3, 32, 32)
    rgba = load_rgb(str(next((messy_folder / "train").rglob("rgba.png"))))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert rgba.getpixel((39, 0)) == (200, 0, 0)


def test_strict_mode_fails_clearly(messy_folder):
    with pytest.raises(UnreadableImageError, match="2 unreadable image file.*strict"):
        RobustImageFolder(str(messy_folder / "train"), strict=True)


def test_unverified_folder_skips_bad_files_while_loading(messy_folder):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = RobustImageFolder(str(messy_folder / "train"), transform=TO_TENSOR, verify=False)
        assert len(ds) == 11  # only the empty file is caught without decoding
        bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("truncated.jpg"))
        img, target = ds[bad]  # replaced by the next readable sample
    assert img.shape == (3, 32, 32)
    assert any("skipped unreadable image (1 so far" in str(w.message) for w in rec)
    with pytest.warns(UserWarning, match="empty file"):
        strict = RobustImageFolder(str(messy_folder / "train"), verify=False)
    strict.strict = True  # (strict at construction would already fail on the empty file)
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        strict[bad]


def pretrain_args(data, out, *extra):
    return ["--config", str(REPO / "configs/pretrain/revcolv2_tiny_demo.yaml"), "--data-path", str(data),
            "--output-dir", str(out), "--num-workers", "0", *extra, "--opts", "data.input_size=32",
            f"model.kwargs={TINY_MODEL}", "optim.batch_size=4", "train.batch_per_gpu=4", "schedule.epochs=1",
            "train.vis_images=2"]


@pytest.mark.slow
def test_training_on_a_messy_folder_does_not_crash(messy_folder, tmp_path):
    from revcolv2.cli import pretrain as tool

    with one_thread(), pytest.warns(UserWarning, match="skipped 2 unreadable"):
        out = tool.main(pretrain_args(messy_folder, tmp_path / "run"))
    assert len(out["history"]) == 2  # 10 readable images // batch 4
    assert all(v == v and abs(v) < float("inf") for v in out["history"].values())  # finite losses
    assert out["trainer"].model.decoder_pred.bias.abs().max() > 0  # zero-initialised, moved by the steps
    with one_thread(), pytest.raises(UnreadableImageError):
        tool.main(pretrain_args(messy_folder, tmp_path / "strict", "--strict-data"))


def test_synthetic_dataset_is_generated_once_and_deterministic(tmp_path):
    root = ensure_synthetic_imagenet(tmp_path / "syn", num_classes=3, train_per_class=2, val_per_class=1, size=32)
    files = sorted(p.relative_to(root) for p in root.rglob("*.png"))
    assert len(files) == 9 and {p.parts[0] for p in files} == {"train", "val"}
    stamp = (root / files[0]).stat().st_mtime_ns
    assert ensure_synthetic_imagenet(root) == root and (root / files[0]).stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    again = generate_synthetic_imagenet(tmp_path / "again", num_classes=3, train_per_class=2, val_per_class=1, size=32)
    for f in files:
        assert (root / f).read_bytes() == (again / f).read_bytes()
    with Image.open(root / files[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32)


def test_epoch_sampler_shards_resumes_and_reshuffles():
    shards = [list(EpochSampler(50, 4, rank=r, world_size=3, seed=1)) for r in range(3)]
    flat = [i for s in shards for i, _ in s]
    assert len(flat) == 48 and len(set(flat)) == 48  # 50 // 12 full rounds, disjoint
    s = EpochSampler(50, 4, seed=1)
    s.set_epoch(2)
    whole = list(s)
    s.set_epoch(2, start=8)
    assert list(s) == whole[8:] and len(s) == len(whole) - 8
    s.set_epoch(3)
    assert [i for i, _ in s] != [i for i, _ in whole]
    assert sorted(i for r in range(3) for i in shard_indices(10, r, 3)) == list(range(10))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochSampler(10, 8, world_size=2)


def test_seeded_samples_are_reproducible_and_keep_the_callers_rng():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(1).item(), random.random(), np.random.rand()

    ds = SeededSamples(Noise(), seed=5)
    torch.manual_seed(0)
    state = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a, b, c = ds[(1, 0)], ds[(1, 0)], ds[(1, 1)]
    assert a == b and a != c
    assert torch.equal(state[0], torch.get_rng_state()) and state[1] == random.getstate()
    assert (state[2] == np.random.get_state()[1]).all()
