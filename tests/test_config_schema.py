"""One schema per classification tool: every value of a recipe is checked up front, for
type and range, and a bad one is an error naming the key, the value and the expected type
(``data.hflip=abc`` failed at the first batch, ``model.drop_path_rate=abc`` inside
``torch.linspace``); a key the tool does not read is refused with the closest one."""
import copy
from pathlib import Path

import pytest
from training_helpers import REPO, run_tool, tiny_dataset

from revcolv2.cli import finetune, linear_probe, pretrain
from revcolv2.config import ConfigError, load_config, validate_config

SCHEMAS = {"pretrain": pretrain.SCHEMA, "finetune": finetune.SCHEMA, "linear_probe": linear_probe.SCHEMA}
RECIPES = sorted(p for tool in SCHEMAS for p in (REPO / "configs" / tool).glob("[!_]*.yaml"))


def _tool(path: Path) -> str:
    return path.parent.name


def _leaves(node, prefix=""):
    for k, v in node.items():
        if isinstance(v, dict) and k != "kwargs":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _set(cfg, key, value):
    *parents, leaf = key.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[leaf] = value


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_fits_its_tools_schema(recipe):
    validate_config(load_config(str(recipe)), SCHEMAS[_tool(recipe)], str(recipe))


@pytest.mark.parametrize("tool", sorted(SCHEMAS))
def test_every_value_of_a_recipe_is_checked(tool):
    """Each key of the tool's demo recipe, given a value of the wrong type, is refused naming
    the key and the value: no value reaches the model or the loader unchecked."""
    cfg = load_config(str(REPO / "configs" / tool / "revcolv2_tiny_demo.yaml"))
    keys = list(_leaves(cfg))
    assert len(keys) >= 18
    for key in keys:
        bad = copy.deepcopy(cfg)
        wrong = 123 if key in ("data.auto_augment",) else "abc"
        _set(bad, key, wrong)
        with pytest.raises(ConfigError) as e:
            validate_config(bad, SCHEMAS[tool])
        assert f"config key {key} must be" in str(e.value) and repr(wrong) in str(e.value), (key, str(e.value))


@pytest.mark.parametrize("key, value, expected", [
    ("data.hflip", "abc", "a number >= 0 and <= 1"),
    ("data.hflip", 1.5, "a number >= 0 and <= 1"),
    ("model.drop_path_rate", "abc", "a number >= 0 and < 1"),
    ("model.mask_ratio", 1.0, "a number > 0 and < 1"),
    ("train.amp", "bf61", "one of bf16, fp16, none"),
    ("data.crop_scale", [0.2], "a list of 2 numbers"),
    ("model.reversible", "yes", "true or false"),
    ("model.name", "revcolv2_huge", "one of revcolv2_"),
])
def test_a_bad_value_names_key_value_and_expected_type(key, value, expected):
    cfg = load_config(str(REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"))
    _set(cfg, key, value)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, pretrain.SCHEMA)
    msg = str(e.value)
    assert f"config key {key} must be {expected}" in msg and repr(value) in msg and "\n" not in msg, msg


def test_a_key_the_tool_does_not_read_is_refused_with_the_closest(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"_base_: {REPO / 'configs' / 'finetune' / 'revcolv2_tiny_demo.yaml'}\n"
                      "schedule: {warmup_epoch: 2}\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml has the key schedule\.warmup_epoch.*did you mean "
                                          r"schedule\.warmup_epochs"):
        validate_config(load_config(str(recipe)), finetune.SCHEMA, str(recipe))


def test_whole_numbers_are_normalised_and_defaults_filled():
    cfg = load_config(str(REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"), ["schedule.epochs=2.0"])
    del cfg["train"]["keep_last"]
    validate_config(cfg, pretrain.SCHEMA)
    assert cfg["schedule"]["epochs"] == 2 and isinstance(cfg["schedule"]["epochs"], int)
    assert cfg["train"]["keep_last"] == 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("data"), classes=2, train_per_class=4, val_per_class=1)


@pytest.mark.parametrize("tool, override, key", [
    ("pretrain", "data.hflip=abc", "data.hflip"),
    ("finetune", "model.drop_path_rate=abc", "model.drop_path_rate"),
    ("linear_probe", "optim.momentum=abc", "optim.momentum"),
])
def test_the_tools_refuse_before_anything_is_written(data, tmp_path, tool, override, key):
    with pytest.raises(ConfigError, match=rf"config key {key} must be a number .*'abc'"):
        run_tool(tool, "--config", REPO / "configs" / tool / "revcolv2_tiny_demo.yaml", "--data-path", data,
                 "--output-dir", tmp_path / "out", "--num-workers", "0", "--opts", override)
    assert not (tmp_path / "out").exists()
