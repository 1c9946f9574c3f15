"""Non-square token grids: a token keeps its (row, column) through the position embedding,
the patch targets and the feature maps.

Square inputs (224x224 classification, 1024x1024 detection) hide a grid built as (w, h):
every test here uses grids of 3x5 and 5x3 tokens, and compares against the square grid
or against the image itself.
"""
import pytest
import torch

from revcolv2.mim import create_mim_model, patchify, unpatchify

pytestmark = pytest.mark.usefixtures("single_thread")

P = 8  # patch size of the tiny models
TINY = dict(embed_dim=32, num_heads=2, patch_size=P)


def column_source(model, h_tokens, w_tokens):
    """What the first column receives for a black image of h x w tokens, with the patch
    projection's bias zeroed: the position embedding alone, (h*w, D)."""
    store = {}
    hook = model.columns[0].register_forward_pre_hook(lambda m, args: store.__setitem__("source", args[0]))
    with torch.no_grad():
        model.forward_columns(torch.zeros(1, 3, h_tokens * P, w_tokens * P, dtype=torch.float64))
    hook.remove()
    return store["source"][0]


@pytest.mark.parametrize("hw", [(3, 5), (5, 3)])
def test_position_embedding_of_a_cell_is_the_square_grids(hw):
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", reversible=False, **TINY).double().eval()
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
    h, w = hw
    n = max(h, w)
    grid = column_source(model, h, w)  # (h*w, D), raster order
    square = column_source(model, n, n)  # (n*n, D)
    assert grid.shape == (h * w, model.embed_dim)
    for r in range(h):
        for c in range(w):
            torch.testing.assert_close(grid[r * w + c], square[r * n + c], rtol=0, atol=1e-12,
                                       msg=lambda m: f"token (row {r}, column {c}) of a {h}x{w} grid: {m}")
    assert not torch.allclose(square[1], square[n])  # (0, 1) and (1, 0) differ: rows are not columns


@pytest.mark.parametrize("hw", [(2, 5), (5, 2)])
def test_patch_targets_follow_the_image_in_raster_order(hw):
    h, w = hw
    imgs = torch.randn(2, 3, h * P, w * P)
    patches = patchify(imgs, P)  # (B, h*w, P*P*3)
    assert patches.shape == (2, h * w, P * P * 3)
    for r in range(h):
        for c in range(w):
            cell = imgs[:, :, r * P:(r + 1) * P, c * P:(c + 1) * P]  # (B, 3, P, P)
            expected = cell.permute(0, 2, 3, 1).reshape(2, -1)  # pixels (py, px, channel)
            assert torch.equal(patches[:, r * w + c], expected), f"patch (row {r}, column {c})"
    assert torch.equal(unpatchify(patches, P, (h, w)), imgs)


@pytest.mark.parametrize("hw", [(2, 5), (5, 2)])
def test_predicted_patches_go_back_to_their_place_in_the_image(hw):
    """The MIM visualisation's inverse: a prediction equal to the target is the image again."""
    h, w = hw
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", **TINY)
    imgs = torch.rand(2, 3, h * P, w * P)
    back = model.prediction_to_pixels(model.reconstruction_target(imgs), imgs)
    assert back.shape == imgs.shape
    torch.testing.assert_close(back, imgs, rtol=0, atol=1e-4)


def test_feature_maps_hold_each_token_at_its_row_and_column():
    """forward_intermediates' NCHW maps (what the detectron2 backbone reads) put token
    r * w + c of the NLC output at (r, c)."""
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", reversible=False, **TINY).eval()
    x = torch.randn(1, 3, 3 * P, 5 * P)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        tokens = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
    for level, (m, t) in enumerate(zip(maps, tokens)):
        assert m.shape == (1, model.embed_dim, 3, 5), level
        for r in range(3):
            for c in range(5):
                assert torch.equal(m[0, :, r, c], t[0, r * 5 + c]), \
                    f"level {level}: map cell ({r}, {c}) is not token {r * 5 + c}"
