"""timm's model contract on every registered RevColV2 preset, asserting what timm's own
model tests (``huggingface/pytorch-image-models:tests/test_models.py``) assert: a forward at
a small size, every parameter receiving a gradient (classifier, ``global_pool=''`` and
``features_only``), torch.fx tracing (forward and backward), torch.jit.script,
``features_only`` in the 'getter', 'hook' and 'fx' modes, ``forward_intermediates``, every
``global_pool`` value, ``reset_classifier``, ``set_grad_checkpointing``, ``group_matcher``
and ``pretrained_cfg``.

``revcolv2_tiny`` runs for real at 32x32 (2x2 tokens); base and large are built on the meta
device (shapes, graphs and gradients without memory or compute). The reversible engine
replays autocast, which the meta device does not have: their gradients are checked in plain
mode, the engine's own gradients in ``test_engine_grads.py``."""
import contextlib
import warnings

import pytest
import timm
import torch
from timm.models import group_parameters
from training_helpers import randomize_parameters

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.model import MODEL_CFGS

PRESETS = timm.list_models("revcolv2_*")
SIZE = 32  # 2x2 tokens
TINY = "revcolv2_tiny"
# the unit run checks the contract on revcolv2_tiny (real weights); the larger presets (on the
# meta device) take seconds per case and run with the slow tests
PRESET_PARAMS = [pytest.param(n, marks=() if n == TINY else pytest.mark.slow) for n in PRESETS]


def _device(name: str):
    return contextlib.nullcontext() if name == TINY else torch.device("meta")


def _create(name: str, **kwargs):
    """The real (tiny) model with randomised parameters (``randomize_parameters``: the values
    depend on the parameter's name, so a features_only model and the full one share them):
    the traced, scripted, feature and reversible paths are compared with the eager one on
    norms, biases, alphas and a head that are not their initial constants."""
    with _device(name):
        model = timm.create_model(name, **kwargs)
    return randomize_parameters(model) if _real(name) else model


def _input(model, batch: int = 2):
    return torch.randn(batch, 3, SIZE, SIZE, device=next(model.parameters()).device)


def _real(name: str) -> bool:
    return name == TINY


