"""revcolv2_d2.safe_config, word for word: each way a YAML config can name a callable
(a full name, a package alias, a name through an allowed module, an allowed name's leaf under
another package, a bare leaf, a non-string, a name that resolves to something else) is
refused with the whole message naming the file, the key and the target; the ShapeSpec tag
takes only optional integers; a file that is not YAML or not a mapping is named; and the
loaded config takes the objects detectron2's would (train_net assigns the model into it).

The first mutmut run of safe_config.py found these unpinned: the refusals were matched by a
fragment that a renamed key prefix or a rewritten reason still contained."""
import os
import sys

import pytest
import torch
from d2_helpers import ROOT

from revcolv2_d2 import safe_config
from revcolv2_d2.safe_config import UnsafeConfigError, load_lazy_config

ALLOWED = ("A YAML config may instantiate only the classes and functions of "
           "revcolv2_d2.safe_config.ALLOWED_TARGETS (listed, each with why it is safe, in docs/OPERATIONS.md); "
           "write a .py config (code you review) for anything else")
NOT_LISTED = "not one of the callables a YAML config may name"


def refusal(path, key, target, why):
    return f"refusing to load {path}: {key} is {target!r}, {why}. {ALLOWED}"


def refused(tmp_path, text):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(UnsafeConfigError) as e:
        load_lazy_config(str(config))
    return str(config), str(e.value)


def test_the_refusal_points_at_a_list_and_a_document_that_exist():
    assert isinstance(safe_config.ALLOWED_TARGETS, dict) and safe_config.ALLOWED_TARGETS
    assert os.path.isfile(os.path.join(ROOT, "docs", "OPERATIONS.md"))


# ----------------------------------------------------------------------------- names refused unresolved
@pytest.mark.parametrize("target", [
    "os.system",  # a full name outside the list
    "detectron2.data.load_proposals_into_dataset",  # an alias, in an allowed package, of a refused function
    "revcolv2_d2.backbone.torch.hub.load",  # through an allowed module to another package
    "Linear",  # an allowed callable's bare leaf
    "system",
])
def test_a_name_off_the_list_is_refused_whole_message(tmp_path, target):
    path, msg = refused(tmp_path, f"model:\n  _target_: {target}\n  _args_: [id]\n")
    assert msg == refusal(path, "model._target_", target, NOT_LISTED)


@pytest.mark.parametrize("target", ["this.Linear", "this.SGD", "this.FPN"])
def test_an_allowed_leaf_under_another_package_is_refused_unimported(tmp_path, monkeypatch, target):
    """``package.Name`` passes only where an allowed name is ``package.....Name``: an allowed
    callable's name under any other package is refused before that package is imported
    (importing ``this`` prints the Zen of Python)."""
    monkeypatch.delitem(sys.modules, "this", raising=False)
    path, msg = refused(tmp_path, f"a: {{b: [{{_target_: {target}}}]}}\n")
    assert msg == refusal(path, "a.b.0._target_", target, NOT_LISTED)
    assert "this" not in sys.modules


@pytest.mark.parametrize("value, shown", [("3", 3), ("[os, system]", ["os", "system"]), ("{a: os.system}",
                                                                                          {"a": "os.system"}),
                                          ("null", None)])
def test_a_target_that_is_not_a_string_is_refused(tmp_path, value, shown):
    path, msg = refused(tmp_path, f"_target_: {value}\n")
    assert msg == refusal(path, "_target_", shown, "not a dotted name")


def test_a_name_on_the_way_to_an_allowed_callable_that_does_not_exist_is_refused(tmp_path):
    """``detectron2.modeling.RPN`` passes the name check (``...proposal_generator.rpn.RPN`` is
    allowed) but detectron2.modeling does not export it."""
    path, msg = refused(tmp_path, "model: {_target_: detectron2.modeling.RPN}\n")
    start = refusal(path, "model._target_", "detectron2.modeling.RPN",
                    "which cannot be found (ImportError: Error loading 'detectron2.modeling.RPN'").split(". A YAML")[0]
    assert msg.startswith(start) and msg.endswith(f"). {ALLOWED}"), msg
    assert "\n" not in msg  # one line: hydra's error spans several


# ----------------------------------------------------------------------------- names resolved to something else
def _other_function():
    from subprocess import run

    return run, "subprocess.run"


def _instance_of_an_allowed_class():
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    # its class is allowed, the object is not a class: instantiate would call the instance
    return LastLevelMaxPool(), "an instance of detectron2.modeling.backbone.fpn.LastLevelMaxPool"


@pytest.mark.parametrize("make", [_other_function, _instance_of_an_allowed_class])
def test_an_alias_that_resolves_to_another_object_is_refused(tmp_path, monkeypatch, make):
    """The name is resolved and the object's own name compared with the list: a package that
    exports something else under an allowed callable's name (a future version, a re-export)
    does not pass because ``detectron2.modeling.FPN`` looks like the allowed FPN's alias."""
    import detectron2.modeling

    obj, name = make()
    monkeypatch.setattr(detectron2.modeling, "FPN", obj)
    path, msg = refused(tmp_path, "model: {_target_: detectron2.modeling.FPN}\n")
    assert msg == refusal(path, "model._target_", "detectron2.modeling.FPN", f"which is {name}, {NOT_LISTED}")


