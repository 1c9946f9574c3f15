"""tools/lazyconfig_train_net.py checks the type of every override against the config's
value before anything is written (``train.max_iter=abc`` is one line naming the key, the
value and the expected type), and a run that fails before its first iteration does not leave
its folder looking used, so the corrected command is not refused."""
import os

import pytest
from d2_helpers import DEMO_CONFIG, TINY_OVERRIDES, make_mini_shapes
from detectron2.config import LazyConfig

from revcolv2.run_dir import run_files
from revcolv2_d2 import train_net
from revcolv2_d2.train_net import DETECTRON2_RUN, apply_overrides, invoke_main

OverrideTypeError = getattr(train_net, "OverrideTypeError", ValueError)


@pytest.fixture(scope="module")
def demo():
    return LazyConfig.load(DEMO_CONFIG)


@pytest.mark.parametrize("override, words", [
    ("train.max_iter=abc", "expected a whole number (int)"),
    ("train.max_iter=1.5", "expected a whole number (int)"),
    ("optimizer.lr=fast", "expected a number (float)"),
    ("train.amp.enabled=yes", "expected true or false (bool)"),
    ("dataloader.train.total_batch_size=[2]", "expected a whole number (int)"),
    ("model.pixel_mean=0.5", "expected a list"),
    ("model.proposal_generator.min_box_size=abc", "expected a number"),  # a LazyCall default (0.0)
])
def test_an_override_of_the_wrong_type_names_key_value_and_type(demo, override, words):
    key, value = override.split("=")
    with pytest.raises(OverrideTypeError) as e:
        apply_overrides(demo.copy(), [override], "demo.py")
    msg = str(e.value)
    assert f"config override {key}=" in msg and value in msg and words in msg and "\n" not in msg, msg


def test_overrides_of_the_right_type_pass(demo):
    cfg = apply_overrides(demo.copy(), ["train.max_iter=7", "optimizer.lr=1", "train.amp.enabled=false",
                                        "train.init_checkpoint=null", "model.pixel_mean=[1,2,3]",
                                        "model.backbone.bottom_up.mlp_ratio=abc"])  # **kwargs: the call checks
    assert cfg.train.max_iter == 7 and cfg.optimizer.lr == 1 and cfg.train.init_checkpoint is None


def test_the_issues_command_writes_nothing_and_the_corrected_one_is_not_refused(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        invoke_main(["--config-file", DEMO_CONFIG, f"train.output_dir={out}", "train.max_iter=abc", *TINY_OVERRIDES])
    assert "train.max_iter='abc'" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.slow  # builds the demo model and its loader
def test_a_run_that_fails_before_its_first_iteration_does_not_hold_its_folder(tmp_path, monkeypatch):
    datasets = tmp_path / "datasets"
    make_mini_shapes(str(datasets))
    for image in (datasets / "synthetic_shapes" / "train").iterdir():  # the first step cannot read its images
        image.unlink()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="image file not found"):
        invoke_main(["--config-file", DEMO_CONFIG, f"train.output_dir={out}", "train.max_iter=2",
                     "train.eval_period=0", *TINY_OVERRIDES])
    assert run_files(str(out), DETECTRON2_RUN) == [], os.listdir(out)
