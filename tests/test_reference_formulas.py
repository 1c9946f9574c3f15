"""Every code path of the model against its formula, written out from the parameters
(``reference_revcolv2.py``), on randomised parameters (``training_helpers.randomize_parameters``).

At their initial values every LayerNorm of the model is the identity affine, the two gammas
of a block are equal, so are all alphas, and every bias is 0: a block whose bf16 path reads
``norm2``'s weight for ``norm1``, a fusion that reads another module's bias, an MLP branch
scaled by ``gamma1``, an update that takes another level's alpha or drops its sign all give
the initial model's outputs exactly. Here each parameter has its own random value, alphas
of both signs with magnitudes at, around and below ``alpha_min``, and each path is compared
with the formula: the plain float64 forward (classifier, every level, MIM), the reversible
engine in training with drop path, a block and a fusion on their own, the fused residual
(eager, and the expression TorchScript and torch.compile see), and the bf16 LayerNorms
under autocast against ``F.layer_norm`` in float32 with the same module's weight and bias.
"""
import pytest
import torch
import torch.nn.functional as F
from reference_revcolv2 import block as ref_block
from reference_revcolv2 import classifier_logits, columns, mim_outputs, newest_levels
from reference_revcolv2 import fusion as ref_fusion
from training_helpers import randomize_parameters

from revcolv2.layers import Fusion, residual_add
from revcolv2.mim import RevColV2MIM
from revcolv2.model import Block, RevColV2

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(embed_dim=32, num_heads=2, patch_size=8)


def _close(got, ref, what, tol=1e-10):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"{what}: relative error {err:.3g} against the formula"


# ----------------------------------------------------------------------------- one block, one fusion
@pytest.mark.parametrize("window,layer_scale", [(0, None), (0, 0.1), (3, 0.1), (1, None)])
def test_a_block_is_its_formula(window, layer_scale):
    """LayerNorms with their own weight and bias, attention with 2 heads (in 3x3 windows of a
    4x5 grid padded to 6x6; in 1x1 windows), the MLP, gamma1 on the attention branch and
    gamma2 on the MLP branch, each branch scaled by its own per-sample drop-path factor."""
    torch.manual_seed(0)
    blk = randomize_parameters(Block(32, 2, layer_scale_init=layer_scale, window_size=window), seed=1).double()
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    scales = torch.tensor([[0.0, 1.25], [1.25, 0.0], [1.25, 1.25]], dtype=torch.float32)
    for s in (None, scales):
        _close(blk(x, s, (4, 5)), ref_block(blk, x, s, (4, 5)), f"block, drop scales {s is not None}")


def test_a_block_holds_the_layers_it_is_configured_with():
    """Defaults: MLP ratio 4, qkv bias, global attention, no layer scale; each argument reaches
    its layer, and layer_scale_init gives both branches their gamma."""
    blk = Block(32, 2)
    assert blk.window_size == 0 and blk.gamma1 is None and blk.gamma2 is None
    assert blk.mlp.fc1.weight.shape == (128, 32) and blk.mlp.fc2.weight.shape == (32, 128)
    assert blk.attn.num_heads == 2 and blk.attn.qkv.bias is not None
    assert blk.norm1.eps == blk.norm2.eps == 1e-6
    blk = Block(32, 4, mlp_ratio=2.0, qkv_bias=False, layer_scale_init=0.1, window_size=7)
    assert blk.window_size == 7 and blk.attn.num_heads == 4 and blk.attn.qkv.bias is None
    assert blk.mlp.fc1.weight.shape == (64, 32)
    for gamma in (blk.gamma1, blk.gamma2):
        assert isinstance(gamma, torch.nn.Parameter) and torch.equal(gamma, torch.full((32,), 0.1))
    assert {"gamma1", "gamma2"} <= {n for n, _ in blk.named_parameters()}


def test_a_fusion_is_its_formula():
    torch.manual_seed(0)
    fus = randomize_parameters(Fusion(32), seed=2).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    _close(fus(x), ref_fusion(fus, x), "fusion")


