"""A YAML LazyConfig is data: the config.yaml that every shipped config's run saves loads
back (the same config detectron2 reads from it), and a YAML config whose ``_target_``
names anything but the allowed callables is refused, naming the key and the target,
before anything runs."""
import glob
import os

import pytest
from d2_helpers import DEMO_CONFIG, ROOT
from detectron2.config import LazyConfig
from omegaconf import OmegaConf
from PIL import Image

from revcolv2_d2.safe_config import UnsafeConfigError, load_lazy_config

SHIPPED = sorted(glob.glob(os.path.join(ROOT, "projects", "RevColV2", "configs", "**", "*.py"), recursive=True))


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "projects")))
def test_the_saved_config_of_every_shipped_config_loads(config, tmp_path):
    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(LazyConfig.load(config), saved)  # what default_setup writes beside a run
    ours = load_lazy_config(saved)
    theirs = LazyConfig.load(saved)  # detectron2's yaml.unsafe_load, on our own file
    assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(theirs)


def test_shipped_configs_are_all_checked():
    assert len(SHIPPED) >= 12 and any("mask_rcnn" in p for p in SHIPPED) and any("mask2former" in p for p in SHIPPED)


HOSTILE = {
    "os.system": "model._target_",
    "builtins.exec": "model._target_",
    "torch.hub.load": "model._target_",
    "torch.load": "model._target_",
    "detectron2.config.LazyConfig.load": "model._target_",
    "revcolv2_d2.backbone.torch.hub.load": "model._target_",  # through an allowed module
    "revcolv2_d2.safe_config.load_lazy_config": "model._target_",
}


@pytest.mark.parametrize("target", sorted(HOSTILE))
def test_a_target_outside_the_allowed_modules_is_refused(tmp_path, target):
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model:\n  _target_: {target}\n  _args_: ['touch {marker}']\n"
                      "train: {output_dir: out, device: cpu}\n")
    with pytest.raises(UnsafeConfigError) as e:
        load_lazy_config(str(config))
    msg = str(e.value)
    assert str(config) in msg and f"{HOSTILE[target]} is {target!r}" in msg, msg
    assert not marker.exists()


