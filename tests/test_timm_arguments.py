"""Every argument our code passes to timm (and to our own factories in timm's place) has an
effect a test sees, so that replacing it by its default fails.

The training tools run in this process up to the point where they would start training:
their trainer class is replaced by a stand-in that records what it is given (model,
optimizer, datasets with their transforms, criterion, Mixup, EMA) and stops. Every recipe
value is set to something other than the timm default of the argument it feeds (for
example ``data.interpolation=bicubic`` where ``create_transform`` defaults to bilinear,
``optim.trust_coeff=0.002`` where ``Lars`` defaults to 0.001), and the test checks the
built object: the transform pipeline, the optimizer's groups and defaults, the Mixup
targets, the EMA decay, the model's behaviour.

Three arguments equal timm's default, so no test can tell them apart (documented here, not
asserted): ``re_count=1`` of ``create_transform``, and ``mean`` / ``std``, which are
ImageNet's in both.
"""
import math
from pathlib import Path

import pytest
import timm
import torch
import training_helpers
from training_helpers import REPO, TINY_MODEL, tiny_dataset

import revcolv2  # noqa: F401  (registers the presets with timm)

pytestmark = pytest.mark.usefixtures("single_thread")
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("data"), classes=4, train_per_class=2, val_per_class=1)


def built_for_training(monkeypatch, tmp_path, data, tool: str, trainer: str, *opts) -> dict:
    """Run ``tools/<tool>.py`` on its demo recipe until it constructs its trainer; return the
    trainer's arguments."""
    return training_helpers.built_for_training(
        monkeypatch, tool, trainer, "--config", REPO / "configs" / tool / "revcolv2_tiny_demo.yaml", "--data-path",
        data, "--output-dir", tmp_path / "out", "--num-workers", "0", "--device", "cpu", "--opts",
        f"model.kwargs={TINY_MODEL}", *opts)


def stochastic_in_training(model, *inputs, **kwargs) -> bool:
    """Whether two training-mode forwards under different seeds differ (drop path drawn)."""
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(*inputs, **kwargs)
        torch.manual_seed(1)
        b = model(*inputs, **kwargs)
    a, b = (a["pred"], b["pred"]) if isinstance(a, dict) else (a, b)
    return not torch.equal(a, b)


def group_of(optimizer, param) -> dict:
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


# ----------------------------------------------------------------------------- fine-tuning
FINETUNE_OPTS = (
    "data.input_size=48", "data.crop_scale=[0.35,1.0]", "data.auto_augment=rand-m7-mstd0.5-inc1",
    "data.interpolation=bicubic", "data.re_prob=0.4", "data.crop_pct=0.9",
    "model.drop_path_rate=0.3", "model.head_init_scale=0.001", "model.reversible=false",
    "optim.weight_decay=0.07", "optim.layer_decay=0.6", "optim.betas=[0.8,0.99]", "optim.base_lr=0.01",
    "optim.batch_size=8", "train.batch_per_gpu=4",
)


@pytest.fixture(scope="module")
def finetune_mixup(tmp_path_factory, data):
    with pytest.MonkeyPatch.context() as mp:
        return built_for_training(mp, tmp_path_factory.mktemp("ft"), data, "finetune", "ClassificationTrainer",
                                  *FINETUNE_OPTS, "mixup.mixup=0.3", "mixup.cutmix=0.6", "mixup.label_smoothing=0.2",
                                  "ema.decay=0.97")


def test_finetune_model_arguments(finetune_mixup):
    """timm.create_model(num_classes=, drop_path_rate=, head_init_scale=, reversible=, img_size=, **kwargs)."""
    model = finetune_mixup["model"]
    assert model.num_classes == 4 and model.get_classifier().out_features == 4  # the data's class folders
    assert model.embed_dim == 32  # model.kwargs reach the model
    assert model.img_size == 48 and model.reversible is False
    head = model.get_classifier().weight.abs().max()
    assert 0 < head < 1e-3, f"head weights up to {head:.3g}: not scaled by head_init_scale 0.001"
    x = torch.randn(2, 3, 48, 48)
    assert stochastic_in_training(model, x), "drop_path_rate 0.3 drops nothing in training"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_finetune_transforms(finetune_mixup):
    """create_transform(input_size=, scale=, auto_augment=, interpolation=, re_prob=, re_mode=; crop_pct=)."""
    train = repr(finetune_mixup["dataset"].transform)
    assert "RandomResizedCropAndInterpolation(size=(48, 48), scale=(0.35, 1.0)" in train, train
    assert "interpolation=bicubic" in train, train
    assert "RandAugment(n=2" in train and "m=7, mstd=0.5" in train, train  # rand-m7-mstd0.5
    assert "RandomErasing(p=0.4, mode=pixel, count=(1, 1))" in train, train
    val = repr(finetune_mixup["val_dataset"].transform)
    assert "Resize(size=53, interpolation=bicubic" in val and "CenterCrop(size=(48, 48))" in val, val  # 48 / 0.9


