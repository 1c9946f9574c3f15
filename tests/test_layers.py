"""The contracts of the layers in ``revcolv2.layers`` that the model's own tests do not reach:
their defaults (ViT-B/16's), the errors they raise (one line that says what to fix), the
device they build on, no warning, and the fusion's ``add`` variant. Written for the
survivors of the mutation tool (docs/TESTING.md, "Mutation tool")."""
import warnings

import pytest
import torch

from revcolv2.layers import LEVEL_RECOMPILE_LIMIT, Attention, Fusion, PatchEmbed, allow_level_recompiles, hand_off
from revcolv2.layers import sincos_pos_embed_2d as pos_embed
from revcolv2.model import RevColV2


def test_defaults_are_vit_b16s():
    pe = PatchEmbed()
    assert pe.patch_size == 16 and pe.in_chans == 3
    assert pe.proj.weight.shape == (768, 3, 16, 16) and pe.proj.stride == (16, 16)
    attn = Attention(64, 4)
    assert attn.qkv.bias is not None and attn.qkv.weight.shape == (192, 64)


def test_qkv_bias_reaches_every_attention():
    model = RevColV2(embed_dim=32, num_heads=2, qkv_bias=False, num_classes=0)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    assert attns and all(a.qkv.bias is None and a.proj.bias is not None for a in attns)
    assert Attention(32, 2, qkv_bias=False).qkv.bias is None


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"^embed_dim must be divisible by 4 for 2-D sin-cos embedding, got 30$"):
        pos_embed(2, 3, 30)
    with pytest.raises(ValueError, match=r"^embed_dim 30 is not divisible by num_heads 4$"):
        Attention(30, 4)
    with pytest.raises(ValueError, match=r"^unknown fusion variant 'concat'; expected 'linear' or 'add'$"):
        Fusion(32, "concat")


def test_fusion_add_is_the_identity_without_parameters():
    fus = Fusion(32, "add")
    x = torch.randn(2, 5, 32)
    assert fus.variant == "add" and list(fus.parameters()) == []
    assert fus(x) is x
    linear = Fusion(32)
    assert linear.variant == "linear" and {n for n, _ in linear.named_parameters()} == {
        "norm.weight", "norm.bias", "proj.weight", "proj.bias"}


def test_position_embedding_is_built_on_the_asked_device_without_a_warning():
    """On the meta device (as the detectron2 configs build shapes): every part of the grid
    lives there (a part built on the CPU is a device error); no meshgrid warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta = pos_embed(3, 5, 16, device=torch.device("meta"))
        cpu = pos_embed(3, 5, 16)
    assert meta.device.type == "meta" and meta.shape == cpu.shape == (1, 15, 16)
    assert cpu.dtype == torch.float32 and pos_embed(3, 5, 16, dtype=torch.float64).dtype == torch.float64


def test_hand_off_takes_the_tokens_dtype():
    t = torch.randn(2, 3, 4, dtype=torch.float64)
    fill = torch.randn(1, 6, 4)  # float32
    out = hand_off(t, torch.tensor([[0, 2, 5], [1, 3, 4]]), fill)
    assert out.dtype == torch.float64
    assert torch.equal(out[0, 2], t[0, 1]) and torch.equal(out[0, 1], fill[0, 1].double())


def test_allow_level_recompiles_only_raises_the_limit():
    import torch._dynamo

    # dynamo's own patch (restores the value on exit); pytest's monkeypatch of this config
    # module, in a second test of a run, finds the attribute gone
    with torch._dynamo.config.patch(recompile_limit=8):
        allow_level_recompiles()
        assert torch._dynamo.config.recompile_limit == LEVEL_RECOMPILE_LIMIT == 64
        allow_level_recompiles(100)
        assert torch._dynamo.config.recompile_limit == 100
        allow_level_recompiles(10)
        assert torch._dynamo.config.recompile_limit == 100
