"""Checkpoints: one rule for which weights are taken (EMA where present unless ema=False),
the same at every entry point and printed; RNG states that load with weights_only and
restore exactly; one shape check."""
import logging
import random

import numpy as np
import pytest
import timm
import torch

import revcolv2  # noqa: F401
from revcolv2.atomic_io import save_atomic
from revcolv2.checkpoint import load_checkpoint, load_file
from revcolv2.classification import load_pretrained
from revcolv2.rng import rng_state, set_rng_state

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


def classifier():
    return timm.create_model("revcolv2_tiny", num_classes=3, **TINY)


@pytest.fixture
def two_weights(tmp_path):
    """A fine-tuning checkpoint whose raw and EMA weights differ everywhere."""
    torch.manual_seed(0)
    raw, ema = classifier().state_dict(), classifier().state_dict()
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"model": raw, "model_ema": ema, "optimizer": {}, "step": 3}, str(path))
    return path, raw, ema


def _equal(model_sd, ref, prefix=""):
    keys = [k for k in ref if not k.startswith(("head.", "fc_norm."))]
    return all(torch.equal(model_sd[prefix + k], ref[k]) for k in keys)


def test_every_entry_point_takes_the_ema_weights_and_says_so(two_weights, capsys, caplog):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    path, raw, ema = two_weights
    m = classifier()
    load_checkpoint(m, str(path))
    assert _equal(m.state_dict(), ema)
    assert "its EMA weights" in capsys.readouterr().out
    m = classifier()
    load_pretrained(m, str(path))
    assert _equal(m.state_dict(), ema)
    assert "its EMA weights" in capsys.readouterr().out
    det = torch.nn.Sequential(timm.create_model("revcolv2_tiny", num_classes=0, **TINY))
    with caplog.at_level(logging.INFO):
        RevColV2Checkpointer(det).load(str(path))
    assert _equal(det.state_dict(), ema, prefix="0.")
    assert f"weights: {path}: its EMA weights" in caplog.text


def test_ema_false_takes_the_raw_weights_everywhere(two_weights, capsys):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    path, raw, ema = two_weights
    m = classifier()
    load_checkpoint(m, str(path), ema=False)
    assert _equal(m.state_dict(), raw)
    m = classifier()
    load_pretrained(m, str(path), ema=False)
    assert _equal(m.state_dict(), raw)
    assert "its raw weights" in capsys.readouterr().out
    det = torch.nn.Sequential(timm.create_model("revcolv2_tiny", num_classes=0, **TINY))
    RevColV2Checkpointer(det, ema=False).load(str(path))
    assert _equal(det.state_dict(), raw, prefix="0.")


def test_shape_mismatch_names_file_and_tensor_at_every_entry_point(tmp_path):
    from revcolv2_d2.checkpoint import RevColV2Checkpointer

    other = timm.create_model("revcolv2_tiny", num_classes=3, embed_dim=64, num_heads=2, patch_size=8)
    path = tmp_path / "wide.pth"
    save_atomic({"model": other.state_dict()}, str(path))
    pattern = (rf"{path}: checkpoint tensor '.*patch_embed\.proj\.weight' has shape \(64, 3, 8, 8\)"
               r".*different model size")
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(classifier(), str(path), verbose=False)
    with pytest.raises(ValueError, match=pattern):
        load_pretrained(classifier(), str(path), verbose=False)
    det = torch.nn.Sequential(timm.create_model("revcolv2_tiny", num_classes=0, **TINY))
    with pytest.raises(ValueError, match=pattern):
        RevColV2Checkpointer(det).load(str(path))


def _draws():
    # numpy's randn first: it returns the cached second gaussian when the state holds one
    return random.random(), float(np.random.randn()), float(np.random.rand()), float(torch.rand(1))


def test_rng_state_loads_with_weights_only_and_restores_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    expected = _draws()
    save_atomic({"rng": [state]}, str(tmp_path / "c.pth"))
    torch.load(tmp_path / "c.pth", weights_only=True)  # plain torch, no allowlist needed
    restored = load_file(tmp_path / "c.pth")["rng"][0]
    _draws()
    set_rng_state(restored)
    assert _draws() == expected


def test_rng_state_of_older_checkpoints_still_loads(tmp_path):
    """Checkpoints written before the change hold numpy's state as (str, ndarray, ...): they
    load (numpy arrays are allowed, nothing else) and restore."""
    np.random.seed(5)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = _draws()
    torch.save({"rng": [old]}, tmp_path / "old.pth")
    set_rng_state(load_file(tmp_path / "old.pth")["rng"][0])
    assert _draws() == expected
