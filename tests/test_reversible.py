"""The reversible engine must give plain autograd's gradients and invert columns exactly."""
import pytest
import torch
from training_helpers import randomize_parameters

from revcolv2.model import RevColV2


def _small(**kw):
    """Randomised parameters (every norm, gamma, bias, the head; alphas of both signs and
    magnitudes 0.3-1.5: the float64 bounds below leave no room for the 1e3-fold amplification
    of a clamped alpha, whose engine path ``test_reference_formulas.py`` checks)."""
    cfg = dict(embed_dim=32, num_heads=2, num_classes=7, num_bu_columns=2, num_td_columns=2,
               blocks_per_level=2, drop_path_rate=0.3, out_levels="all",  # the loss reads every level
               layer_scale_init=0.1)
    cfg.update(kw)
    return randomize_parameters(RevColV2(**cfg), alphas="large")


def _loss(model, x):
    """Uses the logits and every level, so that every parameter is on the path."""
    bu, td, _ = model.forward_columns(x)
    feats, bu = list(td), list(bu)
    logits = model.forward_head(feats[-1])
    return logits.square().sum() + sum((f * f).mean() for f in feats + bu)


def _grads(model, x, reversible, seed=0):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # same drop-path draws in both modes
    loss = _loss(model, x)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, x.grad


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("window_size", [0, 3])
@pytest.mark.slow
def test_reversible_gradients_match_autograd_float64(window_size):
    torch.manual_seed(0)
    model = _small(window_size=window_size, global_attn_indexes=(1, 6)).double().train()
    x = torch.randn(2, 3, 64, 80, dtype=torch.float64)
    loss_r, g_r, gx_r = _grads(model, x, True)
    loss_p, g_p, gx_p = _grads(model, x, False)
    assert torch.allclose(loss_r, loss_p, rtol=1e-12, atol=0)
    assert set(g_r) == set(g_p)
    for name in g_p:
        assert g_p[name] is not None and g_r[name] is not None, name
        assert _max_rel_err(g_r[name], g_p[name]) < 1e-8, name
    assert _max_rel_err(gx_r, gx_p) < 1e-8


@pytest.mark.slow
def test_drop_path_is_really_random_and_replayed():
    """Two seeds give different gradients: the masks matter, so matching above is meaningful."""
    torch.manual_seed(0)
    model = _small().double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, g1, _ = _grads(model, x, True, seed=1)
    _, g2, _ = _grads(model, x, True, seed=2)
    diffs = [_max_rel_err(g1[n], g2[n]) for n in g1 if g2[n].abs().max() > 0]
    assert max(diffs) > 1e-3


def _rebuilt_and_forward_states(model, x, monkeypatch):
    """Every column state the reversible engine rebuilds in backward, and the plain forward's
    state of the same column and level: {(column, level): (rebuilt, forward)}. The loss reads
    the last column only, so each earlier state is rebuilt from the ones after it."""
    from revcolv2 import reversible as rv

    forward = {}
    hooks = [col.register_forward_hook(lambda m, a, out, j=j: forward.update({(j, l): t for l, t in enumerate(out)}))
             for j, col in enumerate(model.columns)]
    model.reversible = False
    with torch.no_grad():
        model.forward_columns(x)
    for h in hooks:
        h.remove()
    rebuilt, in_backward = {}, []
    store = rv.RunBuffer.store

    def spy(self, key, t):
        if in_backward and key != rv.SRC and key[0] >= 0:
            j = next(i for i, col in enumerate(model.columns) if col is self.columns[key[0]])
            rebuilt[(j, key[1])] = t.clone()
        return store(self, key, t)

    monkeypatch.setattr(rv.RunBuffer, "store", spy)
    model.reversible = True
    _, td, _ = model.forward_columns(x)
    in_backward.append(True)
    sum(t.sum() for t in td).backward()
    return {key: (t, forward[key]) for key, t in rebuilt.items()}


@pytest.mark.slow
def test_inverting_columns_recovers_earlier_states(monkeypatch):
    torch.manual_seed(0)
    model = _small(num_bu_columns=3, num_td_columns=2, drop_path_rate=0.0).double().train()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    states = _rebuilt_and_forward_states(model, x, monkeypatch)
    # BU columns 0-1 from column 2, TD column 3 from column 4; column 2 is the TD run's input
    assert sorted(states) == [(j, l) for j in (0, 1, 3) for l in range(4)]
    for key, (rebuilt, forward) in states.items():
        assert (rebuilt - forward).abs().max().item() < 1e-10, key


@pytest.mark.slow
def test_bf16_autocast_reversible_backward_close_to_autograd():
    """bf16 keeps 8 mantissa bits (unit roundoff 2**-9 ~ 2e-3). Both modes run the same bf16
    kernels on fp32 column states of the same (contiguous) layout (docs/ARCHITECTURE.md,
    dtypes); the reversible rebuild feeds them states that differ from the forward's by fp32
    rounding (~1e-7 relative), which flips a bf16 rounding of a kernel's input only rarely.
    We compare gradients by relative Frobenius error and allow 1e-5. Measured on this model:
    9.4e-9 in bf16 (five other model / drop-path seeds: 9.3e-9 to 1.3e-8). Engine v2 measured
    2.4e-3 here: its forward states had the patch embedding's transposed layout and its
    rebuilt ones did not, so the two ran different kernels. An engine that recomputes F in
    fp32 inside the backward while the forward ran it in bf16 measures 5e-3 to 9e-3, and one
    whose rebuilt states are fp32 where the forward's were bf16 measured 6.4e-3: the bound
    catches both by orders of magnitude."""
    torch.manual_seed(0)
    model = _small(drop_path_rate=0.1).train()
    x = torch.randn(2, 3, 32, 48)

    def run(rev):
        model.reversible = rev
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(model, x)
        loss.backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters()])

    g_r, g_p = run(True), run(False)
    assert torch.isfinite(g_r).all()
    rel = ((g_r - g_p).norm() / g_p.norm()).item()
    assert rel < 1e-5, rel


def test_alpha_magnitude_is_clamped_away_from_zero(monkeypatch):
    model = _small(drop_path_rate=0.0).double()
    with torch.no_grad():
        for column in model.columns[1:]:
            column.alphas.zero_()
    assert torch.all(model.columns[1].alpha_values() == 1e-3)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    states = _rebuilt_and_forward_states(model.train(), x, monkeypatch)
    assert states
    for rebuilt, forward in states.values():
        # dividing by 1e-3 amplifies float64 rounding ~1e3x per level, yet stays usable
        assert torch.isfinite(rebuilt).all()
        assert ((rebuilt - forward).abs().max() / forward.abs().max()).item() < 1e-3
