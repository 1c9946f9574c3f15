"""Reversible engine v2: exact gradients, skipped levels, buffer hygiene, hook order, errors."""
import pytest
import torch
from training_helpers import randomize_parameters

from revcolv2.mim import RevColV2MIM
from revcolv2.model import Block, RevColV2
from revcolv2_bench.memory import LiveBytes

pytestmark = pytest.mark.usefixtures("single_thread")


CFG = dict(embed_dim=32, num_heads=2, num_classes=7, num_bu_columns=2, blocks_per_level=2, drop_path_rate=0.3,
           layer_scale_init=0.1)


def _model(td, window, mim=False, **kw):
    """Every level built unless ``out_levels='top'`` (the classifier) is asked for. Randomised
    parameters (``training_helpers.randomize_parameters``; alphas of both signs, magnitudes
    0.3-1.5, for the 1e-8 bound): a path reading another module's norm, gamma or alpha
    would give the initial model's values."""
    cfg = dict(CFG, num_td_columns=td, window_size=window, global_attn_indexes=(1, 6) if window else (),
               out_levels="all")
    cfg.update(kw)
    torch.manual_seed(0)
    model = RevColV2MIM(**cfg) if mim else RevColV2(**cfg)
    return randomize_parameters(model, alphas="large").double().train()


def _loss_all_levels(model, x):
    bu, td, _ = model.forward_columns(x)  # every level of both runs
    feats, bu = list(td), list(bu)
    return model.forward_head(feats[-1]).square().sum() + sum((f * f).mean() for f in feats + bu)


def _loss_classification(model, x):
    return model(x).square().sum()


def _loss_classification_unpruned(model, x):
    """Logits of a model that builds every level: the levels below the top run but get no gradient."""
    return model(x).square().sum()


def _loss_mim(model, x):
    visible_ids = torch.tensor([[0, 2, 5, 7, 9, 10], [1, 2, 3, 8, 11, 12]])
    return model(x, visible_ids=visible_ids)["loss"]


LOSSES = {"all": _loss_all_levels, "cls": _loss_classification, "cls_unpruned": _loss_classification_unpruned,
          "mim": _loss_mim}


def _grads(model, loss_fn, x, reversible, seed=0):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path draws in both modes
    loss = loss_fn(model, x)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("td", [1, 2])
@pytest.mark.parametrize("window", [0, 2])
def test_float64_gradients_equal_plain_autograd(loss, td, window):
    model = _model(td, window, mim=loss == "mim", **({"out_levels": "top"} if loss == "cls" else {}))
    x = torch.randn(2, 3, 64, 64 if loss == "mim" else 80, dtype=torch.float64)
    loss_r, g_r = _grads(model, LOSSES[loss], x, True)
    loss_p, g_p = _grads(model, LOSSES[loss], x, False)
    assert torch.allclose(loss_r, loss_p, rtol=1e-12, atol=0)
    none_r = {n for n, g in g_r.items() if g is None}
    none_p = {n for n, g in g_p.items() if g is None}
    assert none_r == none_p
    if loss == "cls":  # the classifier builds only what reaches its head: every parameter learns
        # not built: levels 0-2 of the last TD column; with 2 TD columns also levels 0-1 of the one before
        assert len(model.plan.pruned_levels()) == (3 if td == 1 else 5)
        assert none_p == set()
    if loss == "cls_unpruned":  # built but out of the classifier's reach: no gradient
        dead = tuple(f"columns.{j}.levels.{l}." for j, l in _model(td, window, out_levels="top").plan.pruned_levels())
        assert {n for n in g_p if n.startswith(dead)} == none_p
    for name, g in g_p.items():
        if g is not None:
            assert _rel(g_r[name], g) < 1e-8, name


def test_classifier_builds_only_what_reaches_its_head_with_identical_logits():
    """The classifier (out_levels='top') holds the full model's weights minus the levels that
    cannot reach the top one: same logits (drop path included), fewer blocks, no others."""
    full, pruned = _model(2, 0), _model(2, 0, out_levels="top")
    assert set(dict(pruned.named_parameters())) < set(dict(full.named_parameters()))
    for name, p in pruned.state_dict().items():
        assert torch.equal(p, full.state_dict()[name]), name  # the same initial weights
    counts = []
    for model in (full, pruned):
        calls = []
        for m in model.modules():
            if isinstance(m, Block):
                m.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        counts.append(calls)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    torch.manual_seed(3)
    logits_full = full(x)
    torch.manual_seed(3)
    assert torch.equal(logits_full, pruned(x))
    # 2 BU + 2 TD columns of 4 levels x 2 blocks = 32; the last TD column builds its top level
    # only, which reads levels 2 and 3 of the TD column before it
    assert len(counts[0]) == 32 and len(counts[1]) == 32 - (3 + 2) * 2
    assert sum(isinstance(m, Block) for m in pruned.modules()) == 32 - (3 + 2) * 2


