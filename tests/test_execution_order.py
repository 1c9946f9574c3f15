"""Configured per-block values reach the blocks in the order the columns run them.

A bottom-up (BU) column runs its levels 0 -> 3, a top-down (TD) column 3 -> 0, so in a TD
column "level number" and "execution position" differ. Every configured per-block value
counts blocks in execution order (column by column, levels in the column's update order,
blocks within a level in order):

- drop path: a block at execution index k of K has rate ``drop_path_rate * k / (K - 1)``
  (stochastic depth growing linearly with depth, as timm and MAE); in training mode each
  sample's residual branch is either dropped (scale 0) or kept and scaled by 1 / (1 - rate);
- ``global_attn_indexes``: the blocks at those execution indexes attend globally, every
  other block within its window.

Both are observed on what each block computes (forward hooks on the blocks and on their
``attn`` / ``mlp`` branches), on a model that keeps every level (the MIM model: a
classifier may leave out levels its forward never runs).
"""
import pytest
import torch
from training_helpers import randomize_parameters

from revcolv2.mim import create_mim_model

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)

# (column, level) in the order revcolv2_tiny's columns run them: 2 BU columns, then 1 TD column
EXECUTION_ORDER = [(0, 0), (0, 1), (0, 2), (0, 3),
                   (1, 0), (1, 1), (1, 2), (1, 3),
                   (2, 3), (2, 2), (2, 1), (2, 0)]


def blocks_of(model):
    """{(column, level): its (only) block}; revcolv2_tiny has one block per level."""
    assert model.blocks_per_level == 1
    return {(j, l): model.columns[j].levels[l].blocks[0] for j, l in EXECUTION_ORDER}


def branch_scales(model, x):
    """Per block, per sample: the factors (s_attn, s_mlp) with which its two residual branches
    entered its output, solved from ``out - in = s_attn * attn_branch + s_mlp * mlp_branch``
    (least squares over the sample's tokens and channels, float64)."""
    seen = {}
    hooks = []
    for key, block in blocks_of(model).items():
        rec = seen.setdefault(key, {})
        hooks += [
            block.register_forward_pre_hook(lambda m, args, rec=rec: rec.__setitem__("in", args[0])),
            block.register_forward_hook(lambda m, args, out, rec=rec: rec.__setitem__("out", out)),
            block.attn.register_forward_hook(lambda m, args, out, rec=rec: rec.__setitem__("attn", out)),
            block.mlp.register_forward_hook(lambda m, args, out, rec=rec: rec.__setitem__("mlp", out)),
        ]
    try:
        model.forward_columns(x)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for key, rec in seen.items():
        assert set(rec) == {"in", "out", "attn", "mlp"}, f"block {key} ran without its attn / mlp branches"
        delta = (rec["out"] - rec["in"]).flatten(1)  # (B, N*D)
        basis = torch.stack([rec["attn"].flatten(1), rec["mlp"].flatten(1)], dim=-1)  # (B, N*D, 2)
        sol = torch.linalg.lstsq(basis, delta.unsqueeze(-1)).solution.squeeze(-1)  # (B, 2)
        resid = (basis @ sol.unsqueeze(-1)).squeeze(-1) - delta
        assert resid.abs().max() < 1e-9 * (1 + delta.abs().max()), f"block {key}: out - in is not a sum of its branches"
        scales[key] = sol
    return scales


@pytest.mark.parametrize("reversible", [False, True])
def test_drop_path_keeps_branches_at_one_over_keep_probability_with_rates_in_execution_order(reversible):
    rate = 0.5
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", drop_path_rate=rate, reversible=reversible, **TINY)
    model = randomize_parameters(model, alphas="large").double().train()
    x = torch.randn(16, 3, 24, 40, dtype=torch.float64)  # 3x5 tokens
    with torch.set_grad_enabled(reversible):  # the reversible engine runs when gradients are on
        torch.manual_seed(1)
        scales = branch_scales(model, x)
    k_last = len(EXECUTION_ORDER) - 1
    dropped = kept = 0
    for k, key in enumerate(EXECUTION_ORDER):
        p = rate * k / k_last  # the rule, stated in execution order
        s = scales[key]
        is_dropped = s.abs() < 1e-6
        is_kept = (s - 1 / (1 - p)).abs() < 1e-6  # the rates are a float32 buffer
        assert (is_dropped | is_kept).all(), (
            f"block {k} in execution order (column {key[0]}, level {key[1]}): branch scales "
            f"{sorted(set(round(v, 4) for v in s.flatten().tolist()))}, "
            f"expected 0 or 1/(1-{p:.3f}) = {1 / (1 - p):.4f}")
        assert is_kept.any(dim=0).all(), f"block {key}: a branch was dropped for every sample"
        dropped += int(is_dropped.sum())
        kept += int(is_kept.sum())
    assert dropped > 0 and kept > 0
    # each branch has its own draw: some sample keeps one branch of a block and drops the other
    one_of_two = sum(int(((s[:, 0].abs() < 1e-6) != (s[:, 1].abs() < 1e-6)).sum()) for s in scales.values())
    assert one_of_two > 0, "no sample kept one branch of a block and dropped the other: the branches share a draw"
    # the last TD column runs level 3 first: it has that column's smallest rate, level 0 the largest
    assert EXECUTION_ORDER.index((2, 3)) < EXECUTION_ORDER.index((2, 0))


def test_no_branch_is_dropped_or_scaled_in_eval_mode():
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", drop_path_rate=0.5, reversible=False, **TINY).double().eval()
    with torch.no_grad():
        scales = branch_scales(model, torch.randn(2, 3, 24, 40, dtype=torch.float64))
    for key, s in scales.items():
        torch.testing.assert_close(s, torch.ones_like(s), rtol=0, atol=1e-9, msg=lambda m: f"block {key}: {m}")


def _attends_beyond_its_window(block, args, kwargs, far_token):
    """Whether the block's output at token 0 changes when its input changes at ``far_token``."""
    x = args[0]
    moved = x.clone()
    moved[:, far_token] += torch.randn(x.shape[-1], dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = block(x, *args[1:], **kwargs)
        b = block(moved, *args[1:], **kwargs)
    return bool((a[:, 0] - b[:, 0]).abs().max() > 1e-6)


def test_global_attention_indexes_count_blocks_in_execution_order():
    global_indexes = (1, 6, 8)  # BU column 0 level 1, BU column 1 level 2, TD column level 3
    torch.manual_seed(0)
    model = create_mim_model("revcolv2_tiny", window_size=2, global_attn_indexes=global_indexes,
                             reversible=False, **TINY).double().eval()
    x = torch.randn(1, 3, 32, 48, dtype=torch.float64)  # 4x6 tokens: 2x3 windows of 2x2
    far = 3 * 6 + 5  # token (row 3, column 5), outside token 0's 2x2 window
    calls = {}
    hooks = [block.register_forward_pre_hook(
        lambda m, args, kwargs, key=key: calls.__setitem__(key, (args, kwargs)), with_kwargs=True)
        for key, block in blocks_of(model).items()]
    with torch.no_grad():
        model.forward_columns(x)
    for h in hooks:
        h.remove()
    blocks = blocks_of(model)
    attends_globally = [k for k, key in enumerate(EXECUTION_ORDER)
                        if _attends_beyond_its_window(blocks[key], *calls[key], far)]
    assert attends_globally == list(global_indexes)