def test_an_alias_that_resolves_to_a_module_is_refused(tmp_path, monkeypatch):
    """A module (a package whose submodule bears the callable's name) has no ``__module__``:
    still the one-line refusal, not an AttributeError."""
    import detectron2.modeling
    import detectron2.modeling.backbone.fpn as fpn_module

    monkeypatch.setattr(detectron2.modeling, "FPN", fpn_module)
    path, msg = refused(tmp_path, "model: {_target_: detectron2.modeling.FPN}\n")
    assert msg == refusal(path, "model._target_", "detectron2.modeling.FPN",
                          f"which is the module detectron2.modeling.backbone.fpn, {NOT_LISTED}")


# ----------------------------------------------------------------------------- the ShapeSpec tag
SHAPE_SPEC = "!!python/object:detectron2.layers.shape_spec.ShapeSpec"


def test_a_shape_spec_of_optional_integers_loads(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(f"shape: {SHAPE_SPEC} {{channels: 8, stride: 4}}\n")
    shape = load_lazy_config(str(config)).shape
    assert (shape.channels, shape.height, shape.width, shape.stride) == (8, None, None, 4)


@pytest.mark.parametrize("fields, shown", [
    ("{channels: 8, code: 2}", {"channels": 8, "code": 2}),  # an unknown field, integer-valued
    ("{channels: '8'}", {"channels": "8"}),  # a known field, not an integer
    ("{channels: true}", {"channels": True}),  # a bool is no integer here
    ("{channels: 1.5}", {"channels": 1.5}),
    ("{channels: [1, 2]}", {"channels": [1, 2]}),  # shown as written: the mapping is read whole
    ("{stride: {a: 1}}", {"stride": {"a": 1}}),
])
def test_a_shape_spec_holds_only_optional_integers(tmp_path, fields, shown):
    path, msg = refused(tmp_path, f"# a comment\nshape: {SHAPE_SPEC} {fields}\n")
    assert msg == (f"refusing to load {path}: a YAML config may hold only plain data, but line 2 asks for a Python "
                   f"object (a ShapeSpec holds optional integers ['channels', 'height', 'stride', 'width'], not "
                   f"{shown!r}). Loading it with detectron2's yaml.unsafe_load could run arbitrary code")


def test_another_python_tag_is_refused_in_one_line(tmp_path):
    path, msg = refused(tmp_path, "a: 1\nb: 2\nmodel: !!python/object/apply:os.system [id]\n")
    assert msg == (f"refusing to load {path}: a YAML config may hold only plain data, but line 3 asks for a Python "
                   "object (could not determine a constructor for the tag "
                   "'tag:yaml.org,2002:python/object/apply:os.system'). Loading it with detectron2's "
                   "yaml.unsafe_load could run arbitrary code")


# ----------------------------------------------------------------------------- not YAML, not a mapping
def test_a_file_that_is_not_yaml_is_named(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model: [1, 2\n")
    with pytest.raises(ValueError) as e:
        load_lazy_config(str(config))
    assert type(e.value) is ValueError  # bad syntax, not an unsafe config
    assert str(e.value).startswith(f"{config} is not valid YAML: while parsing a flow sequence"), str(e.value)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just text\n", "str"), ("3\n", "int")])
def test_a_yaml_file_that_is_not_a_mapping_is_named(tmp_path, text, kind):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ValueError) as e:
        load_lazy_config(str(config))
    assert str(e.value) == f"{config} holds a {kind}, not a config (a mapping of keys)"


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_yaml_file_is_called_empty(tmp_path, text):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ValueError) as e:
        load_lazy_config(str(config))
    assert str(e.value) == f"{config} is empty, not a config (a mapping of keys)"


# ----------------------------------------------------------------------------- what the loaded config takes
def test_the_loaded_config_takes_the_model_as_train_net_gives_it(tmp_path):
    """train_net sets ``cfg.optimizer.params.model = model`` before instantiating the optimizer,
    as detectron2's lazyconfig_train_net does: a config loaded from YAML must take an object,
    as detectron2's ``LazyConfig.load`` makes it (``allow_objects``)."""
    from detectron2.config import instantiate

    config = tmp_path / "config.yaml"
    config.write_text("optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.1\n"
                      "  params: {_target_: detectron2.solver.get_default_optimizer_params, weight_decay_norm: 0.0}\n")
    cfg = load_lazy_config(str(config))
    model = torch.nn.Linear(3, 2)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.SGD)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 2 and {id(p) for p in params} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("problem, shown", [("a problem", "a problem"), (None, "")])
def test_a_constructor_error_without_a_mark_or_problem_is_still_one_line(tmp_path, monkeypatch, problem, shown):
    """Every ConstructorError the SafeLoader raises marks its node and says its problem; one
    without (PyYAML's FullConstructor has such a raise) still gives the refusal, not an
    AttributeError from reading the missing mark or problem."""
    import yaml

    def load(stream, Loader):  # noqa: N803 - yaml.load's own argument name
        raise yaml.constructor.ConstructorError(None, None, problem, None)

    monkeypatch.setattr(yaml, "load", load)
    path, msg = refused(tmp_path, "a: 1\n")
    assert msg == (f"refusing to load {path}: a YAML config may hold only plain data, but it asks for a Python "
                   f"object ({shown}). Loading it with detectron2's yaml.unsafe_load could run arbitrary code")
