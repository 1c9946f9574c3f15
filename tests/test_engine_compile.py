"""torch.compile per level (``compile_levels``): no graph breaks, eager gradients, both modes."""
import pytest
import torch

from revcolv2.model import LEVEL_RECOMPILE_LIMIT, RevColV2, allow_level_recompiles

pytestmark = pytest.mark.usefixtures("single_thread")


def _model():
    torch.manual_seed(0)
    return RevColV2(embed_dim=32, num_heads=2, num_classes=5, num_bu_columns=1, num_td_columns=1, num_levels=2,
                    drop_path_rate=0.2, out_levels="all").train()  # the loss reads every level


def _grads(model, x, reversible):
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    bu, td, _ = model.forward_columns(x)  # every level of both runs
    feats, bu = list(td), list(bu)
    (model.forward_head(feats[-1]).square().sum() + sum(f.square().mean() for f in feats + bu)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow  # compiles every level variant (about 5 s)
def test_compiled_levels_give_eager_gradients_without_graph_breaks():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    allow_level_recompiles()
    eager, compiled = _model(), _model().compile_levels()  # fullgraph=True: a graph break raises
    x = torch.randn(2, 3, 32, 32)
    for reversible in (True, False):
        g_e, g_c = _grads(eager, x, reversible), _grads(compiled, x, reversible)
        for name, g in g_e.items():
            err = ((g_c[name] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
            assert err < 1e-4, (reversible, name, err)
    assert counters["stats"]["unique_graphs"] > 0  # the levels really were compiled
    assert not counters["graph_break"]


def test_compile_levels_refuses_a_recompile_limit_it_would_exceed():
    """The limit is process-wide: compile_levels() never changes it, and says how to."""
    import torch._dynamo

    # torch's own patch, not monkeypatch: monkeypatch's undo deletes the attribute, which
    # hides a torch config entry for the rest of the process ("... does not exist")
    before = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=8):
        with pytest.raises(RuntimeError, match="allow_level_recompiles"):
            _model().compile_levels()
        assert torch._dynamo.config.recompile_limit == 8
        allow_level_recompiles()
        assert torch._dynamo.config.recompile_limit == LEVEL_RECOMPILE_LIMIT
    torch._dynamo.config.recompile_limit = before
