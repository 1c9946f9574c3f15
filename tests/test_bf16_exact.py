"""Exact values under bf16 autocast: the constants of the bf16 path keep their float32 values.

Under autocast the blocks' matmuls run in bf16 while the column states stay float32. A scale
or a constant that passes through the branch's dtype on its way changes its value slightly
(1/0.9 = 1.1111112 in float32 is 1.109375 in bf16): the outputs move by less than any
tolerance a bf16 test can use, and the comparison of two modes (reversible and plain) cannot
see it, as both take the same path. Here the values are checked bit for bit, each against
float32 arithmetic done outside the model:

- each sample's residual branch enters the state scaled by exactly 0 or 1 / keep_prob, with
  keep_prob = 1 - rate computed in float32 from the block's rate, in every block, in the
  plain forward, in the reversible engine's forward and in its rebuild (CPU autocast:
  ``revcolv2.amp.autocast(device, 'bf16', cuda_only=False)``);
- the alphas of the update are clamped to exactly +-alpha_min (float32) and applied in float32;
- the position embedding added to the patch tokens is the float32 embedding;
- the MIM hand-off puts exactly mask token + position (float32) at the masked positions;
- the MIM target is the float32 one (the eps of its per-patch normalisation included), and
  the loss is taken in float32.
"""
import pytest
import torch
from reference_revcolv2 import patch_targets
from training_helpers import randomize_parameters

import revcolv2.model as model_module
from revcolv2.amp import autocast
from revcolv2.layers import sincos_pos_embed_2d
from revcolv2.mim import RevColV2MIM
from revcolv2.model import Column, RevColV2

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(embed_dim=32, num_heads=2, patch_size=8)


def bf16():
    return autocast("cpu", "bf16", cuda_only=False)


def _model(cls=RevColV2, **kw):
    cfg = dict(SMALL, num_classes=3, blocks_per_level=2, num_td_columns=1, out_levels="all", drop_path_rate=0.6)
    cfg.update(kw)
    torch.manual_seed(0)
    return randomize_parameters(cls(**cfg), seed=5, alphas="large")