def test_finetune_mixup_and_ema(finetune_mixup):
    """Mixup(mixup_alpha=, cutmix_alpha=, label_smoothing=, num_classes=), ModelEmaV3(decay=)."""
    from timm.loss import SoftTargetCrossEntropy

    mixup = finetune_mixup["mixup"]
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing, mixup.num_classes) == (0.3, 0.6, 0.2, 4)
    torch.manual_seed(0)
    _, target = mixup(torch.randn(4, 3, 48, 48), torch.tensor([0, 0, 1, 1]))
    assert target.shape == (4, 4)  # one column per class of the data
    assert target[:, 2:].min().item() == pytest.approx(0.2 / 4)  # smoothing 0.2 spread over the 4 classes
    assert isinstance(finetune_mixup["criterion"], SoftTargetCrossEntropy)
    assert finetune_mixup["ema"].decay == 0.97


def test_finetune_optimizer_groups(finetune_mixup):
    """param_groups_layer_decay(weight_decay=, layer_decay=, skip=no_weight_decay()), AdamW(lr=, betas=)."""
    model, opt = finetune_mixup["model"], finetune_mixup["optimizer"]
    assert opt.defaults["betas"] == (0.8, 0.99)
    assert opt.defaults["lr"] == pytest.approx(0.01 * 8 / 256)
    params = dict(model.named_parameters())
    assert group_of(opt, params["columns.0.levels.0.blocks.0.attn.qkv.weight"])["weight_decay"] == 0.07
    alphas = [n for n in params if n.endswith("alphas")]
    assert alphas and all(params[n].ndim > 1 for n in alphas)  # only the skip list keeps them undecayed
    assert all(group_of(opt, params[n])["weight_decay"] == 0.0 for n in alphas)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    powers = [round(math.log(s) / math.log(0.6)) for s in scales]  # each lr scale is 0.6 ** depth below the head
    assert len(scales) > 3 and scales == pytest.approx([0.6 ** k for k in powers]), scales


def test_finetune_label_smoothing_without_mixup(monkeypatch, tmp_path, data):
    """LabelSmoothingCrossEntropy(smoothing) when Mixup/CutMix are off; no EMA at decay 0."""
    seen = built_for_training(monkeypatch, tmp_path, data, "finetune", "ClassificationTrainer", *FINETUNE_OPTS,
                              "mixup.mixup=0", "mixup.cutmix=0", "mixup.label_smoothing=0.3", "ema.decay=0")
    criterion = seen["criterion"]
    assert seen["mixup"] is None and seen["ema"] is None
    assert criterion.smoothing == 0.3
    logp = torch.log_softmax(torch.tensor([[20.0, 0.0, 0.0, 0.0]]), 1)
    smoothed = 0.7 * -logp[0, 0] + 0.3 * -logp[0].mean()  # 0.3 of the target spread over every class
    assert criterion(logp, torch.tensor([0])).item() == pytest.approx(smoothed.item(), rel=1e-5)


# ----------------------------------------------------------------------------- linear probing
def test_linear_probe_arguments(monkeypatch, tmp_path, data):
    """timm.create_model(num_classes=0, reversible=False, img_size=), create_transform(scale=,
    color_jitter=None, interpolation=; crop_pct=), Lars(momentum=, trust_coeff=) and its groups."""
    from timm.optim import Lars

    seen = built_for_training(monkeypatch, tmp_path, data, "linear_probe", "ClassificationTrainer",
                              "data.input_size=48", "data.crop_scale=[0.35,1.0]", "data.crop_pct=0.9",
                              "data.interpolation=bicubic", "optim.momentum=0.8", "optim.trust_coeff=0.002",
                              "optim.weight_decay=0.07", "optim.batch_size=8", "train.batch_per_gpu=4")
    backbone = seen["model"].backbone
    assert backbone.num_classes == 0 and backbone.reversible is False and backbone.img_size == 48
    train = repr(seen["dataset"].transform)
    assert "RandomResizedCropAndInterpolation(size=(48, 48), scale=(0.35, 1.0)" in train, train
    assert "interpolation=bicubic" in train and "ColorJitter" not in train and "RandAugment" not in train, train
    val = repr(seen["val_dataset"].transform)
    assert "Resize(size=53, interpolation=bicubic" in val and "CenterCrop(size=(48, 48))" in val, val
    opt = seen["optimizer"]
    assert isinstance(opt, Lars) and opt.defaults["momentum"] == 0.8 and opt.defaults["trust_coeff"] == 0.002
    linear = seen["model"].head[1]
    weight, bias = group_of(opt, linear.weight), group_of(opt, linear.bias)
    assert (weight["weight_decay"], weight["always_adapt"]) == (0.07, True)
    assert (bias["weight_decay"], bias["always_adapt"]) == (0.0, False)


