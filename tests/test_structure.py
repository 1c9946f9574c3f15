"""The package's structure as a user meets it: ``import revcolv2`` (what a timm user does to
register the presets) loads the model side only, and importing any module of the project
changes nothing in detectron2, timm or torch."""
import ast
import os
import subprocess
import sys
from typing import Iterator, List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("revcolv2", os.path.join("projects", "RevColV2", "revcolv2_d2"), "tools")
OTHER_LIBRARIES = ("detectron2", "timm", "torch")


@pytest.mark.slow  # a fresh interpreter importing torch and timm: about 6 s
def test_import_revcolv2_registers_the_presets_without_the_run_folder_or_detectron2():
    # torch and timm first: the standard library's subprocess, which torch imports, imports
    # fcntl on POSIX; after dropping it from sys.modules, only our import could bring it back
    code = ("import sys, torch, timm\n"
            "sys.modules.pop('fcntl', None)\n"
            "import revcolv2\n"
            "assert 'revcolv2_tiny' in timm.list_models('revcolv2*'), timm.list_models('revcolv2*')\n"
            "print(sorted(m for m in ('fcntl', 'detectron2', 'revcolv2.run_dir') if m in sys.modules))\n")
    assert _python(code) == "[]"


def _python(code: str) -> str:
    """The last line that ``code`` prints, run in a fresh interpreter on this checkout."""
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "projects", "RevColV2"), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- no monkeypatching
def _import_time_nodes(body: List[ast.stmt]) -> Iterator[ast.AST]:
    """Every node that runs when the module is imported: module-level statements, also inside
    if / try / with / loops and class bodies, but not the bodies of functions and lambdas."""
    stack = list(body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(node.decorator_list)  # decorators run at import; the body does not
            stack.extend(d for d in node.args.defaults + node.args.kw_defaults if d is not None)
            continue
        if isinstance(node, ast.Lambda):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _library_names(nodes: List[ast.AST]) -> Set[str]:
    """The names that imports of detectron2, timm or torch bind (``import torch.nn as nn``,
    ``from detectron2.data import build``, ``import detectron2.data.build``: ``detectron2``)."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OTHER_LIBRARIES:
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in OTHER_LIBRARIES:
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root(node: ast.AST) -> Tuple[str, bool]:
    """(the name an attribute / item chain starts from, whether the chain has an attribute)."""
    attribute = False
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        attribute = attribute or isinstance(node, ast.Attribute)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else ""), attribute


def library_patches(source: str, filename: str = "<source>") -> List[str]:
    """``file:line: statement`` of every import-time assignment to (or deletion of) an
    attribute of detectron2, timm or torch, and every ``setattr`` / ``delattr`` on one."""
    nodes = list(_import_time_nodes(ast.parse(source, filename).body))
    libraries = _library_names(nodes)
    found = []
    for node in nodes:
        targets: List[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("setattr", "delattr") and node.args):
            root, _ = _root(node.args[0])
            if root in libraries:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
            continue
        flat = []
        while targets:
            t = targets.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                targets.extend(t.elts)
            elif isinstance(t, ast.Starred):
                targets.append(t.value)
            else:
                flat.append(t)
        for t in flat:
            root, attribute = _root(t)
            if attribute and root in libraries:
                found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def _project_modules() -> List[str]:
    out = []
    for top in SCANNED:
        for folder, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            out += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(out)


def test_the_scan_finds_the_kinds_of_patch_it_looks_for():
    source = ("import detectron2.data.build as d2_build\nimport torch\nfrom timm import layers\n"
              "import numpy as np\n"
              "d2_build.worker_init_reset_seed = print\n"
              "torch.backends.cudnn.benchmark = True\n"
              "setattr(layers, 'x', 1)\n"
              "if True:\n    torch.save, x = print, 2\n"
              "np.seterr = print\n"          # not one of the three libraries
              "def f():\n    torch.y = 1\n"  # not at import time
              "torch_alias = torch\n")       # binds a name, changes nothing
    found = library_patches(source)
    assert [line.split(": ", 1)[1] for line in sorted(found, key=lambda s: int(s.split(":")[1]))] == [
        "d2_build.worker_init_reset_seed = print", "torch.backends.cudnn.benchmark = True",
        "setattr(layers, 'x', 1)", "torch.save, x = (print, 2)"], found


def test_no_module_of_the_project_patches_detectron2_timm_or_torch_when_imported():
    modules = _project_modules()
    assert any(m.endswith(os.path.join("revcolv2_d2", "train_net.py")) for m in modules) and len(modules) > 40
    found = []
    for path in modules:
        with open(path) as f:
            found += library_patches(f.read(), os.path.relpath(path, ROOT))
    assert not found, "\n".join(found)


@pytest.mark.slow  # a fresh interpreter imports torch and detectron2 (seconds each)
@pytest.mark.parametrize("module", ["revcolv2_d2.train_net", "revcolv2_d2.data.loader"])
def test_importing_the_detectron2_project_leaves_detectron2_s_loader_as_it_was(module):
    code = ("import detectron2.data.build as b\n"
            "before = {k: v for k, v in vars(b).items()}\n"
            f"import {module}\n"
            "changed = sorted(k for k, v in vars(b).items() if before.get(k, object()) is not v)\n"
            "print(changed)\n")
    assert _python(code) == "[]"
