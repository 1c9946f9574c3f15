"""Activation memory, measured as bytes handed to autograd's saved-tensor hooks."""
import pytest
import timm
import torch

import revcolv2  # noqa: F401
from revcolv2.model import RevColV2


def saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return total


def _model(nb, nt, reversible):
    torch.manual_seed(0)
    return RevColV2(embed_dim=64, num_heads=2, num_classes=10, num_bu_columns=nb, num_td_columns=nt,
                    drop_path_rate=0.1, reversible=reversible).train()


def test_reversible_memory_does_not_grow_with_columns():
    x = torch.randn(2, 3, 64, 64)
    small, big = saved_bytes(_model(2, 1, True), x), saved_bytes(_model(4, 2, True), x)
    assert big < 1.10 * small, (small, big)
    # plain autograd, by contrast, roughly doubles
    assert saved_bytes(_model(4, 2, False), x) > 1.8 * saved_bytes(_model(2, 1, False), x)


@pytest.mark.slow  # builds RevColV2-B and runs it forward twice
def test_base_reversible_saves_5x_less_than_plain():
    x = torch.randn(2, 3, 224, 224)
    model = timm.create_model("revcolv2_base", drop_path_rate=0.1).train()
    model.reversible = False
    plain = saved_bytes(model, x)
    model.zero_grad(set_to_none=True)
    model.reversible = True
    rev = saved_bytes(model, x)
    assert plain >= 5 * rev, (plain, rev)
