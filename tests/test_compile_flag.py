"""``--compile`` on the three classification tools and ``train.compile`` in the detectron2
configs: a reversible RevColV2 compiles level by level (``compile_levels()``), a plain model
compiles whole, an EMA copy stays eager, and a compiled run trains like an eager one."""
import pytest
import torch
from torch import nn
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

from revcolv2.classification import LinearProbe
from revcolv2.model import RevColV2, allow_level_recompiles, compile_for_training


def _compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _levels(model: RevColV2):
    return [level for col in model.columns for level in col.levels]


def _tiny(reversible: bool) -> RevColV2:
    torch.manual_seed(0)
    return RevColV2(embed_dim=32, num_heads=2, num_classes=5, num_bu_columns=1, num_td_columns=1, num_levels=2,
                    reversible=reversible)


@pytest.mark.slow  # imports torch._dynamo (seconds); compiles nothing (compilation is at the first forward)
def test_a_reversible_model_compiles_its_levels_and_a_plain_one_compiles_whole():
    allow_level_recompiles()
    rev = _tiny(True)
    assert "compile_levels()" in compile_for_training(rev)[0]
    assert all(_compiled(level) for level in _levels(rev)) and not _compiled(rev)
    plain = _tiny(False)
    assert "whole module" in compile_for_training(plain)[0]
    assert _compiled(plain) and not any(_compiled(level) for level in _levels(plain))
    # a linear probe calls forward_bottom_up, not the backbone's forward: the probe itself compiles
    probe = LinearProbe(_tiny(False), 3)
    compile_for_training(probe)
    assert _compiled(probe) and not _compiled(probe.backbone)
    # compiling keeps the checkpoint keys
    assert set(rev.state_dict()) == set(_tiny(True).state_dict())


def test_compile_flag_is_in_every_training_tool_help():
    from revcolv2.cli.common import TASKS, training_parser

    for task in TASKS:
        assert "--compile" in training_parser("x", task).format_help()
        assert training_parser("x", task).parse_args(["--config", "c", "--compile"]).compile
        assert not training_parser("x", task).parse_args(["--config", "c"]).compile


PRETRAIN = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"
FINETUNE = REPO / "configs" / "finetune" / "revcolv2_tiny_demo.yaml"
TINY = ("data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=8",
        "schedule.warmup_epochs=0", "schedule.epochs=1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.mark.slow  # inductor compiles the tiny model's levels on the CPU (tens of seconds)
def test_pretrain_with_compile_trains_like_eager_through_compiled_levels(data, tmp_path):
    from torch._dynamo.utils import counters

    def run(out, *flags):
        return run_tool("pretrain", "--config", PRETRAIN, "--data-path", data, "--output-dir", out,
                        "--num-workers", "0", "--stop-at-step", "2", *flags,
                        "--opts", *TINY, "train.vis_images=0")

    eager = run(tmp_path / "eager")
    torch._dynamo.reset()
    counters.clear()
    compiled = run(tmp_path / "compiled", "--compile")
    model = compiled["trainer"].model
    assert model.reversible and all(_compiled(level) for level in _levels(model))
    assert counters["stats"]["unique_graphs"] > 0  # the levels really ran compiled
    assert not any(_compiled(level) for level in _levels(eager["trainer"].model))
    assert sorted(compiled["history"]) == [1, 2]
    # the same weights give the same loss; after an AdamW update (whose near-zero gradients
    # round differently under inductor) they differ by far less than the step changes it
    assert compiled["history"][1] == pytest.approx(eager["history"][1], rel=1e-5)
    assert compiled["history"][2] == pytest.approx(eager["history"][2], rel=1e-3)


@pytest.mark.slow
def test_finetune_with_compile_keeps_its_ema_copy_eager(data, tmp_path):
    def run(out, *flags):
        return run_tool("finetune", "--config", FINETUNE, "--data-path", data, "--output-dir", out,
                        "--num-workers", "0", "--stop-at-step", "1", *flags,
                        "--opts", *TINY, "mixup.mixup=0", "mixup.cutmix=0")

    eager = run(tmp_path / "eager")
    torch._dynamo.reset()
    compiled = run(tmp_path / "compiled", "--compile")
    trainer = compiled["trainer"]
    assert trainer.model.reversible and all(_compiled(level) for level in _levels(trainer.model))
    # the EMA copy was made before compiling: copied after, it would run the original's compiled call
    ema = trainer.ema.module
    assert not _compiled(ema) and not any(_compiled(level) for level in _levels(ema))
    assert compiled["history"][1] == pytest.approx(eager["history"][1], rel=1e-5)


@pytest.mark.slow  # inductor compiles the demo backbone's levels on the CPU
def test_train_compile_in_a_detectron2_config_compiles_the_backbone_and_trains_like_eager():
    from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES
    from detectron2.config import LazyConfig, instantiate
    from detectron2.utils.events import EventStorage

    from revcolv2_bench.detection import synthetic_batch
    from revcolv2_d2.train_net import compile_if_configured

    cfg = LazyConfig.load(DEMO_CONFIG)
    assert cfg.train.compile is False  # off unless asked
    cfg = LazyConfig.apply_overrides(cfg, [o for o in TINY_OVERRIDES if o.startswith("model.")] +
                                     ["model.roi_heads.num_classes=80"])  # synthetic_batch draws COCO's classes

    def losses(compile_it: bool):
        torch.manual_seed(0)
        model = instantiate(cfg.model).train()
        cfg.train.compile = compile_it
        compiled = compile_if_configured(cfg, model)
        torch.manual_seed(1)
        with EventStorage():
            out = model(synthetic_batch(1, 128, "cpu", with_targets=True))
        sum(out.values()).backward()
        return model, compiled, {k: v.item() for k, v in out.items()}

    eager_model, none, eager = losses(False)
    model, (backbone,), compiled = losses(True)
    assert none == [] and backbone is model.backbone.bottom_up
    assert backbone.net.reversible and all(_compiled(level) for level in _levels(backbone.net))
    assert not _compiled(model.roi_heads)  # the heads stay eager
    for name, value in eager.items():
        assert compiled[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
