"""Change every value of the recipe files and detectron2 configs, one at a time, and check
that a test fails for each.

    .venv/bin/python tests/mutations/config_values.py                 # all 580 changes (about 15 minutes)
    .venv/bin/python tests/mutations/config_values.py --filter _table1.yaml --list
    .venv/bin/python tests/mutations/config_values.py --tests tests/test_recipes.py tests/test_coco_configs.py

Every value of ``configs/**/*.yaml`` (each list item on its own) and every literal of
``projects/RevColV2/configs/**/*.py`` (numbers, booleans, strings; the docstring excepted)
is changed to a plausible other value: a number halved or doubled (0 becomes 0.5) or an
integer plus one, a boolean flipped, a name swapped for its sibling (``RGB`` / ``BGR``,
``slide`` / ``whole``, ``revcolv2_base`` / ``revcolv2_large``, ...), any other string
suffixed. The tests (default: ``tests/test_config_values.py``) run in this process against
a scratch copy of the working tree (as ``sweep.py`` makes it), once per change; test modules
are imported afresh each time. Prints every change that no test caught; exit status 1 if
any.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator, List, Tuple

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

SWAP = {"RGB": "BGR", "BGR": "RGB", "slide": "whole", "whole": "slide", "choice": "range", "range": "choice",
        "LN": "BN", "BN": "LN", "SyncBN": "BN", "absolute": "relative", "bf16": "fp16", "fp16": "bf16",
        "cpu": "cuda", "revcolv2_base": "revcolv2_large", "revcolv2_large": "revcolv2_base",
        "revcolv2_tiny": "revcolv2_base", "bicubic": "bilinear", "td2": "td1"}


def changed(value):
    """A plausible other value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1 if value else 1
    if isinstance(value, float):
        return 0.5 if value == 0 else value / 2 if 0 < value <= 1 else value * 2
    if isinstance(value, str):
        if value in SWAP:
            return SWAP[value]
        number = re.search(r"\d+(\.\d+)?", value)  # rand-m9-mstd0.5-inc1 -> rand-m10-mstd0.5-inc1
        if number and not value.startswith("$"):
            text = number.group(0)
            new = str(int(text) + 1) if "." not in text else str(float(text) * 2)
            return value[:number.start()] + new + value[number.end():]
        return value + "_x"
    if value is None:
        return 0.5
    raise TypeError(f"no change defined for {value!r}")


def _yaml_text(value) -> str:
    return "null" if value is None else ("true" if value else "false") if isinstance(value, bool) else (
        value if isinstance(value, str) else repr(value))


def yaml_changes(path: Path) -> Iterator[Tuple[str, str]]:
    """(description, new file text) for every value line (each list item on its own)."""
    lines = path.read_text().split("\n")
    stack: List[Tuple[int, str]] = []
    for i, raw in enumerate(lines):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", raw)
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
        value, hash_, comment = rest.partition(" #")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not value.strip():
            stack.append((indent, key))
            continue
        if key == "_base_":
            continue
        dotted = ".".join([k for _, k in stack] + [key])
        parsed = yaml.safe_load(value)
        if isinstance(parsed, dict):
            options = [(f"{dotted}: {value.strip()} -> {{embed_dim: 8}}", "{embed_dim: 8}")]
        elif isinstance(parsed, list):
            options = []
            for j, item in enumerate(parsed):
                new = [changed(x) if k == j else x for k, x in enumerate(parsed)]
                text = "[" + ", ".join(_yaml_text(x) for x in new) + "]"
                options.append((f"{dotted}[{j}]: {value.strip()} -> {text}", text))
        else:
            text = _yaml_text(changed(parsed))
            options = [(f"{dotted}: {value.strip()} -> {text}", text)]
        for description, text in options:
            out = list(lines)
            out[i] = f"{m.group(1)}{key}: {text}" + (f"  {hash_.strip()}{comment}" if hash_ else "")
            yield description, "\n".join(out)


def python_changes(path: Path) -> Iterator[Tuple[str, str]]:
    """(description, new file text) for every literal but the module docstring."""
    src = path.read_text()
    tree = ast.parse(src)
    doc = tree.body[0].value if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(
        tree.body[0].value, ast.Constant) else None
    starts = [0]
    for line in src.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    for node in ast.walk(tree):
        if node is doc or not isinstance(node, ast.Constant) or isinstance(node.value, (bytes, type(...))):
            continue
        a = starts[node.lineno - 1] + node.col_offset
        b = starts[node.end_lineno - 1] + node.end_col_offset
        old, new = src[a:b], changed(node.value)
        text = repr(new) if not isinstance(new, str) else (old[0] + new + old[0] if old[0] in "'\"" else repr(new))
        yield f"line {node.lineno}: {old} -> {text}", src[:a] + text + src[b:]


def all_changes(root: Path) -> Iterator[Tuple[str, str, str]]:
    """(file relative to root, description, new text) of every config value."""
    files = sorted(root.glob("configs/**/*.yaml")) + sorted(
        p for p in root.glob("projects/RevColV2/configs/**/*.py") if p.name != "__init__.py")
    for path in files:
        changes = yaml_changes(path) if path.suffix == ".yaml" else python_changes(path)
        for description, text in changes:
            yield str(path.relative_to(root)), description, text


def _scratch_copy(dest: Path) -> None:
    spec = importlib.util.spec_from_file_location("mutation_sweep", HERE / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    sweep.scratch_copy(REPO, dest)


def _run(copy: Path, tests: List[str]) -> Tuple[bool, str]:
    """Run ``tests`` in this process against ``copy``; (failed, first failing test)."""
    import pytest

    for name in [m for m in sys.modules if m.startswith("test_") or m in ("conftest", "d2_helpers",
                                                                          "training_helpers")]:
        del sys.modules[name]  # fresh test modules: no cache survives from the previous change
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = pytest.main(["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-W", "ignore",
                          *[str(copy / t) for t in tests]])
    first = next((ln for ln in out.getvalue().splitlines() if ln.startswith(("FAILED", "ERROR"))), "")
    return rc != 0, first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", nargs="+", default=["tests/test_config_values.py"], help="test files to run")
    ap.add_argument("--filter", default="", help="only the config files whose path contains this")
    ap.add_argument("--list", action="store_true", help="list the changes and exit")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="config-values-") as tmp:
        copy = Path(tmp)
        _scratch_copy(copy)
        changes = [c for c in all_changes(copy) if args.filter in c[0]]
        if args.list:
            for rel, description, _ in changes:
                print(f"{rel}: {description}")
            return 0
        os.chdir(copy)
        sys.path[:0] = [str(copy), str(copy / "projects" / "RevColV2"), str(copy / "tests")]
        failed, first = _run(copy, args.tests)
        if failed:
            raise SystemExit(f"the tests fail on the unchanged copy: {first}")
        survived = []
        for n, (rel, description, text) in enumerate(changes, 1):
            path = copy / rel
            original = path.read_text()
            path.write_text(text)
            try:
                caught, first = _run(copy, args.tests)
            finally:
                path.write_text(original)
            print(f"[{n}/{len(changes)}] {rel}: {description}: {'caught' if caught else 'SURVIVED'} {first}",
                  flush=True)
            if not caught:
                survived.append(f"{rel}: {description}")
    print(f"\n{len(changes) - len(survived)} of {len(changes)} changes caught")
    for line in survived:
        print("survived:", line)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