# ----------------------------------------------------------------------------- the fused residual
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_expression"])
@pytest.mark.parametrize("state_dtype,branch_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                                      (torch.float32, torch.bfloat16)])
def test_residual_add_is_x_plus_branch_times_scale(monkeypatch, compiled, state_dtype, branch_dtype):
    """``residual_add(x, branch, scale)`` = x + branch * scale per sample, with the gradient g
    to x and g * scale to the branch; ``compiled``: the expression TorchScript and
    torch.compile run (``torch.compiler.is_compiling()`` true)."""
    if compiled:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=state_dtype, requires_grad=True)
    branch = torch.randn(3, 4, 5, dtype=branch_dtype, requires_grad=True)
    scale = torch.tensor([0.0, 1.0 / 0.9, 1.0])  # float32, as the drop-path draws
    out = residual_add(x, branch, scale)
    expected = x.double() + branch.double() * scale.double().view(-1, 1, 1)
    assert out.dtype == state_dtype
    tol = 1e-15 if state_dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    g = torch.randn(3, 4, 5, dtype=state_dtype)
    out.backward(g)
    torch.testing.assert_close(x.grad.double(), g.double(), rtol=0, atol=0)
    btol = 1e-2 if branch_dtype == torch.bfloat16 else tol
    torch.testing.assert_close(branch.grad.double(), g.double() * scale.double().view(-1, 1, 1), rtol=btol, atol=btol)
    no_scale = residual_add(x.detach(), branch.detach())
    torch.testing.assert_close(no_scale.double(), x.double() + branch.double(), rtol=tol, atol=tol)


def test_scripted_residual_add_is_the_formula():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x
        scripted = torch.jit.script(residual_add)
    x, branch = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    scale = torch.tensor([0.0, 1.0 / 0.9, 1.0])
    expected = x + branch * scale.double().view(-1, 1, 1)
    torch.testing.assert_close(scripted(x, branch, scale), expected, rtol=1e-15, atol=1e-15)


# ----------------------------------------------------------------------------- the whole model
def _model(cls=RevColV2, seed=0, **kw):
    cfg = dict(SMALL, num_classes=5, blocks_per_level=2, num_td_columns=2, window_size=2,
               global_attn_indexes=(1, 6, 13), layer_scale_init=0.1, drop_path_rate=0.3)
    cfg.update(kw)
    torch.manual_seed(0)
    return randomize_parameters(cls(**cfg), seed=seed).double()


class DrawnScales:
    """Records the drop-path factors a forward draws (``RevColV2.draw_drop_scales``)."""

    def __init__(self, model, monkeypatch):
        self.drawn = []
        draw = model.draw_drop_scales

        def spy(*args, **kwargs):
            s = draw(*args, **kwargs)
            self.drawn.append(s)
            return s

        monkeypatch.setattr(model, "draw_drop_scales", spy)

    @property
    def last(self):
        return self.drawn[-1]


def test_the_randomised_alphas_reach_the_clamp_from_both_sides():
    """The helper's alphas are what the tests below need: both signs, 0, below and around alpha_min."""
    model = _model()
    a = torch.cat([c.alphas.flatten() for c in model.columns[1:]])
    assert (a > 0).any() and (a < 0).any() and (a == 0).any()
    assert ((a.abs() > 0) & (a.abs() < 1e-3)).any() and ((a.abs() >= 1e-3) & (a.abs() < 2e-3)).any()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len({round(float(n.weight[0].detach()), 6) for n in norms}) == len(norms)


@pytest.mark.parametrize("out_levels", ["top", "all"])
def test_classifier_logits_are_the_formula(out_levels):
    """Eval mode (plain path): logits of the classifier and of a model that builds every level."""
    model = _model(out_levels=out_levels).eval()
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        _close(model(x), classifier_logits(model, x), "logits")


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
def test_training_forward_is_the_formula_with_the_drawn_drop_path(monkeypatch, reversible):
    """Training mode with drop path: every level of the last BU and the last TD column, and
    their gradients, equal the formula's (with the factors this forward drew). The engine
    rebuilds each state by dividing by alpha: a clamped alpha of 1e-3 amplifies float64
    rounding about 1e3 times per column (measured: 8e-8 here), a wiring error gives O(1)."""
    model = _model(out_levels="all", reversible=reversible).train()
    drawn = DrawnScales(model, monkeypatch)
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    torch.manual_seed(3)
    bu, td, _ = model.forward_columns(x)
    assert drawn.last is not None and (drawn.last == 0).any()
    ref = columns(model, x, drawn.last)
    for name, got, want in [("BU", bu, ref[model.num_bu_columns - 1]), ("TD", td, ref[-1])]:
        for l in range(4):
            _close(got[l], want[l], f"last {name} column, level {l}")
    loss = sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).sum() for t in td)
    ref_loss = sum((t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).sum() for t in ref[-1])
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if r is not None and r.abs().max() > 0:
            _close(g, r, f"gradient of {name}", tol=1e-6 if reversible else 1e-8)


