"""RevColV2 as a detectron2 backbone: shapes, padding, FPN, reversible path, checkpoint loading."""
import logging
import math

import pytest
import torch
from detectron2.modeling import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList
from training_helpers import randomize_parameters

from revcolv2.mim import RevColV2MIM
from revcolv2_d2.backbone import LEVEL_NAMES, RevColV2Backbone
from revcolv2_d2.checkpoint import RevColV2Checkpointer

TINY = dict(variant="revcolv2_tiny", embed_dim=32, num_heads=2)


def tiny_backbone(**kw) -> RevColV2Backbone:
    torch.manual_seed(0)
    return RevColV2Backbone(**{**TINY, "window_size": 2, "global_attn_indexes": (3, 7), **kw})


@pytest.mark.parametrize("hw", [(64, 64), (64, 96), (96, 64), (70, 100), (33, 47)])
def test_outputs_match_output_shape(hw):
    bb = tiny_backbone().eval()
    spec = bb.output_shape()
    assert list(spec) == list(LEVEL_NAMES)
    assert [spec[n].stride for n in LEVEL_NAMES] == [4, 8, 16, 32]
    with torch.no_grad():
        out = bb(torch.randn(2, 3, *hw))
    assert list(out) == list(LEVEL_NAMES)
    padded = [math.ceil(s / 32) * 32 for s in hw]  # sizes that are not multiples of 32 are padded
    for name, t in out.items():
        s = spec[name]
        assert t.shape == (2, s.channels, padded[0] // s.stride, padded[1] // s.stride), name
        assert torch.isfinite(t).all()


def test_fpn_on_top_pads_to_square_and_matches_its_output_shape():
    fpn = FPN(bottom_up=tiny_backbone(square_pad=128), in_features=list(LEVEL_NAMES), out_channels=16,
              norm="LN", top_block=LastLevelMaxPool(), square_pad=128).eval()
    assert fpn.size_divisibility == 32 and fpn.padding_constraints == {"square_size": 128}
    assert fpn.bottom_up.padding_constraints == {"size_divisibility": 32, "square_size": 128}
    images = ImageList.from_tensors([torch.randn(3, 70, 100), torch.randn(3, 100, 60)],
                                    fpn.size_divisibility, padding_constraints=fpn.padding_constraints)
    assert images.tensor.shape[-2:] == (128, 128)
    with torch.no_grad():
        out = fpn(images.tensor)
    spec = fpn.output_shape()
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"] == list(spec)
    for name, t in out.items():
        assert t.shape == (2, spec[name].channels, 128 // spec[name].stride, 128 // spec[name].stride)


@pytest.mark.slow
def test_reversible_and_plain_give_the_same_gradients():
    bb = randomize_parameters(tiny_backbone(reversible=True, layer_scale_init=0.1), alphas="large").double().train()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)

    def grads(reversible):
        bb.net.reversible = reversible
        bb.zero_grad()
        sum((t * t).mean() for t in bb(x).values()).backward()
        return {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}

    rev, plain = grads(True), grads(False)
    assert rev.keys() == plain.keys() and len(rev) == len(list(bb.parameters()))
    for n in rev:
        torch.testing.assert_close(rev[n], plain[n], rtol=1e-7, atol=1e-9, msg=n)


def test_levels_reach_their_strides_through_their_own_adapters():
    """Level l of the network's last column, through ``to_strides[l]``, is the feature map
    at stride 4, 8, 16, 32 (randomised parameters: each adapter's own weights and norms)."""
    bb = randomize_parameters(tiny_backbone(layer_scale_init=0.1)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = bb(x)
        levels = bb.net.forward_intermediates(x, intermediates_only=True)
        for l, name in enumerate(LEVEL_NAMES):
            torch.testing.assert_close(out[name], bb.to_strides[l](levels[l]), rtol=0, atol=0, msg=name)


def test_drop_path_is_active_in_training_only():
    bb = tiny_backbone(drop_path_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    bb.eval()
    with torch.no_grad():
        a, b = bb(x)["td2"], bb(x)["td2"]
    torch.testing.assert_close(a, b)
    bb.train()
    torch.manual_seed(1)
    c = bb(x)["td2"]
    torch.manual_seed(2)
    d = bb(x)["td2"]
    assert not torch.allclose(c, d)


def test_unknown_variant_and_out_features_are_rejected():
    with pytest.raises(ValueError, match="revcolv2_huge"):
        RevColV2Backbone(variant="revcolv2_huge")
    with pytest.raises(ValueError, match="td9"):
        RevColV2Backbone(**TINY, out_features=("td0", "td9"))


class _Detector(torch.nn.Module):
    """Stands in for GeneralizedRCNN: a backbone under ``backbone.bottom_up`` plus a head."""

    def __init__(self):
        super().__init__()
        self.backbone = FPN(bottom_up=tiny_backbone(), in_features=list(LEVEL_NAMES), out_channels=16,
                            norm="LN", top_block=LastLevelMaxPool())
        self.head = torch.nn.Linear(16, 2)


def test_mim_checkpoint_loads_through_init_checkpoint(tmp_path, caplog):
    torch.manual_seed(3)
    mim = RevColV2MIM(embed_dim=32, num_heads=2, num_bu_columns=2, num_td_columns=1)
    path = str(tmp_path / "mim.pth")
    torch.save({"model": mim.state_dict(), "epoch": 7}, path)

    det = _Detector()
    with caplog.at_level(logging.INFO):
        RevColV2Checkpointer(det).load(path)
    net = det.backbone.bottom_up.net
    for name, value in mim.state_dict().items():
        if name.startswith(("mask_token", "decoder_", "fc_norm", "head")):
            continue  # pre-training-only tensors are reported as not used
        torch.testing.assert_close(net.state_dict()[name], value, msg=name)
    log = caplog.text
    assert "Loaded" in log and "backbone.bottom_up.net.columns.0.levels.0.blocks.0" in log
    assert "not used by the dense model" in log and "mask_token" in log  # unused, by name
    assert "backbone.fpn_lateral2" in log  # missing in the checkpoint, by name


def test_checkpoint_of_another_size_is_an_error_naming_the_tensor(tmp_path):
    other = RevColV2MIM(embed_dim=64, num_heads=2)
    path = str(tmp_path / "big.pth")
    torch.save(other.state_dict(), path)
    with pytest.raises(ValueError, match=r"backbone\.bottom_up\.net\..*different model size"):
        RevColV2Checkpointer(_Detector()).load(path)
