"""The entry points are thin, share one parser and one ``build_model``, one autocast rule,
and nothing edits ``sys.path``."""
import ast
import re
from pathlib import Path

import pytest
import torch

from revcolv2.amp import autocast
from revcolv2.cli.common import build_model, training_parser
from revcolv2.config import load_config

REPO = Path(__file__).resolve().parents[1]
TRAINING_TOOLS = {"pretrain": "revcolv2.cli.pretrain", "finetune": "revcolv2.cli.finetune",
                  "linear_probe": "revcolv2.cli.linear_probe",
                  "lazyconfig_train_net": "revcolv2_d2.train_net", "demo": "revcolv2_d2.demo"}


# the detectron2 entry points filter the warnings known to be harmless before importing it
D2_TOOLS = ("lazyconfig_train_net", "demo", "visualize")


@pytest.mark.parametrize("tool", sorted(TRAINING_TOOLS))
def test_tool_is_a_docstring_an_import_and_main(tool):
    tree = ast.parse((REPO / "tools" / f"{tool}.py").read_text())
    assert ast.get_docstring(tree)
    imports = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    first = ["revcolv2_d2.known_warnings"] if tool in D2_TOOLS else []
    assert [n.module for n in imports] == first + [TRAINING_TOOLS[tool]]
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign))]
    assert not defs, f"tools/{tool}.py defines {[getattr(d, 'name', '=') for d in defs]}: belongs in the package"


def test_nothing_edits_sys_path():
    pattern = re.compile(r"sys\.path\.(insert|append|extend)\(|sys\.path\s*=|sys\.path\s*\+=")
    found = []
    for folder in ("revcolv2", "revcolv2_bench", "projects", "tools", "tests"):
        for path in (REPO / folder).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and "pattern" not in line:
                    found.append(f"{path.relative_to(REPO)}:{i}")
    assert not found, found


def test_autocast_is_bf16_on_cuda_only_unless_asked():
    x = torch.randn(4, 4)
    with autocast("cpu", "bf16"):
        assert (x @ x).dtype == torch.float32  # CPU: no-op by default
    with autocast("cpu", "bf16", cuda_only=False):
        assert (x @ x).dtype == torch.bfloat16
    for off in (None, "off", "fp32"):
        with autocast("cpu", off, cuda_only=False):
            assert (x @ x).dtype == torch.float32


def test_one_parser_with_the_classification_options_where_they_apply():
    pre = training_parser("d", "pretrain").parse_args(["--config", "c.yaml"])
    assert not hasattr(pre, "finetune") and not hasattr(pre, "eval")
    ft = training_parser("d", "finetune").parse_args(["--config", "c.yaml", "--finetune", "m.pth", "--eval"])
    assert ft.finetune == "m.pth" and ft.eval and ft.resume is None and ft.opts == []
    with pytest.raises(SystemExit):
        training_parser("d", "linear_probe").parse_args(["--config", "c.yaml", "--batch-per-gpu", "0"])
    with pytest.raises(ValueError, match="task must be one of"):
        training_parser("d", "train")


@pytest.mark.parametrize("task", ["pretrain", "finetune", "linear_probe"])
def test_help_names_an_example_config_that_exists(task):
    text = training_parser("d", task).format_help()
    named = re.findall(r"configs/\S+?\.yaml", text)
    assert named and all((REPO / path).is_file() for path in named), named


@pytest.mark.parametrize("tool", D2_TOOLS)
def test_detectron2_tools_filter_the_known_warnings_before_importing_detectron2(tool):
    """The filter call comes right after its import, before the import that brings in detectron2."""
    body = [n for n in ast.parse((REPO / "tools" / f"{tool}.py").read_text()).body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # the docstring
    calls = [i for i, n in enumerate(body) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", "") == "ignore_known_harmless_warnings"]
    package = [i for i, n in enumerate(body) if isinstance(n, ast.ImportFrom) and n.module.startswith("revcolv2_d2.")
               and n.module != "revcolv2_d2.known_warnings"]
    assert calls and package and calls[0] < package[0]


def test_build_model_follows_the_recipe():
    probe = build_model(load_config(REPO / "configs" / "linear_probe" / "revcolv2_tiny_demo.yaml"), "linear_probe")
    assert probe.num_classes == 0 and not probe.reversible
    cfg = load_config(REPO / "configs" / "finetune" / "revcolv2_tiny_demo.yaml")
    clf = build_model(cfg, "finetune", num_classes=7)
    assert clf.num_classes == 7 and clf.reversible == cfg["model"]["reversible"]
    mim = build_model(load_config(REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"), "pretrain")
    assert hasattr(mim, "mask_token")
    with pytest.raises(ValueError, match="task must be one of"):
        build_model(cfg, "detect")
