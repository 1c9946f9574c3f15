"""Fine-tuning and linear probing: layer-decay groups, MIM checkpoint loading, the probe
head, and both entry points end to end on CPU."""
from pathlib import Path

import pytest
import timm
import torch
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

import revcolv2  # noqa: F401
from revcolv2.checkpoint import PRETRAIN_ONLY_PREFIXES
from revcolv2.classification import LinearProbe, load_pretrained
from revcolv2.mim import create_mim_model
from revcolv2.optim import param_groups_layer_decay

TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"))  # 4 classes, 32 train / 8 val images


@pytest.fixture(scope="module")
def mim_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    mim = create_mim_model("revcolv2_tiny", **TINY)
    path = tmp_path_factory.mktemp("mim") / "checkpoint-0001.pth"
    torch.save({"model": mim.state_dict(), "epoch": 1}, path)  # the layout tools/pretrain.py writes
    return path


def classifier(num_classes=4, **kwargs):
    return timm.create_model("revcolv2_tiny", num_classes=num_classes, head_init_scale=0.001, **dict(TINY, **kwargs))


def test_layer_decay_groups_cover_every_parameter_once_with_increasing_scale():
    model = classifier()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75, skip=model.no_weight_decay())
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # none missing, none twice
    assert len({id(p) for g in groups for p in g["params"]}) == len(list(model.parameters()))
    scale_of = {}
    for g in groups:
        assert scale_of.setdefault(g["layer_id"], g["lr_scale"]) == g["lr_scale"]
    ids = sorted(scale_of)
    # the rule's ids, unchanged by pruning: the classifier builds no block with the largest one
    assert ids == sorted({model.layer_id(n) for n, _ in model.named_parameters()})
    assert ids == [i for i in range(model.num_layers()) if i != model.num_layers() - 2]
    assert all(scale_of[a] < scale_of[b] for a, b in zip(ids, ids[1:]))  # strictly increasing
    head = next(g for g in groups if "head.weight" in g["param_names"])
    assert head["lr_scale"] == 1.0 and head["layer_id"] == ids[-1]
    stem = next(g for g in groups if "patch_embed.proj.weight" in g["param_names"])
    assert stem["layer_id"] == 0 and stem["lr_scale"] == pytest.approx(0.75 ** ids[-1])
    for g in groups:  # no decay on norms, biases, alphas
        for n in g["param_names"]:
            no_decay = n.endswith(".bias") or "norm" in n or n.endswith("alphas")
            assert (g["weight_decay"] == 0.0) == no_decay, n


def test_mim_checkpoint_loads_with_a_report(mim_checkpoint, capsys):
    model = classifier()
    report = load_pretrained(model, str(mim_checkpoint))
    # left out and listed: the pre-training-only tensors and the levels the classifier does not build
    assert {k for k in report.unexpected if not k.startswith(PRETRAIN_ONLY_PREFIXES)} == {
        k for k in torch.load(mim_checkpoint)["model"] if k.startswith(model.plan.pruned_prefixes())}
    assert any(k.startswith("columns.2.levels.0.") for k in report.unexpected)
    assert report.missing and all(k.startswith(("head.", "fc_norm.")) for k in report.missing)
    sd = torch.load(mim_checkpoint)["model"]
    for k, v in model.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), k
    out = capsys.readouterr().out
    assert "loaded" in out and "unused from checkpoint" in out and "mask_token" in out
    assert "levels this model does not build (columns.2.levels.0, columns.2.levels.1, columns.2.levels.2)" in out


def test_anything_else_unmatched_is_an_error(mim_checkpoint, tmp_path):
    sd = torch.load(mim_checkpoint)["model"]
    extra = dict(sd, **{"columns.9.levels.0.blocks.0.norm1.weight": torch.ones(32)})
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="columns.9"):
        load_pretrained(classifier(), str(tmp_path / "extra.pth"), verbose=False)
    missing = {k: v for k, v in sd.items() if not k.startswith("columns.0.")}
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="columns.0"):
        load_pretrained(classifier(), str(tmp_path / "missing.pth"), verbose=False)


def test_classifier_for_other_classes_is_dropped(tmp_path, capsys):
    torch.save({"model": classifier(num_classes=7).state_dict()}, tmp_path / "in22k.pth")
    report = load_pretrained(classifier(num_classes=4), str(tmp_path / "in22k.pth"))
    assert set(report.missing) == {"head.weight", "head.bias"}
    assert "other number of classes" in capsys.readouterr().out