@pytest.mark.parametrize("reversible,retain_last_graph", [(True, True), (True, False), (False, True)])
def test_block_evaluations_per_training_step(reversible, retain_last_graph):
    """Plain: one forward per live block. Reversible: one more per live block in backward, except
    the forward's last update, whose graph is retained for its backward (unless turned off)."""
    model = _model(1, 0, blocks_per_level=2, out_levels="top")
    model.reversible, model.retain_last_graph = reversible, retain_last_graph
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda *a: calls.append(1))
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    live = (2 * 4 + 1) * 2  # 2 BU columns x 4 levels + the top level of the TD column, 2 blocks each
    expected = live if not reversible else 2 * live - (2 if retain_last_graph else 0)
    assert len(calls) == expected


def test_run_buffers_free_everything_in_backward_and_second_backward_is_an_error():
    """Each run's buffer drops every value after its last reader: whatever the backward
    allocates (the rebuilt states, the level graphs, the gradients between levels) is freed
    by its end, although the graph, and with it both runs' buffers, is still alive
    (``retain_graph=True``). The gradients are held, so their accumulation allocates nothing."""
    model = _model(2, 2)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)

    def forward():
        bu, td, _ = model.forward_columns(x, td_levels=(3,))  # two runs: BU, then TD
        assert td[0] is None and td[3] is not None
        return model.forward_head(td[3]).square().sum() + bu[0].sum()

    forward().backward()  # allocates the gradients
    loss = forward()
    with LiveBytes() as live:
        loss.backward(retain_graph=True)
    assert live.peak > 0 and live.live == 0, (live.peak, live.live)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_modifying_an_output_in_place_is_a_clear_error():
    model = _model(1, 0)
    _, td, _ = model.forward_columns(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with torch.no_grad():
        td[3].add_(1.0)  # level 3 is the input of level 2: the backward reads it
    with pytest.raises(RuntimeError, match="modified in place"):
        sum(t.sum() for t in td).backward()


def test_parameter_gradients_arrive_level_by_level():
    """A level's parameters get their .grad (and fire post-accumulate hooks, which DDP uses to
    all-reduce early) as soon as that level's backward is done, while the rebuild and
    backward of the run's earlier levels are still to come."""
    model = _model(1, 0)
    evals = []
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(lambda *a: evals.append(1))
    first = model.columns[0].levels[0].blocks[0].mlp.fc1.weight
    last_bu = model.columns[1].levels[3].blocks[0].mlp.fc1.weight
    seen = {}

    def hook(p):
        seen.update(first_pending=first.grad is None, evals=len(evals))

    last_bu.register_post_accumulate_grad_hook(hook)
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()
    assert seen["first_pending"] and first.grad is not None
    # block evaluations still to come after the hook: the backward of BU levels below
    assert len(evals) - seen["evals"] >= 2 * 4 - 1


def test_bf16_states_are_fp32_and_rebuilt_in_the_forward_dtype(monkeypatch):
    """Under bf16 autocast every column state is float32 (the parameters' dtype) in both
    modes, and each rebuilt state has exactly the dtype the forward produced."""
    from revcolv2 import reversible as rv

    model = _model(1, 0).float()
    x = torch.randn(2, 3, 32, 32)
    checked = []
    orig = rv.RunBuffer.store

    def store(self, key, t):
        if key in self.dtypes:
            assert t.dtype == self.dtypes[key] == torch.float32, key
            checked.append(key)
        return orig(self, key, t)

    monkeypatch.setattr(rv.RunBuffer, "store", store)
    for rev in (True, False):
        model.reversible = rev
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bu, td, _ = model.forward_columns(x)
        assert all(t.dtype == torch.float32 for t in bu + td)
        sum(t.float().mean() for t in td).backward()
    assert len(checked) > 8  # stored last states and every rebuilt one went through the check


def test_linear_probe_runs_no_td_column():
    from revcolv2.classification import LinearProbe

    model = _model(1, 0).float()
    td_blocks = [m for col in model.columns[model.num_bu_columns:] for m in col.modules() if isinstance(m, Block)]
    calls = []
    for m in td_blocks:
        m.register_forward_pre_hook(lambda *a: calls.append(1))
    probe = LinearProbe(model, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    feats = probe.features(x)
    assert calls == []
    model.eval()
    with torch.no_grad():
        bu, _, _ = model.forward_columns(x)
    assert torch.equal(feats, bu[-1].mean(dim=1))
