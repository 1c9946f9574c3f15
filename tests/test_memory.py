"""Activation memory: saved-tensor bytes, and the live-bytes peak of forward + backward."""
import pytest
import timm
import torch

import revcolv2  # noqa: F401
from revcolv2.model import RevColV2
from revcolv2_bench.memory import LiveBytes, activation_peak_per_image

pytestmark = pytest.mark.usefixtures("single_thread")


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


def _model(nb, nt, reversible, dim=64):
    torch.manual_seed(0)
    return RevColV2(embed_dim=dim, num_heads=2, num_classes=10, num_bu_columns=nb, num_td_columns=nt,
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


def test_live_bytes_tracker_counts_creations_and_frees():
    with LiveBytes() as m:
        a = torch.empty(1000, dtype=torch.float32)      # 4000 B
        b = torch.empty(500, dtype=torch.float64)       # 4000 B
        v = a[:10]                                      # a view: no new storage
        del b
        c = torch.empty(250, dtype=torch.float32)       # 1000 B
    assert (m.peak, m.live) == (8000, 5000)
    del a, v, c


def _peak_per_image(model):
    """Per-image activation peak of one bf16-autocast training step, in level-tensor units
    (one (N, D) fp32 level of one image)."""
    def step(batch):
        torch.manual_seed(1)
        x = torch.randn(batch, 3, 64, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()

    level_bytes = (64 // 16) ** 2 * model.embed_dim * 4
    return activation_peak_per_image(step) / level_bytes


def _rebuilt_last(nb, nt):
    model = _model(nb, nt, True)
    model.keep_last_graph = False
    return model


@pytest.mark.slow
def test_reversible_backward_peak_is_constant_in_columns():
    """The peak includes the backward (which saved-tensor counts cannot see). Reversible: about
    31 level tensors per image with 2 TD columns whatever the number of BU columns (one
    level's F graph and its gradients, the stored last states, the rebuilt states); keeping
    every column's state alive would add 4 per column. Plain autograd grows with the columns.

    Keeping the last update's graph (the default) holds that level's graph from the end of the
    forward instead of rebuilding it first thing in backward. Where the forward's end is the
    peak, as here (a 64x64 image is 12 level tensors of this 64-wide model), that adds one
    level's graph (measured 7.3). At 224x224 it does not move RevColV2-B's peak when the
    backward allocates the gradients (8.54 MB per image either way, bf16), and adds 4.15 when
    they are already held (accumulation: 7.06 -> 11.21)."""
    rev_small, rev_big = _peak_per_image(_rebuilt_last(2, 2)), _peak_per_image(_rebuilt_last(6, 2))
    kept_small, kept_big = _peak_per_image(_model(2, 2, True)), _peak_per_image(_model(6, 2, True))
    plain_small, plain_big = _peak_per_image(_model(2, 2, False)), _peak_per_image(_model(6, 2, False))
    assert rev_big <= rev_small + 1.0 and kept_big <= kept_small + 1.0, (rev_small, rev_big, kept_small, kept_big)
    assert rev_big <= 34, rev_big
    assert kept_big <= rev_big + 8, (kept_big, rev_big)  # one level's graph: about 7 here
    assert plain_big > 1.8 * plain_small and plain_small > 1.5 * kept_small, (plain_small, plain_big, kept_small)


# ----------------------------------------------------------------------------- memory traffic
def test_traffic_counts_bytes_read_and_written_per_image_and_skips_views():
    from revcolv2_bench.memory import traffic_per_image

    w = torch.randn(100, 100)

    def step(batch):
        x = torch.randn(batch, 100)  # factory op: writes 400 bytes per image
        y = (x * 2).t().t()  # mul reads 400 and writes 400 per image; the transposes are views
        (y @ w).sum()  # the matmul is GEMM traffic; sum reads 400 per image

    t = traffic_per_image(step)
    assert t["non_gemm_bytes"] == 400 + 800 + 400
    assert t["gemm_bytes"] == 400 + 400  # reads x (the weight cancels), writes the product
    assert t["ops"] == 4  # randn, mul, mm, sum: no views


def test_traffic_counts_an_out_tensor_once_as_written():
    from revcolv2_bench.memory import traffic_per_image

    def step(batch):
        x = torch.randn(batch, 100)  # writes 400 bytes per image
        y = torch.empty(batch, 100, dtype=torch.bfloat16)  # no traffic
        torch.mul(x, 2.0, out=y)  # reads 400, writes 200 per image

    t = traffic_per_image(step)
    assert t["non_gemm_bytes"] == 400 + 400 + 200
    assert t["ops"] == 2


@pytest.mark.slow
def test_reversible_moves_less_non_gemm_traffic_than_checkpointed_timm_vit():
    """The engine's element-wise work per image (rebuilds, alpha updates and their gradients)
    and its kernel count stay well below those of timm's per-block checkpointing on a ViT of
    the same width: at most 0.80x the non-GEMM bytes and 0.85x the ops (the engine's CPU
    targets, met by RevColV2-B at 224x224 too, ``tools/benchmark_backbone.py --device cpu``).
    Measured here: 0.69x and 0.83x (engine v2: 0.90x and 0.91x)."""
    from revcolv2_bench.memory import traffic_per_image

    def per_image(model):
        def step(batch):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, 3, 64, 64, generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x).float().logsumexp(-1).mean()
            loss.backward()
        return traffic_per_image(step)

    torch.manual_seed(0)
    rev = timm.create_model("revcolv2_tiny", num_classes=10, drop_path_rate=0.1, reversible=True).train()
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64, drop_path_rate=0.1).train()
    vit.set_grad_checkpointing(True)
    r, v = per_image(rev), per_image(vit)
    assert r["non_gemm_bytes"] <= 0.80 * v["non_gemm_bytes"], (r, v)
    assert r["ops"] <= 0.85 * v["ops"], (r, v)