# ----------------------------------------------------------------------------- pre-training
def test_pretrain_arguments(monkeypatch, tmp_path, data):
    """create_mim_model(img_size=, reversible=, mask_ratio=, norm_pix_loss=, drop_path_rate=),
    param_groups_weight_decay(weight_decay=, no_weight_decay_list=), AdamW(betas=), and the
    recipe's crop scale and flip probability."""
    seen = built_for_training(monkeypatch, tmp_path, data, "pretrain", "PretrainTrainer",
                              "data.input_size=32", "data.crop_scale=[0.35,1.0]", "data.hflip=0.3",
                              "model.mask_ratio=0.5", "model.norm_pix_loss=false", "model.drop_path_rate=0.2",
                              "model.reversible=false", "optim.weight_decay=0.07", "optim.betas=[0.8,0.99]",
                              "optim.batch_size=8", "train.batch_per_gpu=4", "train.vis_images=0")
    model, opt = seen["model"], seen["optimizer"]
    assert model.img_size == 32 and model.reversible is False and model.norm_pix_loss is False
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert model(x)["mask"].sum(1).tolist() == [8.0, 8.0]  # half of the 4x4 patches masked
    visible_ids = torch.arange(8).expand(2, 8)
    assert stochastic_in_training(model, x, visible_ids=visible_ids), "drop_path_rate 0.2 drops nothing"
    params = dict(model.named_parameters())
    assert group_of(opt, params["columns.0.levels.0.blocks.0.attn.qkv.weight"])["weight_decay"] == 0.07
    for name in ("mask_token", "columns.1.alphas"):  # not 1-d: only no_weight_decay_list keeps them undecayed
        assert params[name].ndim > 1 and group_of(opt, params[name])["weight_decay"] == 0.0, name
    assert opt.defaults["betas"] == (0.8, 0.99)
    crop = seen["dataset"].loader  # the crop and flip are drawn while decoding (RandomResizedCropDecoder)
    assert (crop.size, crop.scale, crop.ratio, crop.hflip) == (32, (0.35, 1.0), (3 / 4, 4 / 3), 0.3)


# ----------------------------------------------------------------------------- the schedule
def test_cosine_schedule_arguments():
    """CosineLRScheduler(t_initial=, lr_min=, warmup_t=, warmup_lr_init=0, warmup_prefix=True,
    t_in_epochs=False): linear warm-up from 0 over 4 steps, then half a cosine to min_lr over
    the remaining 6, updated per step."""
    from revcolv2.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=4, min_lr=0.1)
    lrs = []
    for step in range(11):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(7)]
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75] + cosine), lrs


# ----------------------------------------------------------------------------- the model's own timm calls
@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_global_pool_reaches_every_token(pool):
    """global_pool_nlc(pool_type=global_pool, num_prefix_tokens=0): RevColV2 has no class token."""
    model = timm.create_model("revcolv2_tiny", num_classes=0, fc_norm=False, global_pool=pool, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, pooled = model.forward_features(x), model(x)
    mean, top = tokens.mean(1), tokens.amax(1)
    torch.testing.assert_close(pooled, {"avg": mean, "max": top, "avgmax": 0.5 * (mean + top)}[pool])


def test_linear_probe_compile_compiles_the_probe_and_nothing_without_it(monkeypatch, tmp_path, data):
    """--compile: the linear probe (a plain, frozen backbone under its head) is compiled as a
    whole module (torch.compile happens at its first forward, not here); without the flag it
    stays eager."""
    def probe(*flags):
        return training_helpers.built_for_training(
            monkeypatch, "linear_probe", "ClassificationTrainer", "--config",
            REPO / "configs" / "linear_probe" / "revcolv2_tiny_demo.yaml", "--data-path", data, "--output-dir",
            tmp_path / ("out" + "".join(flags)), "--num-workers", "0", "--device", "cpu", *flags, "--opts",
            f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=4")["model"]

    assert probe("--compile")._compiled_call_impl is not None
    assert probe()._compiled_call_impl is None
