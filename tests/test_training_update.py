"""One optimizer update of the shared training loop (revcolv2.trainer.Trainer), option by option.

Each test runs real updates of a tiny RevColV2 classifier through ``Trainer.fit`` and
compares the weights against an independent statement of what the option means:

- schedule: with a linear warm-up from 0 over W updates, update k (0-based) uses the lr
  ``base * k / W`` while k < W, then a half cosine from ``base`` towards ``min_lr`` over the
  remaining updates; the first update uses lr 0 and so leaves the weights unchanged;
- layer decay: each parameter group's lr is the schedule's lr times its layer-decay scale;
- gradient accumulation: an update over 2 micro-batches of 2 equals the update over their
  batch of 4;
- gradient clipping: with SGD at lr 1 and no momentum, a clipped update moves the weights by
  exactly the clip norm;
- EMA: it is updated after the optimizer step, from the weights that step produced.
"""
import math

import pytest
import timm
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import TensorDataset

import revcolv2  # noqa: F401  (registers the presets)
from revcolv2.classification import ClassificationTrainer
from revcolv2.distributed import DistInfo
from revcolv2.optim import param_groups_layer_decay
from revcolv2.trainer import Trainer

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


class ClassifierTrainer(Trainer):
    def forward_loss(self, batch):
        images, target = batch
        return nn.functional.cross_entropy(self.ddp_model(images), target)


def tiny_classifier():
    torch.manual_seed(0)
    return timm.create_model("revcolv2_tiny", num_classes=4, embed_dim=32, num_heads=2, patch_size=8)


def dataset(n=16):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g))


def trainer(tmp_path, model, optimizer, cls=ClassifierTrainer, **kw):
    args = dict(model=model, optimizer=optimizer, dataset=dataset(), info=DistInfo(), output_dir=str(tmp_path),
                effective_batch=2, micro_batch=2, epochs=1, warmup_epochs=0.0, num_workers=0, amp="none")
    args.update(kw)
    return cls(**args)


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def snapshot_after_every_update(model, optimizer):
    """Weights after each optimizer step, in order."""
    snaps = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: snaps.append(weights(model)))
    return snaps


def test_update_k_uses_the_schedules_lr_at_k_and_the_first_update_leaves_the_weights(tmp_path):
    base, min_lr = 1e-3, 1e-5
    model = tiny_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=base, weight_decay=0.05)
    used = []
    opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
    # 16 images / batch 2 = 8 updates, the first 4 warm up
    t = trainer(tmp_path, model, opt, warmup_epochs=0.5, min_lr=min_lr)
    assert t.total_steps == 8
    before = weights(model)
    t.fit(stop_at_step=1)
    after = weights(model)
    assert used == [0.0]
    assert all(torch.equal(before[n], after[n]) for n in before), "the first update (lr 0) changed the weights"
    t.fit()
    warmup, total = 4, 8
    expected = [base * k / warmup for k in range(warmup)]
    expected += [min_lr + (base - min_lr) * (1 + math.cos(math.pi * (k - warmup) / (total - warmup))) / 2
                 for k in range(warmup, total)]
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_layer_decay_scales_each_groups_lr_in_the_update(tmp_path):
    """Fine-tuning's parameter groups: update k gives a parameter with layer id i the lr
    ``schedule(k) * decay ** (7 - i)`` (revcolv2_tiny: ids 0..6, heads 7; a block's id is its
    position in its column's execution order + its column + 1)."""
    base, decay = 1e-3, 0.5
    model = tiny_classifier()
    opt = torch.optim.AdamW(param_groups_layer_decay(model, 0.05, decay), lr=base)
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    opt.register_step_pre_hook(lambda o, args, kwargs: lr_of.update(
        {names[id(p)]: g["lr"] for g in o.param_groups for p in g["params"]}))
    trainer(tmp_path, model, opt).fit(stop_at_step=1)  # no warm-up: update 0 has the base lr
    expected = {
        "head.weight": base,  # id 7
        "columns.2.levels.3.blocks.0.mlp.fc1.weight": base * decay ** 4,  # TD level 3 runs first: 0 + 2 + 1 = 3
        "columns.0.levels.3.blocks.0.mlp.fc1.weight": base * decay ** 3,  # BU level 3 runs last: 3 + 0 + 1 = 4
        "columns.1.alphas": base * decay ** 5,  # the column's first block: 0 + 1 + 1 = 2
        "patch_embed.proj.weight": base * decay ** 7,  # id 0
    }
    for name, lr in expected.items():
        assert lr_of[name] == pytest.approx(lr, rel=1e-12), f"{name}: lr {lr_of[name]:.4g}, expected {lr:.4g}"


