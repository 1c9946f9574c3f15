"""Masked image modeling: masking, the BU -> TD hand-off and the masked-patch loss."""
import pytest
import torch

from revcolv2.layers import hand_off
from revcolv2.mim import (
    RevColV2MIM,
    create_mim_model,
    normalize_patches,
    num_visible,
    patch_mean_std,
    patchify,
    random_masking,
    unpatchify,
)

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_mim(**kwargs) -> RevColV2MIM:
    torch.manual_seed(0)
    return create_mim_model("revcolv2_tiny", **dict(TINY, **kwargs))


def test_random_masking_keeps_the_configured_number_in_raster_order():
    for ratio, visible in ((0.75, 4), (0.5, 8), (0.25, 12)):
        visible_ids, mask = random_masking(3, 16, ratio)
        assert visible_ids.shape == (3, visible) and num_visible(16, ratio) == visible
        assert torch.all(visible_ids[:, 1:] > visible_ids[:, :-1])  # ascending, no repeats
        assert torch.all(mask.sum(1) == 16 - visible)
        assert torch.all(mask.gather(1, visible_ids) == 0)
    with pytest.raises(ValueError):
        random_masking(1, 16, 1.0)


@pytest.mark.parametrize("ratio", [0.0, 0.01, 0.97, 1.0, -0.5, True])
def test_one_masking_rule_for_the_masking_the_model_and_its_construction(ratio):
    """A ratio that leaves no patch masked or none visible (16 patches: 0.01 rounds to 16
    visible, 0.97 to 0) is refused alike by random_masking, the forward pass and the
    constructor, with the same message."""
    with pytest.raises(ValueError, match="mask_ratio") as direct:
        random_masking(1, 16, ratio)
    with pytest.raises(ValueError, match="mask_ratio") as forward:
        tiny_mim()(torch.randn(1, 3, 32, 32), mask_ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio") as built:
        tiny_mim(img_size=32, mask_ratio=ratio)
    assert str(direct.value) == str(forward.value) == str(built.value)


def test_patch_normalisation_is_one_function_for_target_and_pixels():
    patches = patchify(torch.rand(2, 3, 32, 32), 8)
    normed = normalize_patches(patches)
    mean, std = patch_mean_std(patches)
    assert torch.allclose(normed * std + mean, patches, atol=1e-6)
    flat = torch.full((1, 1, 192), 0.5)  # a flat patch stays finite (eps)
    assert torch.equal(normalize_patches(flat), torch.zeros_like(flat))


def test_hand_off_puts_visible_tokens_back_at_their_positions():
    b, n, d = 2, 16, 8
    tokens = torch.randn(b, n, d)
    visible_ids, mask = random_masking(b, n, 0.75)
    visible = tokens.gather(1, visible_ids[..., None].expand(-1, -1, d))
    fill = torch.randn(1, n, d)
    full = hand_off(visible, visible_ids, fill)
    m = mask.bool()[..., None]
    assert torch.equal(torch.where(m, 0, full), torch.where(m, 0, tokens))  # visible: restored in place
    assert torch.equal(torch.where(m, full, 0), torch.where(m, fill.expand(b, -1, -1), 0))  # holes: fill


@pytest.mark.parametrize("reversible", [False, True])
def test_bottom_up_columns_see_only_visible_tokens(reversible):
    model = tiny_mim(reversible=reversible)
    seen = {}

    def hook(name):
        return lambda mod, inp, out: seen.setdefault(name, []).append(inp[0].shape[1])

    model.columns[0].levels[0].blocks[0].register_forward_hook(hook("bu"))
    model.columns[-1].levels[0].blocks[0].register_forward_hook(hook("td"))
    out = model(torch.randn(2, 3, 32, 32))  # 16 patches, 4 visible
    assert set(seen["bu"]) == {4} and set(seen["td"]) == {16}
    assert out["pred"].shape == (2, 16, 8 * 8 * 3) and out["mask"].sum().item() == 2 * 12
    out["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_loss_ignores_visible_patches():
    model = tiny_mim()
    imgs = torch.randn(2, 3, 32, 32)
    out = model(imgs)
    target = model.reconstruction_target(imgs)
    visible = (out["mask"] == 0)[..., None]
    pred = out["pred"].detach()
    changed_visible = torch.where(visible, pred + 100 * torch.randn_like(pred), pred)
    base = model.masked_mse(pred, target, out["mask"])
    assert torch.allclose(out["loss"].detach(), base)
    assert model.masked_mse(changed_visible, target, out["mask"]).item() == pytest.approx(base.item(), abs=1e-6)
    changed_masked = torch.where(visible, pred, pred + 1.0)
    assert model.masked_mse(changed_masked, target, out["mask"]).item() > base.item() + 0.5
    # and no gradient reaches a visible prediction
    p = pred.clone().requires_grad_(True)
    model.masked_mse(p, target, out["mask"]).backward()
    assert torch.all(p.grad[visible.expand_as(p)] == 0)


def test_targets_normalized_per_patch_or_raw():
    imgs = torch.rand(2, 3, 32, 32)
    norm = tiny_mim(norm_pix_loss=True).reconstruction_target(imgs)
    assert torch.allclose(norm.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(norm.var(-1), torch.ones(2, 16), atol=1e-3), f"per-patch variances {norm.var(-1)[0, :4]}"
    raw = tiny_mim(norm_pix_loss=False).reconstruction_target(imgs)
    assert torch.equal(raw, patchify(imgs, 8))
    assert torch.equal(unpatchify(raw, 8, (4, 4)), imgs)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_prediction_to_pixels_inverts_the_target(norm_pix):
    model = tiny_mim(norm_pix_loss=norm_pix)
    imgs = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.prediction_to_pixels(model.reconstruction_target(imgs), imgs), imgs, atol=1e-4)


def test_given_mask_and_generator_are_reproducible_and_leave_global_rng_alone():
    model = tiny_mim().eval()
    imgs = torch.randn(2, 3, 32, 32)
    state = torch.get_rng_state()
    a = model(imgs, generator=torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.get_rng_state())
    b = model(imgs, visible_ids=a["visible_ids"])
    assert torch.equal(a["mask"], b["mask"]) and torch.allclose(a["loss"], b["loss"])


def test_reversible_and_plain_give_the_same_loss_and_gradients():
    """On randomised parameters: mask token, decoder norm and bias, every norm, alpha."""
    from training_helpers import randomize_parameters

    plain = randomize_parameters(tiny_mim(reversible=False, layer_scale_init=0.1), alphas="large")
    rev = tiny_mim(reversible=True, layer_scale_init=0.1)
    rev.load_state_dict(plain.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    visible_ids, _ = random_masking(2, 16, 0.75)
    lp, lr = plain(imgs, visible_ids=visible_ids)["loss"], rev(imgs, visible_ids=visible_ids)["loss"]
    lp.backward()
    lr.backward()
    assert torch.allclose(lp, lr, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), rev.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_mask_token_and_alphas_are_not_weight_decayed():
    assert {"mask_token"} <= tiny_mim().no_weight_decay()
    assert any(n.endswith("alphas") for n in tiny_mim().no_weight_decay())
