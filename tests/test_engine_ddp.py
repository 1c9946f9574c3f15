"""DDP (2 processes, gloo, CPU) with find_unused_parameters=False, reversible and plain.

The classifier is built as ``timm.create_model`` builds it, with no further call: it does
not build the levels that cannot reach its head, so every parameter gets a gradient in
every step (else DDP's second step raises "Expected to have finished reduction"). The
averaged gradients must equal the mean of the two ranks' single-process gradients.
"""
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import revcolv2  # noqa: F401  (registers the presets)

# two TD columns: the classifier builds neither levels 0-2 of the last one nor 0-1 of the one before
CFG = dict(embed_dim=32, num_heads=2, num_classes=5, num_bu_columns=2, num_td_columns=2, drop_path_rate=0.2)
STEPS = 2


def _model(reversible):
    torch.manual_seed(0)
    return timm.create_model("revcolv2_tiny", reversible=reversible, **CFG).double().train()


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)


def _step(model, step, rank):
    torch.manual_seed(77 + 1000 * step + rank)  # this rank's drop-path draws
    model(_batch(step, rank)).square().sum().backward()


def _worker(rank, world, port, out):
    """Both modes in one pair of processes (starting processes is the slow part)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for reversible in (True, False):
            model = _model(reversible)
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
            for step in range(STEPS):
                ddp.zero_grad(set_to_none=True)
                torch.manual_seed(77 + 1000 * step + rank)
                ddp(_batch(step, rank)).square().sum().backward()
            result[reversible] = {n: p.grad for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "grads.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    return torch.load(out)


@pytest.mark.slow  # two processes (gloo)
@pytest.mark.parametrize("reversible", [True, False])
def test_ddp_gradients_equal_single_process_mean(reversible, ddp_grads):
    ddp_grads = ddp_grads[reversible]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model(reversible)
        ref = {}
        for rank in range(2):
            model.zero_grad(set_to_none=True)
            _step(model, STEPS - 1, rank)
            for name, p in model.named_parameters():
                if p.grad is not None:
                    ref[name] = ref.get(name, 0) + p.grad / 2
    finally:
        torch.set_num_threads(n)
    assert len(model.plan.pruned_levels()) == 5 and all(p.requires_grad for p in model.parameters())
    assert set(ddp_grads) == set(ref) and all(g is not None for g in ddp_grads.values())
    for name, g in ref.items():
        assert torch.allclose(ddp_grads[name], g, rtol=1e-10, atol=1e-12), name