def test_forward_intermediates_are_the_formulas_newest_levels():
    model = _model(out_levels="all", drop_path_rate=0.0).eval()
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    for l, (m, t) in enumerate(zip(maps, newest_levels(columns(model, x)))):
        _close(m.flatten(2).transpose(1, 2), t, f"level {l}")


@pytest.mark.parametrize("reversible", [False, True], ids=["plain", "reversible"])
def test_mim_prediction_and_loss_are_the_formula(monkeypatch, reversible):
    """The masked forward: BU columns on the visible tokens, the hand-off with the mask token
    and position at the holes, the TD columns, the decoder on TD level 0, the loss."""
    model = _model(RevColV2MIM, num_classes=0, out_levels="all", reversible=reversible, num_td_columns=1,
                   global_attn_indexes=(1,)).train()
    drawn = DrawnScales(model, monkeypatch)
    x = torch.randn(2, 3, 32, 40, dtype=torch.float64)
    visible_ids = torch.tensor([[0, 3, 4, 9, 15], [1, 2, 7, 12, 19]])
    torch.manual_seed(4)
    with torch.set_grad_enabled(reversible):
        out = model(x, visible_ids=visible_ids)
    pred, loss = mim_outputs(model, x, visible_ids, drawn.last)
    _close(out["pred"], pred, "prediction")
    _close(out["loss"], loss, "loss", tol=1e-6)  # the loss is taken in float32 (masked_mse)


# ----------------------------------------------------------------------------- the bf16 LayerNorms
def test_bf16_layer_norms_use_their_own_modules_weight_and_bias():
    """Under bf16 autocast the blocks' and fusions' LayerNorms run on bf16 copies of the
    float32 state (``bf16_layer_norm``). What each one feeds (attention, MLP, fusion
    projection) must be ``F.layer_norm`` in float32 with the same module's weight and bias,
    to bf16 precision: a norm reading another module's affine is off by O(1)."""
    model = _model(out_levels="all", drop_path_rate=0.0, window_size=0, global_attn_indexes=()).float().eval()
    seen, hooks = [], []
    for mod in model.modules():
        if isinstance(mod, Block):
            rec = {}
            seen.append((mod, rec))
            hooks += [mod.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0])),
                      mod.attn.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("y1", a[0])),
                      mod.attn.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("a", o)),
                      mod.mlp.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("y2", a[0]))]
        elif isinstance(mod, Fusion) and mod.variant == "linear":
            rec = {}
            seen.append((mod, rec))
            hooks += [mod.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("cross", a[0])),
                      mod.proj.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("z", a[0]))]
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_columns(x)
    for h in hooks:
        h.remove()

    def check(got, state, norm, what):
        assert got.dtype == torch.bfloat16, f"{what}: not the bf16 path ({got.dtype})"
        ref = F.layer_norm(state.float(), (state.shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps)
        err = ((got.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, f"{what}: relative error {err:.3g} against F.layer_norm with its own weight and bias"

    blocks = fusions = 0
    for mod, rec in seen:
        if isinstance(mod, Block):
            blocks += 1
            check(rec["y1"], rec["x"], mod.norm1, "norm1")
            mid = rec["x"] + rec["a"].float() * mod.gamma1.float()  # the state after the attention branch
            check(rec["y2"], mid, mod.norm2, "norm2")
        else:
            fusions += 1
            check(rec["z"], rec["cross"], mod.norm, "fusion norm")
    assert blocks == 2 * 4 * 4 and fusions == 3 * 3