def test_accumulating_two_micro_batches_is_one_update_over_their_batch(tmp_path):
    results = {}
    for micro in (2, 4):
        model = tiny_classifier()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        t = trainer(tmp_path / str(micro), model, opt, effective_batch=4, micro_batch=micro)
        assert t.accum == 4 // micro
        before = weights(model)
        t.fit(stop_at_step=1)
        results[micro] = weights(model)
    assert any(not torch.equal(before[n], results[4][n]) for n in before)  # the update moved the weights
    for n in before:
        torch.testing.assert_close(results[2][n], results[4][n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_accumulated_micro_batches_after_the_first_rebuild_the_last_graph(tmp_path):
    """The reversible engine retains the last update's graph only while the backward allocates
    the gradients, whatever loop drives it: in each update the first micro-batch retains it,
    the later ones (gradients held) evaluate that level again in backward, and the updates are
    the same as without accumulation. The Trainer has no say in it."""
    from revcolv2.model import Block

    results, evals = {}, {}
    for micro in (2, 4):
        model = tiny_classifier()
        model.reversible = True
        calls = []
        model.register_forward_pre_hook(lambda *a, calls=calls: calls.append("forward"))
        for m in model.modules():
            if isinstance(m, Block):
                m.register_forward_pre_hook(lambda *a, calls=calls: calls.append("block"))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        trainer(tmp_path / str(micro), model, opt, effective_batch=4, micro_batch=micro).fit(stop_at_step=2)
        text = " ".join(calls).split("forward")[1:]  # block evaluations per micro-batch, backward included
        evals[micro] = [part.split().count("block") for part in text]
        results[micro] = weights(model)
    retained, rebuilt = evals[2][:2]
    assert evals[2] == [retained, rebuilt] * 2 and evals[4] == [retained] * 2, evals
    assert rebuilt > retained, evals  # one level (its blocks) more when rebuilt
    for n in results[2]:
        torch.testing.assert_close(results[2][n], results[4][n], rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_clipped_update_moves_the_weights_by_the_clip_norm(tmp_path):
    clip = 1e-3
    model = tiny_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = trainer(tmp_path, model, opt, clip_grad=clip)
    before = weights(model)
    t.fit(stop_at_step=1)
    after = weights(model)
    step = torch.cat([(after[n] - before[n]).flatten() for n in before]).double()
    assert step.norm().item() == pytest.approx(clip, rel=1e-4)


def test_ema_follows_the_weights_each_update_produced(tmp_path):
    model = tiny_classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snaps = snapshot_after_every_update(model, opt)
    ema = ModelEmaV3(model, decay=0.5)
    t = trainer(tmp_path, model, opt, cls=ClassificationTrainer, ema=ema, val_dataset=None,
                criterion=nn.CrossEntropyLoss())
    t.fit(stop_at_step=2)
    assert len(snaps) == 2
    # timm's ModelEmaV3 starts from the first update's weights, then averages with decay 0.5
    ema_weights = dict(ema.module.named_parameters())
    for n, w2 in snaps[1].items():
        torch.testing.assert_close(ema_weights[n].detach(), 0.5 * snaps[0][n] + 0.5 * w2, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{n}: {m}")
