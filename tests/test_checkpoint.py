import pytest
import timm
import torch

import revcolv2  # noqa: F401
from revcolv2.atomic_io import save_atomic
from revcolv2.checkpoint import load_checkpoint


def test_roundtrip_and_report(tmp_path):
    a = timm.create_model("revcolv2_tiny", num_classes=3)
    b = timm.create_model("revcolv2_tiny", num_classes=3)
    path = tmp_path / "ckpt.pth"
    save_atomic({"model": a.state_dict()}, str(path))
    report = load_checkpoint(b, str(path), verbose=False)
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not list(tmp_path.glob(".tmp_*"))  # no temporary file left behind


def test_a_checkpoint_written_under_ddp_loads_the_same_weights(tmp_path):
    """DistributedDataParallel's state dict names every tensor ``module.<name>``: it loads as
    the unwrapped model's, tensor for tensor."""
    torch.manual_seed(0)
    a = timm.create_model("revcolv2_tiny", num_classes=3, embed_dim=32, num_heads=2)
    b = timm.create_model("revcolv2_tiny", num_classes=3, embed_dim=32, num_heads=2)
    path = tmp_path / "ddp.pth"
    save_atomic({"model": {f"module.{k}": v for k, v in a.state_dict().items()}}, str(path))
    report = load_checkpoint(b, str(path), verbose=False)
    assert not report.missing and not report.unexpected
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_missing_and_unexpected_keys_are_named():
    model = timm.create_model("revcolv2_tiny", num_classes=3)
    sd = model.state_dict()
    sd.pop("head.weight")
    sd["decoder_pred.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"head\.weight(.|\n)*decoder_pred\.weight"):
        load_checkpoint(model, sd, verbose=False)
    report = load_checkpoint(model, sd, allow_missing=("head.",), allow_unexpected=("decoder_pred",), verbose=False)
    assert report.missing == ["head.weight"] and report.unexpected == ["decoder_pred.weight"]


def test_other_model_size_names_the_mismatching_tensor():
    tiny = timm.create_model("revcolv2_tiny", num_classes=3)
    other = timm.create_model("revcolv2_tiny", num_classes=3, embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match=r"'patch_embed\.proj\.weight' has shape \(64, 3, 16, 16\)"):
        load_checkpoint(tiny, other.state_dict(), verbose=False)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pth"
    save_atomic({"x": 1}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"x": Unpicklable()}, str(path))
    assert torch.load(str(path))["x"] == 1
    assert not list(tmp_path.glob(".tmp_*"))
