"""The one layer-id rule (docs/ARCHITECTURE.md, "Layer-wise learning-rate decay"), checked on RevColV2-B's grid."""
import pytest

from revcolv2.layer_decay import layer_id, lr_factor_func, lr_scale, max_layer_id, num_layers
from revcolv2.model import RevColV2

B = dict(num_levels=4, blocks_per_level=1, num_bu_columns=2, num_td_columns=1)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("patch_embed.proj.weight", 0),
        ("mask_token", 0),
        ("columns.0.levels.0.blocks.0.attn.qkv.weight", 1),  # position 0, column 0
        ("columns.0.levels.3.blocks.0.mlp.fc1.weight", 4),  # position 3, column 0
        ("columns.1.levels.2.fusion.proj.weight", 4),  # position 2, column 1
        ("columns.1.alphas", 2),  # first block of column 1
        ("columns.2.levels.3.blocks.0.norm1.weight", 3),  # TD: level 3 runs first (position 0)
        ("columns.2.levels.0.blocks.0.norm1.weight", 6),  # TD: level 0 runs last (position 3)
        ("head.weight", 7),
        ("backbone.bottom_up.net.columns.2.levels.0.blocks.0.attn.proj.bias", 6),  # detectron2 names
        ("backbone.fpn_lateral2.weight", 7),
        ("sem_seg_head.psp.0.weight", 7),
    ],
)
def test_layer_ids(name, expected):
    assert layer_id(name, **B) == expected


def test_counts_and_scales():
    assert max_layer_id(**B) == 6 and num_layers(**B) == 8
    assert lr_scale("head.weight", 0.9, **B) == 1.0
    assert lr_scale("patch_embed.proj.weight", 0.9, **B) == pytest.approx(0.9 ** 7)
    f = lr_factor_func(0.9, RevColV2(embed_dim=32, num_heads=2, **B))  # the layout of a built model
    assert f("columns.0.levels.0.blocks.0.attn.qkv.weight") == pytest.approx(0.9 ** 6)


def test_every_parameter_of_a_model_gets_an_id_in_range():
    model = RevColV2(embed_dim=32, num_heads=2, num_classes=3, blocks_per_level=2, num_td_columns=2, out_levels="all")
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert set(ids.values()) == set(range(model.num_layers()))


def test_the_stem_id_names_parameters_that_exist():
    """Id 0 goes to the patch embedding and the MIM mask token, and to nothing else (the
    position embedding is a fixed sin-cos, not a parameter)."""
    from revcolv2.mim import RevColV2MIM

    model = RevColV2MIM(embed_dim=32, num_heads=2, img_size=64)
    stem = {n for n, _ in model.named_parameters() if model.layer_id(n) == 0}
    assert stem == {"patch_embed.proj.weight", "patch_embed.proj.bias", "mask_token"}
    assert layer_id("pos_embed", **B) == max_layer_id(**B) + 1  # no parameter of that name: no stem id