def _outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def test_every_preset_is_registered_and_covered():
    assert set(PRESETS) == set(MODEL_CFGS)


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_forward_at_a_small_size(name):
    model = _create(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(_input(model))
    assert out.shape == (2, 7)
    if _real(name):
        assert torch.isfinite(out).all()


# ----------------------------------------------------------------- every parameter learns
BUILDS = {
    "classifier": dict(num_classes=7),
    "no_pooling": dict(num_classes=7, global_pool=""),
    "headless": dict(num_classes=0),
    "features_getter": dict(features_only=True),
    "features_hook": dict(features_only=True, feature_cls="hook"),
    "features_fx": dict(features_only=True, feature_cls="fx"),
    "features_1_3": dict(features_only=True, out_indices=(1, 3)),
}


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_every_parameter_gets_a_gradient(name, build):
    """timm's test_model_backward: one training step, then every parameter has a .grad
    (and DDP with find_unused_parameters=False works, tests/test_engine_ddp.py)."""
    model = _create(name, reversible=_real(name), **BUILDS[build]).train()
    outs = _outputs(model(_input(model)))
    sum(o.float().mean() for o in outs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    if build == "classifier":
        assert outs[0].shape == (2, 7)


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_the_classifier_builds_what_reaches_its_head(name):
    """Levels that cannot reach the top level are not built: levels 0-2 of the last TD column
    (and levels 0-1 of the one before in large, 2 TD columns). Features builds all."""
    clf, feats = _create(name), _create(name, out_levels="all")
    dead = {(len(clf.columns) - 1, l) for l in (0, 1, 2)}
    if clf.num_td_columns == 2:
        dead |= {(len(clf.columns) - 2, l) for l in (0, 1)}
    assert set(clf.plan.pruned_levels()) == dead and feats.plan.pruned_levels() == []
    names = {n for n, _ in clf.named_parameters()}
    assert names < {n for n, _ in feats.named_parameters()}
    assert not any(n.startswith(clf.plan.pruned_prefixes()) for n in names)
    # the layer-decay ids of the parameters that remain are those of the full model
    assert {n: clf.layer_id(n) for n in names} == {n: feats.layer_id(n) for n in names}
    assert clf.num_layers() == feats.num_layers()


# ----------------------------------------------------------------- torch.fx and TorchScript
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_fx_trace_forward_and_backward(name):
    """timm's test_model_forward_fx / test_model_backward_fx: symbolic tracing in eval and
    train mode; the traced module gives the eager outputs and trains every parameter."""
    model = _create(name, num_classes=7).eval()
    x = _input(model)
    graph = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        ref, got = model(x), graph(x)
    assert got.shape == (2, 7)
    if _real(name):
        assert torch.equal(ref, got)
        with pytest.raises(ValueError, match="patch size"):  # the input checks still run in the graph
            graph(torch.randn(1, 3, SIZE + 3, SIZE))
    model.train()
    graph = torch.fx.symbolic_trace(model)  # training: plain autograd (fx cannot trace the engine)
    graph(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_torchscript(name):
    """timm's test_model_forward_torchscript (and the fx + script variant) in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x
        with timm.set_scriptable(True):
            model = _create(name, num_classes=7).eval()
        scripted = torch.jit.script(model)
        x = _input(model)
        with torch.no_grad():
            out = scripted(x)
            assert out.shape == (2, 7)
            if _real(name):
                assert torch.equal(out, model(x))
                assert torch.jit.script(torch.fx.symbolic_trace(model))(x).shape == (2, 7)
        if _real(name):
            with pytest.raises(torch.jit.Error, match="input channels"):
                scripted(torch.randn(1, 1, SIZE, SIZE))


# ----------------------------------------------------------------- features_only
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_features_only_in_every_mode(name):
    """'getter' (default), 'hook' and 'fx' give the same four level maps of the last column;
    'list' / 'dict' are refused at creation."""
    dim = MODEL_CFGS[name]["embed_dim"]
    outs = {}
    for cls in ("getter", "hook", "fx"):
        torch.manual_seed(0)
        model = _create(name, features_only=True, feature_cls=cls).eval()
        assert model.feature_info.channels() == [dim] * 4 and model.feature_info.reduction() == [16] * 4
        with torch.no_grad():
            outs[cls] = model(_input(model).fill_(0.5))
        assert [tuple(f.shape) for f in outs[cls]] == [(2, dim, SIZE // 16, SIZE // 16)] * 4
    if _real(name):
        for cls in ("hook", "fx"):
            assert all(torch.equal(a, b) for a, b in zip(outs["getter"], outs[cls])), cls
        # the maps are the last column's levels, as forward_intermediates of a full model gives them
        torch.manual_seed(0)
        full = _create(name, num_classes=0, out_levels="all").eval()
        with torch.no_grad():
            ref = full.forward_intermediates(_input(full).fill_(0.5), intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(outs["getter"], ref))
    for cls in ("list", "dict"):
        with pytest.raises(ValueError, match="feature_cls"):
            _create(name, features_only=True, feature_cls=cls)


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_features_only_out_indices_builds_only_what_they_need(name):
    torch.manual_seed(0)
    picked = _create(name, features_only=True, out_indices=(1, 3)).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    assert picked.feature_info.channels() == [dim] * 2
    # level 0 of the last column feeds neither: not built
    last = len(picked.model.columns) - 1
    assert (last, 0) in picked.model.plan.pruned_levels() and (last, 1) not in picked.model.plan.pruned_levels()
    if _real(name):
        torch.manual_seed(0)
        full = _create(name, num_classes=0, out_levels="all").eval()
        with torch.no_grad():
            ref = full.forward_intermediates(_input(full).fill_(0.5), intermediates_only=True)
            got = picked(_input(picked).fill_(0.5))
        # the same seed builds the same weights: features_only keeps the full model's values
        assert torch.equal(got[0], ref[1]) and torch.equal(got[1], ref[3])


# ----------------------------------------------------------------- forward_intermediates
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_forward_intermediates(name):
    """timm's test_model_forward_intermediates on the default model (a classifier): the
    newest value of every level; ``feature_info`` names its column."""
    model = _create(name).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    x = _input(model)
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert info.channels() == [dim] * 4 and info.reduction() == [16] * 4
    # the classifier's top level comes from the last column, the others from the last column building them
    assert model.feature_info[3]["column"] == len(model.columns) - 1
    with torch.no_grad():
        final, levels = model.forward_intermediates(x)
        assert len(levels) == 4 and all(t.shape == (2, dim, 2, 2) for t in levels)
        assert final.shape == (2, 4, dim)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True, output_fmt="NLC")
        assert [t.shape for t in last_two] == [(2, 4, dim)] * 2
        early = model.forward_intermediates(x, indices=[3], stop_early=True)
        if _real(name):
            assert torch.equal(final, model.forward_features(x))
            assert torch.equal(last_two[1], levels[3].flatten(2).transpose(1, 2))
            assert torch.equal(final, levels[3].flatten(2).transpose(1, 2))  # the top level
            assert torch.equal(early[0], final) and torch.equal(early[1][0], levels[3])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="norm=True"):
        model.forward_intermediates(x, norm=True)


def test_stop_early_runs_fewer_levels_with_the_same_values():
    from revcolv2.model import Block

    model = _create(TINY, num_classes=0, out_levels="all").eval()
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda *a: calls.append(1))
    x = _input(model)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
        n_full, calls[:] = len(calls), []
        early = model.forward_intermediates(x, indices=[2, 3], intermediates_only=True, stop_early=True)
    assert all(torch.equal(a, b) for a, b in zip(full, early))
    assert n_full == 12 and len(calls) == 12 - 2  # the last TD column stops after level 2


# ----------------------------------------------------------------- pooling and classifier
@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_every_global_pool(name):
    model = _create(name, num_classes=0).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    tokens = torch.randn(2, 4, dim, device=next(model.parameters()).device)  # forward_features' output
    model.fc_norm = torch.nn.Identity()  # compare the pooling itself
    expected = {"avg": tokens.mean(1), "max": tokens.amax(1), "avgmax": 0.5 * (tokens.mean(1) + tokens.amax(1)),
                "": tokens}
    for pool, want in expected.items():
        model.reset_classifier(0, global_pool=pool)
        got = model.forward_head(tokens)
        assert got.shape == want.shape
        if _real(name):
            assert torch.allclose(got, want)
        built = _create(name, num_classes=3, global_pool=pool).eval()
        with torch.no_grad():
            out = built(_input(built))
        assert out.shape == ((2, 4, 3) if pool == "" else (2, 3))
    for pool in ("token", "map"):
        with pytest.raises(ValueError, match="no class token"):
            _create(name, global_pool=pool)
        with pytest.raises(ValueError, match="no class token"):
            model.reset_classifier(0, global_pool=pool)


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_reset_classifier(name):
    model = _create(name, num_classes=5).eval()
    dim = MODEL_CFGS[name]["embed_dim"]
    tokens = torch.zeros(2, 4, dim, device=next(model.parameters()).device)
    with _device(name):  # the new head is made on the default device, as in timm
        model.reset_classifier(11)
    assert model.get_classifier().out_features == 11 and model.forward_head(tokens).shape == (2, 11)
    model.reset_classifier(0)
    assert model.forward_head(tokens).shape == (2, dim)  # pre-logits


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_set_grad_checkpointing(name):
    model = _create(name, num_classes=3)
    model.set_grad_checkpointing(False)
    assert not model.reversible
    model.set_grad_checkpointing()
    assert model.reversible
    if _real(name):  # the engine gives plain autograd's outputs (timm's check) and trains every parameter
        model.eval()
        x = _input(model)
        with torch.no_grad():
            ref = model(x)
        model.train()
        out = model(x)
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_group_matcher(name):
    model = _create(name, num_classes=3)
    names = [n for n, _ in model.named_parameters()]
    groups = group_parameters(model, model.group_matcher())
    assert sorted(n for g in groups.values() for n in g) == sorted(names)
    # the classifier builds no parameter with the last TD column's last ids: fewer groups than ids
    assert len(groups) <= model.num_layers()
    assert "patch_embed.proj.weight" in groups[min(groups)] and "head.weight" in groups[max(groups)]
    # coarse: the stem, one group per column, the classifier
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == len(model.columns) + 2
    assert sorted(n for g in coarse.values() for n in g) == sorted(names)
    assert coarse[0] == ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    assert all(n.startswith(f"columns.{j}.") for j in range(len(model.columns)) for n in coarse[j + 1])


@pytest.mark.parametrize("name", PRESET_PARAMS)
def test_pretrained_cfg(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["input_size"] == (3, 224, 224) and len(cfg["mean"]) == len(cfg["std"]) == 3
    modules = dict(model.named_modules())
    assert cfg["first_conv"] in modules and cfg["classifier"] in modules
    assert cfg["num_classes"] == model.num_classes == 1000
