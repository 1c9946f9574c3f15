"""The reversible engine's paths that a loss reading every level never takes: a level whose
output gets no gradient, a state rebuilt for a reader whose own node never runs, frozen
parameters, alphas or patch embedding (what each node must differentiate), fp16 autocast
replayed in the rebuild, the buffer emptied by the end of the backward, and the errors'
whole messages. Written for the survivors of the mutation tool (docs/TESTING.md, "Mutation
tool"); each compares against plain autograd on randomised parameters."""
import re

import pytest
import torch
from training_helpers import randomize_parameters

from revcolv2.model import RevColV2

pytestmark = pytest.mark.usefixtures("single_thread")


def _model(**kw):
    cfg = dict(embed_dim=32, num_heads=2, num_classes=7, num_bu_columns=2, num_td_columns=2, blocks_per_level=1,
               drop_path_rate=0.3, layer_scale_init=0.1, out_levels="all")
    cfg.update(kw)
    torch.manual_seed(0)
    return randomize_parameters(RevColV2(**cfg), alphas="large").double().train()


class _NoGradient(torch.autograd.Function):
    """The identity, whose backward gives its input no gradient (None): the level it reads
    is on the graph but receives nothing, as under ``set_materialize_grads(False)``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return None


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _compare(model, loss_fn, x, seed=0, atol=1e-8):
    """Loss and gradients (parameters, and the input when it requires one) of both modes
    agree; returns the parameters' gradients (reversible, plain)."""
    out = {}
    for rev in (True, False):
        model.reversible = rev
        model.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(x.requires_grad)
        torch.manual_seed(seed)
        loss = loss_fn(model, xi)
        loss.backward()
        out[rev] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}, xi.grad
    (lr, gr, xr), (lp, gp, xp) = out[True], out[False]
    assert _rel(lr, lp) < atol
    # plain mode's contiguous column states give a level that reaches no loss zeros, the
    # reversible engine None: the same gradient
    for n, p in model.named_parameters():
        if gp[n] is not None or gr[n] is not None:
            r, q = (torch.zeros_like(p) if g is None else g for g in (gr[n], gp[n]))
            assert _rel(r, q) < atol, n
    assert (xr is None) == (xp is None)
    if xp is not None:
        assert _rel(xr, xp) < atol
    return gr, gp


@pytest.mark.parametrize("retain", [True, False], ids=["retained", "not_retained"])
@pytest.mark.parametrize("run", ["bu", "td", "td_first_column"])
def test_a_level_that_receives_no_gradient_still_rebuilds_what_its_neighbours_read(run, retain):
    """The top BU level (its previous value is the cross input of the level below; no TD
    run) and TD level 0 (its previous value is the cross input of level 1) read through a
    consumer that gives them no gradient: their nodes do no gradient work (their parameters
    get None, as under plain autograd without the contiguous column states) but rebuild the
    previous column's value that another node reads; every gradient is plain autograd's.
    With one TD column, TD level 0's previous value is the BU state, which the node does not
    rebuild (level 1 still reads it as its cross input). The level is the forward's last
    update: its graph retained, or evaluated again in the backward."""
    def loss_fn(model, x):
        if run == "bu":
            bu, _, _ = model.forward_columns(x, td_levels=())
            return _NoGradient.apply(bu[3]).sum() + (bu[2] * bu[1]).sum()
        bu, td, _ = model.forward_columns(x)
        return _NoGradient.apply(td[0]).sum() + (td[1] * td[2]).sum() + td[3].mean()

    # 2x2 windows of a 4x3 grid: the rebuild needs the token grid too
    model = _model(num_td_columns=1 if run == "td_first_column" else 2, window_size=2, global_attn_indexes=(1,))
    model.retain_last_graph = retain
    _compare(model, loss_fn, torch.randn(2, 3, 64, 48, dtype=torch.float64))
    level = {"bu": "columns.1.levels.3.", "td": "columns.3.levels.0.", "td_first_column": "columns.2.levels.0."}[run]
    model.reversible = True
    model.zero_grad(set_to_none=True)
    loss_fn(model, torch.randn(2, 3, 64, 48, dtype=torch.float64)).backward()
    silent = {n for n, p in model.named_parameters() if n.startswith(level)}
    assert silent and all(p.grad is None for n, p in model.named_parameters() if n in silent)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("columns.1.levels.2."))