class ResidualCalls:
    """Every ``residual_add`` of the blocks: (x, branch, scale argument, output)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = model_module.residual_add

        def spy(x, branch, scale=None):
            out = real(x, branch, scale)
            self.calls.append((x.detach(), branch.detach(), None if scale is None else scale.detach(), out.detach()))
            return out

        monkeypatch.setattr(model_module, "residual_add", spy)


def _expected_factors(model):
    """Per block in execution order: 1 / (1 - rate), both in float32 (the state's dtype)."""
    rates = model.drop_rates.to(torch.float32)
    one = torch.tensor(1.0, dtype=torch.float32)
    return [one / (one - r) for r in rates]


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
@pytest.mark.parametrize("amp", [True, False], ids=["bf16", "fp32"])
def test_each_branch_is_scaled_by_exactly_0_or_one_over_keep_prob(monkeypatch, reversible, amp):
    model = _model(reversible=reversible).train()
    spy = ResidualCalls(monkeypatch)
    x = torch.randn(8, 3, 32, 40)
    torch.manual_seed(1)
    with bf16() if amp else torch.autocast("cpu", enabled=False):
        bu, td, _ = model.forward_columns(x)
        forward_calls = len(spy.calls)
        sum(t.float().sum() for t in td).backward()  # the reversible engine rebuilds its levels here
    blocks = len(model.columns) * model.blocks_per_column
    assert forward_calls == 2 * blocks  # two branches per block, every block once
    if reversible:
        assert len(spy.calls) > forward_calls  # the rebuild ran the blocks again
    factors = _expected_factors(model)
    kept_scaled = dropped = 0
    for i, (state, branch, scale, out) in enumerate(spy.calls):
        k = (i % forward_calls) // 2 if i < forward_calls else None
        assert state.dtype == out.dtype == torch.float32
        assert branch.dtype == (torch.bfloat16 if amp else torch.float32)
        assert scale is not None and scale.shape == (8,)
        kept = scale != 0
        if k is not None:  # the forward: the block's own factor, known from its execution index
            expected = torch.where(kept, factors[k], torch.tensor(0.0))
            assert torch.equal(scale[kept], expected[kept]), (
                f"block {k}: factors {scale[kept].tolist()}, expected {factors[k].item()!r}")
        else:  # the rebuild: the factors it replays are the forward's, checked above
            expected = torch.where(kept, scale, torch.tensor(0.0))
        applied = torch.addcmul(state, branch.float(), expected.view(-1, 1, 1))  # float32: x + branch * factor
        assert torch.equal(out, applied), (
            f"call {i}: the branch entered the state with another factor than {expected.tolist()} "
            f"(largest difference {(out - applied).abs().max().item():.3g})")
        assert torch.equal(out[~kept], state[~kept])  # a dropped branch leaves the state exactly
        kept_scaled += int((kept & (scale != 1)).sum())
        dropped += int((~kept).sum())
    assert kept_scaled > 0 and dropped > 0


def test_alphas_are_clamped_and_applied_in_float32(monkeypatch):
    """Under autocast each update uses alpha with |alpha| >= alpha_min exactly (float32
    1e-3, sign kept, + at 0) and computes alpha * prev + F in float32."""
    model = _model(drop_path_rate=0.0)
    randomize_parameters(model, seed=6)  # mixed alphas: 0, below and around alpha_min, both signs
    steps = []
    real = Column.step_from

    def spy(f, prev_l, alpha):
        out = real(f, prev_l, alpha)
        if prev_l is not None:
            steps.append((f, prev_l, alpha, out))
        return out

    monkeypatch.setattr(Column, "step_from", staticmethod(spy))
    with torch.no_grad(), bf16():
        model.eval().forward_columns(torch.randn(2, 3, 32, 40))
    floor = torch.tensor(1e-3, dtype=torch.float32)
    expected_rows = []
    for col in model.columns[1:]:
        a = col.alphas.detach()
        expected_rows += [torch.where(a[l].abs() >= floor, a[l], torch.where(a[l] < 0, -floor, floor))
                          for l in col.order]
    assert len(steps) == len(expected_rows) == 8
    clamped = 0
    for (f, prev, alpha, out), want in zip(steps, expected_rows):
        assert alpha.dtype == f.dtype == prev.dtype == out.dtype == torch.float32
        assert torch.equal(alpha, want)
        assert torch.equal(out, torch.addcmul(f, want, prev))
        clamped += int((want.abs() == floor).sum())
    assert clamped > 0


def test_position_embedding_is_the_float32_one():
    model = _model()
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad(), bf16():
        tokens, pos, hw = model.embed(x)
        patches, _ = model.patch_embed(x)
    ref = sincos_pos_embed_2d(4, 5, 32)  # float32, outside autocast
    assert hw == (4, 5) and pos.dtype == tokens.dtype == torch.float32
    assert torch.equal(pos, ref)
    assert torch.equal(tokens, patches.float() + ref)


def test_mim_hand_off_puts_exactly_mask_token_plus_position_at_the_holes():
    model = _model(RevColV2MIM, num_classes=0, drop_path_rate=0.0, blocks_per_level=1).eval()
    nb = model.num_bu_columns
    seen = {}
    model.columns[nb].register_forward_pre_hook(lambda m, args: seen.update(source=args[0], prev=args[1]))
    x = torch.randn(2, 3, 32, 40)
    visible_ids = torch.tensor([[0, 3, 4, 9, 15], [1, 2, 7, 12, 19]])
    with torch.no_grad(), bf16():
        model(x, visible_ids=visible_ids)
    fill = (model.mask_token.detach().float() + sincos_pos_embed_2d(4, 5, 32)).expand(2, -1, -1)
    holes = torch.ones(2, 20, dtype=torch.bool)
    holes.scatter_(1, visible_ids, False)
    for name, t in [("source", seen["source"])] + [(f"level {l}", s) for l, s in enumerate(seen["prev"])]:
        assert t.dtype == torch.float32, name
        assert torch.equal(t[holes], fill[holes]), f"{name}: the holes do not hold mask token + position"


def test_mim_target_and_loss_are_float32_with_the_normalisation_eps():
    """The target of a patch whose variance is near eps (1e-6) shows eps at float32 precision;
    under autocast the target and the loss are those computed in float32 outside it."""
    model = _model(RevColV2MIM, num_classes=0, drop_path_rate=0.0, blocks_per_level=1).eval()
    x = torch.randn(2, 3, 32, 40)
    x[0, :, :8, :8] = 0.5 + 1e-3 * torch.randn(3, 8, 8)  # patch 0: variance ~1e-6
    visible_ids = torch.tensor([[0, 3, 4, 9, 15], [1, 2, 7, 12, 19]])
    with torch.no_grad():
        target = model.reconstruction_target(x)
        with bf16():
            target_amp = model.reconstruction_target(x)
            out = model(x, visible_ids=visible_ids)
    assert target_amp.dtype == torch.float32 and torch.equal(target_amp, target)
    ref = patch_targets(x.double(), 8)  # float64, eps 1e-6
    torch.testing.assert_close(target.double(), ref, rtol=1e-5, atol=1e-5)
    assert out["pred"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert torch.equal(out["loss"], RevColV2MIM.masked_mse(out["pred"].float(), target, out["mask"]))
