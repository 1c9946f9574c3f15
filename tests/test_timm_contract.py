"""timm's model contract, checked on every registered RevColV2 preset the way timm's own
model tests do: forward at a small size, ``features_only``,
``forward_intermediates``, ``reset_classifier``, ``set_grad_checkpointing``,
``group_matcher`` and ``pretrained_cfg``.

The tiny preset runs for real; base and large are built on the meta device (shapes and
metadata only, no memory and no init cost), so the loop stays cheap."""
import contextlib

import pytest
import timm
import torch
from timm.models import group_parameters

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.model import MODEL_CFGS

PRESETS = timm.list_models("revcolv2_*")
SIZE = 32  # 2x2 tokens


def _device(name: str):
    return contextlib.nullcontext() if name == "revcolv2_tiny" else torch.device("meta")


def _create(name: str, **kwargs):
    with _device(name):
        return timm.create_model(name, **kwargs)


def _input(model, batch: int = 2):
    return torch.randn(batch, 3, SIZE, SIZE, device=next(model.parameters()).device)


def test_every_preset_is_registered_and_covered():
    assert set(PRESETS) == set(MODEL_CFGS)


@pytest.mark.parametrize("name", PRESETS)
def test_forward_at_a_small_size(name):
    model = _create(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (2, 7)
    if out.device.type != "meta":
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", PRESETS)
def test_features_only(name):
    model = _create(name, features_only=True)
    dim = MODEL_CFGS[name]["embed_dim"]
    assert model.feature_info.channels() == [dim] * 4
    assert model.feature_info.reduction() == [16] * 4
    with torch.no_grad():
        feats = model(_input(model))
    assert [tuple(f.shape) for f in feats] == [(2, dim, SIZE // 16, SIZE // 16)] * 4
    # out_indices picks levels, level 0 first
    picked = _create(name, features_only=True, out_indices=(1, 3)).eval()
    assert picked.feature_info.channels() == [dim] * 2
    if name == "revcolv2_tiny":
        with torch.no_grad():
            full = _create(name, num_classes=0).eval()
            full.load_state_dict(picked.model.state_dict(), strict=False)  # features_only drops fc_norm
            ref = full.forward_intermediates(_input(full).fill_(0.5), intermediates_only=True)
            got = picked(_input(picked).fill_(0.5))
        assert torch.equal(got[0], ref[1]) and torch.equal(got[1], ref[3])


@pytest.mark.parametrize("name", PRESETS)
def test_forward_intermediates(name):
    model = _create(name, num_classes=0).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    x = _input(model)
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        assert len(levels) == len(model.feature_info) == 4
        assert all(t.shape == (2, dim, 2, 2) for t in levels)
        assert final.shape == (2, 4, dim)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
        assert [t.shape for t in last_two] == [(2, 4, dim)] * 2
        if x.device.type != "meta":
            assert torch.equal(final, model.forward_features(x))
            assert torch.equal(last_two[1], levels[3].flatten(2).transpose(1, 2))
            assert torch.equal(final, levels[3].flatten(2).transpose(1, 2))  # the top level
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", PRESETS)
def test_reset_classifier_and_global_pool(name):
    model = _create(name, num_classes=5).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    tokens = torch.zeros(2, 4, dim, device=next(model.parameters()).device)  # forward_features' output
    with _device(name):  # the new head is made on the default device, as in timm
        model.reset_classifier(11)
    assert model.get_classifier().out_features == 11 and model.forward_head(tokens).shape == (2, 11)
    model.reset_classifier(0)
    assert model.forward_head(tokens).shape == (2, dim)  # pre-logits
    # global_pool='' is timm's "no pooling": one output per token, nothing taken from token 0
    with _device(name):
        model.reset_classifier(3, global_pool="")
    assert model.forward_head(tokens).shape == (2, 4, 3)
    if name == "revcolv2_tiny":
        with torch.no_grad():
            assert model(_input(model)).shape == (2, 4, 3)
            unpooled = _create(name, num_classes=0, global_pool="").eval()
            assert unpooled(_input(unpooled)).shape == (2, 4, dim)
    with pytest.raises(ValueError, match="global_pool"):
        _create(name, global_pool="token")


@pytest.mark.parametrize("name", PRESETS)
def test_set_grad_checkpointing(name):
    model = _create(name, num_classes=3)
    model.set_grad_checkpointing(False)
    assert not model.reversible
    model.set_grad_checkpointing()
    assert model.reversible
    if name == "revcolv2_tiny":
        # a reversible training step gives a gradient to every parameter that can reach the
        # classifier, and to nothing else: the levels that cannot are frozen, as fine-tuning does
        frozen = set(model.freeze_unused_levels())
        assert frozen
        model.train()
        model(_input(model)).sum().backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n not in frozen), n


@pytest.mark.parametrize("name", PRESETS)
def test_group_matcher(name):
    model = _create(name, num_classes=3)
    groups = group_parameters(model, model.group_matcher())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    assert len(groups) == model.num_layers()
    # embeddings first, classifier last
    assert "patch_embed.proj.weight" in groups[min(groups)] and "head.weight" in groups[max(groups)]


@pytest.mark.parametrize("name", PRESETS)
def test_pretrained_cfg(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224) and len(cfg["mean"]) == len(cfg["std"]) == 3
    modules = dict(model.named_modules())
    assert cfg["first_conv"] in modules and cfg["classifier"] in modules
    assert cfg["num_classes"] == model.num_classes == 1000