@pytest.mark.parametrize("retain", [True, False], ids=["retained", "not_retained"])
def test_a_state_whose_rebuilding_node_never_runs_is_rebuilt_for_its_reader(retain):
    """Only BU level 0 is in the loss (no TD run): the nodes of column 1's levels 1-3 are
    not on its graph, so the states of column 0 they would rebuild are rebuilt where they
    are read: level 1 (column 1 level 0's cross input) from level 2, from level 3 (a level
    without a cross input; from its retained graph, or evaluated again); the gradients are
    plain autograd's, and those levels get none."""
    def loss_fn(model, x):
        bu, _, _ = model.forward_columns(x, td_levels=())
        return bu[0].square().sum()

    model = _model()
    model.retain_last_graph = retain
    rev, _ = _compare(model, loss_fn, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    silent = [n for n in rev if n.startswith(("columns.1.levels.1.", "columns.1.levels.2.", "columns.1.levels.3."))]
    assert silent and all(rev[n] is None for n in silent)
    assert rev["columns.0.levels.1.blocks.0.mlp.fc1.weight"] is not None


@pytest.mark.parametrize("frozen", ["alphas", "first_parameter_of_each_level", "patch_embed_and_column_0",
                                    "patch_embed_and_level_0_of_column_0", "all_but_alphas"])
def test_frozen_parameters_give_plain_autograds_gradients(frozen):
    """What a node differentiates follows what requires a gradient: frozen alphas (the
    previous state still needs one), a level whose first parameter is frozen (its alpha
    still needs one), a source without gradient (no input gradient, the others shift
    nothing), a previous state without gradient whose cross input needs one, only the
    alphas trainable (no parameter to differentiate at all)."""
    model = _model()
    names = {n for n, _ in model.named_parameters()}
    if frozen == "alphas":
        off = {n for n in names if n.endswith("alphas")}
    elif frozen == "first_parameter_of_each_level":
        off = set()
        for j, col in enumerate(model.columns):
            for l, lvl in enumerate(col.levels):
                first = next(n for n, _ in lvl.named_parameters())
                off.add(f"columns.{j}.levels.{l}.{first}")
    elif frozen == "patch_embed_and_column_0":
        off = {n for n in names if n.startswith(("patch_embed.", "columns.0."))}
    elif frozen == "patch_embed_and_level_0_of_column_0":  # column 1's level 0: prev without, cross with gradient
        off = {n for n in names if n.startswith(("patch_embed.", "columns.0.levels.0."))}
    else:
        off = {n for n in names if not n.endswith("alphas")}
    assert off and off < names
    for n, p in model.named_parameters():
        p.requires_grad_(n not in off)

    def loss_fn(model, x):
        bu, td, _ = model.forward_columns(x)
        return model.forward_head(td[3]).square().sum() + sum((t * t).mean() for t in bu + td)

    _, grads = _compare(model, loss_fn, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert {n for n, g in grads.items() if g is not None} == names - off - {"head.weight", "head.bias"} | {
        n for n in ("head.weight", "head.bias") if n not in off}


def test_input_gradient_with_a_frozen_model_but_trainable_alphas():
    model = _model()
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("alphas"))

    def loss_fn(model, x):
        bu, td, _ = model.forward_columns(x)
        return sum((t * t).mean() for t in bu + td)

    _compare(model, loss_fn, torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True))


def test_the_backward_replays_fp16_autocast():
    """Under float16 autocast (not the CPU's default bf16) the rebuild runs in float16 too:
    the reversible gradients stay within float16's error of plain autograd's (a rebuild in
    bf16 or float32 is off by bf16's error)."""
    model = _model().float()
    x = torch.randn(2, 3, 32, 32)

    def grads(rev):
        model.reversible = rev
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.float16):
            bu, td, _ = model.forward_columns(x)
            loss = sum((t.float() * t.float()).mean() for t in bu + td)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    rev, plain = grads(True), grads(False)
    assert set(rev) == set(plain) and len(plain) > 100
    errors = {n: _rel(rev[n], plain[n]) for n in plain}
    assert max(errors.values()) < 4e-3, max(errors.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("columns", [(2, 2), (1, 1)])
def test_every_buffer_is_empty_after_the_backward(columns):
    """Each run's buffer (``RunBuffer``, the ``run`` of every engine node) holds, after the
    backward, no value, use count, version or retained graph: every value was dropped by
    its last reader (the graph itself is kept alive here), and none was kept that no node
    reads (one BU column: its top level is read by no node of the run)."""
    model = _model(num_bu_columns=columns[0], num_td_columns=columns[1])
    bu, td, _ = model.forward_columns(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    runs = {id(t.grad_fn.run): t.grad_fn.run for t in bu + td}
    assert len(runs) == 2
    for run in runs.values():
        assert run.values and run.uses
    (sum((t * t).mean() for t in bu + td)).backward(retain_graph=True)
    for run in runs.values():
        assert (run.values, run.uses, run.versions, run.graphs) == ({}, {}, {}, {})


def test_errors_name_the_state_and_say_what_to_do():
    model = _model(num_td_columns=1)
    _, td, _ = model.forward_columns(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with torch.no_grad():
        td[3].add_(1.0)
    message = ("RevColV2 reversible engine: the value (0, 3) of a column state was modified in place after the "
               "forward pass; the reversible backward needs it unchanged (clone it before modifying it, or use "
               "reversible=False)")
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + "$"):
        sum(t.sum() for t in td).backward()

    loss = sum(t.sum() for t in model.forward_columns(torch.randn(1, 3, 32, 32, dtype=torch.float64))[1])
    loss.backward(retain_graph=True)
    message = ("RevColV2 reversible engine: a second backward through the same graph is not supported (the "
               "rebuilt states are freed during the first one); run the forward again, or use reversible=False")
    with pytest.raises(RuntimeError, match="^" + re.escape(message) + "$"):
        loss.backward()


def _direct_run(counts, **kw):
    from revcolv2.reversible import run_reversible

    model = _model()
    source = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    return model, run_reversible(model.columns[:2], source, None, None, (2, 2), counts, **kw)


def test_run_reversible_retains_the_last_updates_graph_by_default():
    _, out = _direct_run([4, 4])
    run = out[3].grad_fn.run
    assert run.retained == (1, 3) and set(run.graphs) == {(1, 3)}
    _, out = _direct_run([4, 4], retain_last_graph=False)
    assert out[3].grad_fn.run.retained is None and out[3].grad_fn.run.graphs == {}


def test_run_reversible_refuses_a_plan_it_cannot_run():
    from revcolv2.reversible import run_reversible

    with pytest.raises(RuntimeError, match=r"^column 1 level 0: its input from the previous column was not "
                                           r"computed$"):
        _direct_run([1, 4])  # BU level 0 of column 1 reads level 1 of column 0, not run
    model = _model()
    source = torch.randn(2, 4, 32, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"^run_reversible: the first column's has_prev does not match "
                                           r"prev_state$"):
        run_reversible(model.columns[1:2], source, None, None, (2, 2), [4])