def test_linear_probe_trains_only_its_head_on_the_last_bottom_up_level(mim_checkpoint):
    backbone = timm.create_model("revcolv2_tiny", num_classes=0, reversible=False, **TINY)
    load_pretrained(backbone, str(mim_checkpoint), verbose=False)
    probe = LinearProbe(backbone, 4).train()
    assert not backbone.training and probe.head.training
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    assert not probe.head[0].affine
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        bu = backbone.forward_bottom_up(x)
    assert torch.allclose(probe.features(x), bu[-1].mean(1), atol=1e-6)
    probe(x).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert probe.head[1].weight.grad is not None


def finetune(data, out, *opts, extra=()):
    return run_tool(
        "finetune", "--config", REPO / "configs/finetune/revcolv2_tiny_demo.yaml", "--data-path", data,
        "--output-dir", out, "--num-workers", "0", *extra, "--opts", "data.input_size=32",
        f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=8", "train.eval_batch=8",
        *opts,
    )


@pytest.mark.slow
def test_finetune_end_to_end_then_eval_only(data, mim_checkpoint, tmp_path, capsys):
    out = finetune(data, tmp_path, "schedule.epochs=2", extra=("--finetune", mim_checkpoint))
    assert "unused from checkpoint" in capsys.readouterr().out
    assert len(out["history"]) == 8  # 2 epochs x 32 images / 8
    assert (tmp_path / "checkpoint-best.pth").is_file() and (tmp_path / "checkpoint-last.pth").is_file()
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"top1"' in log[0] and '"ema_top1"' in log[0] and '"top5"' in log[0]
    res = finetune(data, tmp_path, extra=("--eval", "--resume", tmp_path / "checkpoint-best.pth"))["results"]
    assert [r["weights"] for r in res] == ["model", "model_ema"]
    best = torch.load(tmp_path / "checkpoint-best.pth", weights_only=False)
    assert max(res[0]["top1"], res[1]["top1"]) == pytest.approx(max(best["metrics"]["top1"],
                                                                    best["metrics"]["ema_top1"]))


@pytest.mark.slow
def test_finetune_resume_with_mixup_and_ema_is_exact(data, tmp_path):
    opts = ("schedule.epochs=2", "model.drop_path_rate=0.1")
    full = finetune(data, tmp_path / "full", *opts)
    finetune(data, tmp_path / "cut", *opts, extra=("--stop-at-step", "3"))
    rest = finetune(data, tmp_path / "cut", *opts, extra=("--resume", "auto"))
    for step in range(4, 9):
        assert rest["history"][step] == pytest.approx(full["history"][step], abs=1e-6), step
    a, b = full["trainer"].ema.module.state_dict(), rest["trainer"].ema.module.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_linear_probe_end_to_end(data, mim_checkpoint, tmp_path):
    out = run_tool(
        "linear_probe", "--config", REPO / "configs/linear_probe/revcolv2_tiny_demo.yaml", "--data-path", data,
        "--output-dir", tmp_path, "--num-workers", "0", "--finetune", mim_checkpoint, "--opts",
        "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=8",
        "train.eval_batch=8", "schedule.epochs=2",
    )
    trainer = out["trainer"]
    assert type(trainer.optimizer).__name__ == "Lars" and len(out["history"]) == 8
    sd = torch.load(mim_checkpoint)["model"]
    for k, v in trainer.model.backbone.state_dict().items():
        if k in sd:
            assert torch.equal(v, sd[k]), f"frozen backbone changed: {k}"
    # the head trained (its zero-initialised bias moved) and checkpoint-best.pth holds the
    # weights that scored the best top-1: evaluating it again gives the same number
    assert trainer.model.head[1].bias.abs().max() > 0
    res = run_tool(
        "linear_probe", "--config", REPO / "configs/linear_probe/revcolv2_tiny_demo.yaml", "--data-path", data,
        "--output-dir", tmp_path, "--num-workers", "0", "--eval", "--resume", tmp_path / "checkpoint-best.pth",
        "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "train.eval_batch=8",
    )["results"]
    assert res[0]["top1"] == pytest.approx(out["best"]["top1"])