def test_a_nested_target_is_checked_with_its_key(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text("model:\n  _target_: torch.nn.Sequential\n  _args_:\n"
                      "    - {_target_: torch.nn.Identity}\n    - {_target_: subprocess.run, args: [id]}\n")
    with pytest.raises(UnsafeConfigError, match=r"model\._args_\.1\._target_ is 'subprocess\.run'"):
        load_lazy_config(str(config))


def test_python_tags_other_than_shape_spec_are_refused(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text("model: !!python/object:detectron2.layers.shape_spec.ShapeSpec {channels: 1}\n"
                      "x: !!python/object/new:os.system [id]\n")
    with pytest.raises(UnsafeConfigError, match="refusing to load"):
        load_lazy_config(str(config))
    config.write_text("a: !!python/object:detectron2.layers.shape_spec.ShapeSpec {channels: 1, code: x}\n")
    with pytest.raises(UnsafeConfigError, match="ShapeSpec holds optional integers"):
        load_lazy_config(str(config))


def test_the_tools_refuse_a_hostile_yaml_before_running_anything(tmp_path):
    from revcolv2_d2 import visualization
    from revcolv2_d2.train_net import invoke_main

    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: {{_target_: os.system, _args_: ['touch {marker}']}}\n"
                      f"train: {{output_dir: {tmp_path / 'out'}, device: cpu, init_checkpoint: ''}}\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(UnsafeConfigError, match="model._target_ is 'os.system'"):
        invoke_main(["--config-file", str(config)])
    with pytest.raises(UnsafeConfigError, match="model._target_ is 'os.system'"):
        visualization.main(["--config-file", str(config), "--input", str(image), "--output", str(tmp_path / "v")])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_demo_config_still_trains_from_its_saved_yaml(tmp_path):
    """The saved config of a Mask R-CNN run (ShapeSpec inside) instantiates a model."""
    from detectron2.config import instantiate

    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(LazyConfig.load(DEMO_CONFIG), saved)
    model = instantiate(load_lazy_config(saved).model)
    assert sum(p.numel() for p in model.parameters()) > 0


# ----------------------------------------------------------------------------- named callables (issue 30)
def _evil_pickle(path, marker):
    """A pickle whose loading runs ``touch marker``."""
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.write_bytes(pickle.dumps(Payload()))
    return path


@pytest.mark.parametrize("target", ["detectron2.data.build.load_proposals_into_dataset",
                                    "detectron2.data.load_proposals_into_dataset"])
def test_the_issues_yaml_is_refused_before_its_pickle_is_read(tmp_path, target):
    """A function defined in detectron2.data (an allowed module before) that pickle.loads a
    path from the config: tools/visualize.py refuses the YAML and the pickle never runs."""
    from revcolv2_d2 import visualization

    marker = tmp_path / "MARKER"
    evil = _evil_pickle(tmp_path / "evil.pkl", marker)
    config = tmp_path / "evil.yaml"
    config.write_text(f"model: {{_target_: {target}, dataset_dicts: [], proposal_file: {evil}}}\n"
                      f"train: {{output_dir: {tmp_path / 'out'}, device: cpu, init_checkpoint: ''}}\n")
    image = tmp_path / "x.png"
    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(UnsafeConfigError, match=f"model._target_ is '{target}'"):
        visualization.main(["--config-file", str(config), "--input", str(image), "--output", str(tmp_path / "v")])
    assert not marker.exists()


@pytest.mark.parametrize("target, argument", [
    ("detectron2.data.get_detection_dataset_dicts", "proposal_files: [evil.pkl]"),
    ("detectron2.data.build_detection_test_loader", "cfg: {MODEL: {LOAD_PROPOSALS: true}}"),
    ("revcolv2_d2.data.loader.build_train_loader", "cfg: {}"),
    ("revcolv2_d2.backbone.RevColV2Backbone", "pretrained: true"),
    ("revcolv2_d2.backbone.RevColV2Backbone", "pretrained_cfg_overlay: {file: evil.pth}"),
])
def test_an_argument_that_reads_a_file_or_a_detectron2_config_is_refused(tmp_path, target, argument):
    config = tmp_path / "evil.yaml"
    config.write_text(f"dataloader:\n  test: {{_target_: {target}, {argument}}}\n")
    name = argument.split(":")[0]
    with pytest.raises(UnsafeConfigError, match=f"dataloader.test._target_ is '{target}' with the argument '{name}'"):
        load_lazy_config(str(config))


def test_a_name_outside_the_list_is_refused_without_importing_it(tmp_path):
    import sys

    config = tmp_path / "evil.yaml"
    config.write_text("model: {_target_: this.d}\n")  # importing `this` prints the Zen of Python
    had = "this" in sys.modules
    with pytest.raises(UnsafeConfigError, match="not one of the callables a YAML config may name"):
        load_lazy_config(str(config))
    assert ("this" in sys.modules) == had


def test_every_allowed_callable_is_named_as_defined_with_its_reason():
    """A typo or a moved class in the list fails here, not in a user's config."""
    from detectron2.utils.registry import locate

    from revcolv2_d2.safe_config import ALLOWED_TARGETS, FORBIDDEN_ARGUMENTS

    for name, why in ALLOWED_TARGETS.items():
        obj = locate(name)
        assert f"{obj.__module__}.{obj.__qualname__}" == name, name
        assert len(why) > 30, name
    for name, arguments in FORBIDDEN_ARGUMENTS.items():
        params = __import__("inspect").signature(locate(name)).parameters
        assert name in ALLOWED_TARGETS and arguments, name
        assert all(a in params or any(p.kind == p.VAR_KEYWORD for p in params.values()) for a in arguments), name


def test_operations_md_lists_every_allowed_callable():
    from revcolv2_d2.safe_config import ALLOWED_TARGETS

    with open(os.path.join(ROOT, "docs", "OPERATIONS.md")) as f:
        text = f.read()
    missing = [name for name in ALLOWED_TARGETS if f"`{name}`" not in text]
    assert not missing, missing
