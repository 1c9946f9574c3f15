"""Reversible engine v3: one contiguous layout for every column state, and no copies of them.

A LayerNorm (and most element-wise kernels) copies a non-contiguous input before it works on
it. The patch embedding's flattened conv output is such a tensor, and every state computed
from it used to keep that layout; on a GPU the copies were an eighth of the training step.
These tests pin the layout in the forward, the rebuild and the backward, and count the
copies of level-sized tensors that a training step makes.
"""
import collections

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2 import reversible as rv
from revcolv2.mim import create_mim_model

pytestmark = pytest.mark.usefixtures("single_thread")

_NORMS = ("native_layer_norm", "native_layer_norm_backward")


class CopyCounter(TorchDispatchMode):
    """Counts, among the ops dispatched inside ``with``:

    - ``norm_copies``: LayerNorm calls (forward or backward) whose input or incoming gradient
      is not contiguous; the kernel copies each such tensor first;
    - ``copies``: copies of level-sized tensors (``numel`` a multiple of one level of the
      batch): ``clone``, ``copy_`` and same-dtype ``_to_copy`` (``.contiguous()`` and
      ``.to(memory_format=...)`` dispatch to these). Dtype casts are not copies.
    """

    def __init__(self, level_numel: int):
        super().__init__()
        self.level_numel = level_numel
        self.norm_copies = 0
        self.norm_calls = 0
        self.copies = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name in _NORMS:
            self.norm_calls += 1
            checked = tensors[:2] if name.endswith("backward") else tensors[:1]  # (grad, input) / input
            self.norm_copies += sum(not t.is_contiguous() for t in checked)
        out = func(*args, **kwargs)
        if name in ("clone", "copy_", "_to_copy") and tensors:
            src = tensors[-1] if name == "copy_" else tensors[0]
            result = tree_leaves(out)[0]
            same_dtype = src.dtype == result.dtype
            if same_dtype and src.numel() and src.numel() % self.level_numel == 0:
                self.copies[name] += 1
        return out


def _cls_step(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()


def _mim_step(model, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x)["loss"]
    loss.backward()


def _tiny(mim: bool, out_levels: str = "top"):
    torch.manual_seed(0)
    if mim:
        return create_mim_model("revcolv2_tiny", reversible=True).train()
    return timm.create_model("revcolv2_tiny", num_classes=10, drop_path_rate=0.1, reversible=True,
                             out_levels=out_levels).train()


@pytest.mark.parametrize("mim,max_copies", [(False, 0), (True, 1)])
@pytest.mark.slow
def test_a_reversible_step_copies_no_state_and_no_layer_norm_input(mim, max_copies):
    """One bf16 reversible training step of revcolv2_tiny (224x224, batch 2): every LayerNorm
    reads contiguous inputs and gradients (0 internal copies, 0 of 75 calls before the
    fix had a contiguous input), and the only level-sized copy is MIM's hand-off filling the
    mask-token canvas (``scatter`` clones the broadcast fill once)."""
    model = _tiny(mim)
    x = torch.randn(2, 3, 224, 224)
    (_mim_step if mim else _cls_step)(model, x)  # warm-up: lazily built buffers
    model.zero_grad(set_to_none=True)
    with CopyCounter(level_numel=196 * model.embed_dim) as counter:
        (_mim_step if mim else _cls_step)(model, x)
    assert counter.norm_calls > 40  # forward, rebuild and backward norms were all seen
    assert counter.norm_copies == 0
    assert sum(counter.copies.values()) <= max_copies, dict(counter.copies)


@pytest.mark.parametrize("mim", [False, True])
def test_states_are_contiguous_in_forward_rebuild_and_backward(mim, monkeypatch):
    """Outputs of both runs, every value the run buffer stores (the last states and each
    rebuilt one) and every gradient a level update receives are contiguous."""
    model = _tiny(mim, out_levels="all")
    stored, grads = [], []
    store, backward_node = rv.RunBuffer.store, rv.RunBuffer.backward_node

    def spy_store(self, key, t):
        stored.append((key, t.is_contiguous()))
        return store(self, key, t)

    def spy_backward(self, j, l, g, needs, params):
        if g is not None:
            grads.append(((j, l), g.is_contiguous()))
        return backward_node(self, j, l, g, needs, params)

    monkeypatch.setattr(rv.RunBuffer, "store", spy_store)
    monkeypatch.setattr(rv.RunBuffer, "backward_node", spy_backward)
    x = torch.randn(2, 3, 64, 96)  # a non-square grid
    if mim:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out["loss"].backward()
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bu, td, _ = model.forward_columns(x)
        assert all(t.is_contiguous() for t in bu + td)
        sum(t.float().square().mean() for t in bu + td).backward()
    rebuilt = [c for key, c in stored if key != rv.SRC and key[0] >= 0]
    assert rebuilt and all(rebuilt), stored
    assert grads and all(c for _, c in grads), grads


def test_embedding_tokens_are_contiguous_in_float32_and_under_autocast():
    model = _tiny(False)
    x = torch.randn(1, 3, 48, 64)
    tokens, _, _ = model.embed(x)
    assert tokens.is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, _, _ = model.embed(x)
    assert tokens.is_contiguous() and tokens.dtype == torch.float32


@pytest.mark.parametrize("state_dtype,branch_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                      (torch.float64, torch.float64)])
def test_residual_add_keeps_dtypes_and_scales_each_sample(state_dtype, branch_dtype):
    """``x + branch * scale`` (drop path): the result has the state's dtype, the branch's
    gradient the branch's dtype, and a dropped sample's branch gets no gradient."""
    from revcolv2.layers import residual_add

    x = torch.randn(3, 4, 5, dtype=state_dtype, requires_grad=True)
    branch = torch.randn(3, 4, 5, dtype=branch_dtype, requires_grad=True)
    scale = torch.tensor([0.0, 1.25, 1.0])  # float32, as the drop-path draws are
    out = residual_add(x, branch, scale)
    assert out.dtype == state_dtype
    expected = x.double() + branch.double() * scale.double().view(-1, 1, 1)
    assert torch.allclose(out.double(), expected, rtol=1e-2 if state_dtype == torch.bfloat16 else 1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    assert x.grad.dtype == state_dtype and torch.equal(x.grad, g)
    assert branch.grad.dtype == branch_dtype
    assert torch.all(branch.grad[0] == 0)
    assert torch.allclose(branch.grad[1].double(), 1.25 * g[1].double(), rtol=1e-2)
