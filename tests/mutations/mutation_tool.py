"""Mutation testing with a real mutation tool (mutmut 3.8.1): one module at a time, against the
tests that cover it.

    .venv/bin/python tests/mutations/mutation_tool.py --list                 # the table below
    .venv/bin/python tests/mutations/mutation_tool.py revcolv2/layers.py     # one module: killed / survived / timeout
    .venv/bin/python tests/mutations/mutation_tool.py revcolv2/model.py::Block --max-children 2
    .venv/bin/python tests/mutations/mutation_tool.py revcolv2/layers.py --mutants 'revcolv2.layers.x_residual_add*'
    .venv/bin/python tests/mutations/mutation_tool.py revcolv2/layers.py --markdown   # the row of docs/TESTING.md

mutmut rewrites every function of the module into a "trampoline" that calls the original or
one of its mutants (an operator swapped, a number plus one, a string changed, an argument
dropped or replaced by None, ...), chosen by the environment variable ``MUTANT_UNDER_TEST``.
It first runs the selected tests once, recording which test calls which function; then, for
each mutant, it forks a worker that runs only the tests calling the mutated function, with
``-x`` (stop at the first failure). A mutant is *killed* when a test fails, *survived* when
they all pass, *timeout* when they run past the per-mutant limit (below).

This script makes that fit a 2-core machine and this layout:

- ``TARGETS`` names, per module, the test files (or ids) mutmut may run: those that exercise
  it, unit tests only (``-m "not slow"``, which drops a slow test even when named by id) unless
  the row sets ``slow=True`` (then it names the fast tests of files that also hold slow ones). mutmut
  then narrows them per mutant to the tests that call the mutated function.
- The run happens in a scratch copy of the working tree (tracked and untracked, not ignored,
  files, as ``sweep.py`` makes it) with ``[tool.mutmut]`` written into the copy's
  ``pyproject.toml``: the checkout's own files are never touched. ``--keep`` keeps the copy
  (``mutmut show <name>`` / ``mutmut results`` work there).
- Per-mutant timeout: mutmut gives each worker a CPU-time limit of
  ``(t + timeout_constant) * timeout_multiplier * 2`` seconds, ``t`` the covering tests'
  measured time, and half of that in wall-clock time; here ``timeout_constant = 10``,
  ``timeout_multiplier = 5`` (a busy shared machine runs a test several times slower than
  the measurement did).
- ``PYTHONPATH`` puts the copy's mutated tree first, so that subprocesses started by a test
  import the mutated code too. The trampolines record which test calls which function only
  in mutmut's own process, though: a module exercised only by subprocess tests needs an
  in-process test for mutmut to run anything against it.
- The detectron2 project's modules live under ``projects/RevColV2/`` but are imported as
  ``revcolv2_d2.*``; mutmut derives a module's name from its path, so the script strips the
  ``projects.RevColV2.`` prefix from mutmut's names (``_LAUNCHER``).
- Tests that cannot run under trampolines are deselected with their reason (``DESELECT``):
  ``torch.jit.script`` compiles a module's ``forward`` from its source, and a trampoline is a
  ``*args, **kwargs`` wrapper TorchScript cannot compile; ``torch.compile(fullgraph=True)``
  cannot trace the trampoline's environment lookup; a test that scans the source text for
  unsafe loads finds them in the mutants' text (the mutated file holds all of them).

Mutation runs are not part of ``make test``: ``tests/test_mutation_sweep.py`` only checks
that every module and every test named here exists. Results: docs/TESTING.md, "Mutation
tool".
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MUTMUT_VERSION = "3.8.1"


@dataclass(frozen=True)
class Target:
    file: str  # the module mutated, relative to the repository
    tests: Tuple[str, ...]  # test files or ids (pytest's syntax) mutmut may run against it
    functions: Tuple[str, ...] = ()  # only these functions (mutmut's names: x_f, xǁClassǁmethod; globs)
    slow: bool = False  # also the slow tests of ``tests`` (default: ``-m "not slow"``)
    pending: str = ""  # why the full run waits (the module is being changed elsewhere)
    label: str = ""  # the row's name when it is not the file's (a class of a module)

    @property
    def name(self) -> str:
        return self.label or self.file

    @property
    def module(self) -> str:
        name = self.file[:-3].replace("/", ".")
        return name[len("projects.RevColV2."):] if name.startswith("projects.RevColV2.") else name

    def mutant_globs(self) -> List[str]:
        return [f"{self.module}.{f}__mutmut_*" for f in self.functions]


# tests whose subject TorchScript / fullgraph torch.compile cannot see through a trampoline
DESELECT = {
    "tests/test_timm_contract.py::test_torchscript": "torch.jit.script compiles forward from its source",
    "tests/test_engine_compile.py::test_compiled_levels_give_eager_gradients_without_graph_breaks":
        "fullgraph torch.compile of a level stops at the trampoline",
    "tests/test_reference_formulas.py::test_scripted_residual_add_is_the_formula":
        "torch.jit.script compiles residual_add from its source",
    # a source scan: mutmut's mutated file holds every mutant's text, weights_only=False among them
    "tests/test_security.py::test_no_code_loads_a_file_unsafely": "scans the source text, which holds every mutant",
}

ENGINE_TESTS = (
    "tests/test_reference_formulas.py", "tests/test_bf16_exact.py", "tests/test_engine_grads.py",
    "tests/test_engine_buffer.py",
    "tests/test_reversible.py", "tests/test_engine_layout.py", "tests/test_execution_order.py",
    "tests/test_mim.py", "tests/test_paper_statements.py", "tests/test_non_square_grids.py", "tests/test_model.py",
    "tests/test_timm_contract.py",
)

TARGETS: Dict[str, Target] = {t.name: t for t in [
    Target("revcolv2/reversible.py", ENGINE_TESTS),
    Target("revcolv2/layers.py", ENGINE_TESTS + ("tests/test_layers.py", "tests/test_d2_backbone.py")),
    Target("revcolv2/model.py", ENGINE_TESTS, functions=("xǁBlockǁ*",), label="revcolv2/model.py::Block"),
    # the launchers' subprocess runs (test_exit_codes.py, slow) cannot report trampoline hits: the in-process tests
    Target("revcolv2/cli/torchrun.py", ("tests/test_signals.py",)),
    Target("revcolv2/signals.py", ("tests/test_signals.py",),
           functions=("x_stop_signal_of", "x_exit_launcher", "x_end_launcher"),
           label="revcolv2/signals.py::launcher exits"),
    Target("revcolv2/checkpoint.py", (
        "tests/test_checkpoint_messages.py", "tests/test_checkpoint.py", "tests/test_checkpoint_rule.py",
        "tests/test_checkpoint_files.py",
        "tests/test_safe_loaders.py", "tests/test_security.py", "tests/test_legacy_checkpoints.py",
        "tests/test_export.py", "tests/test_d2_backbone.py")),
    Target("projects/RevColV2/revcolv2_d2/safe_config.py", (
        "tests/test_safe_config_refusals.py", "tests/test_security.py", "tests/test_safe_loaders.py",
        "tests/test_yaml_config.py", "tests/test_d2_entry_points.py", "tests/test_override_types.py")),
    # slow=True for test_export_onnx.py (in-process ONNX exports of a tiny model, seconds each; -m "not slow"
    # would deselect them even by id): the other files' slow tests (subprocesses, 30 s exports) are left out by
    # naming the fast ones
    Target("revcolv2/export.py", (
        "tests/test_export_messages.py", "tests/test_export_onnx.py",
        "tests/test_export.py::test_fine_tuned_classifier_keeps_its_head",
        "tests/test_export.py::test_detectron2_checkpoint_exports_its_backbone",
        "tests/test_export.py::test_linear_probe_checkpoint_lists_its_head",
        "tests/test_export.py::test_bad_checkpoints_are_clear_errors",
        "tests/test_export_paths.py::test_an_img_size_the_model_cannot_take_is_one_line_before_exporting",
        "tests/test_export_paths.py::test_no_output_replaces_the_checkpoint",
        "tests/test_safe_loaders.py::test_timm_local_dir_export_loads",
        "tests/test_safe_loaders.py::test_timm_local_dir_refuses_a_pickle_payload",
        "tests/test_safe_loaders.py::test_export_tool_refuses_a_payload_under_each_name"), slow=True),
    Target("projects/RevColV2/revcolv2_d2/data/coco_checks.py", (
        "tests/test_coco_check_messages.py", "tests/test_bad_coco_input.py", "tests/test_coco_annotation_shapes.py",
        "tests/test_custom_datasets.py")),
    Target("revcolv2/atomic_io.py", (
        "tests/test_atomic_io.py", "tests/test_checkpoint_files.py", "tests/test_run_folder.py",
        "tests/test_checkpoint.py", "tests/test_checkpoint_rule.py", "tests/test_resume_rules.py",
        "tests/test_run_folder_links.py")),
]}

# run by mutmut in the scratch copy: mutmut's module names without the detectron2 project's folder
_LAUNCHER = '''import sys
import mutmut.__main__ as mutmut_main
from mutmut.utils import format_utils

_name = format_utils.get_mutant_name


def get_mutant_name(path, method):
    name = _name(path, method)
    return name[len("projects.RevColV2."):] if name.startswith("projects.RevColV2.") else name


mutmut_main.get_mutant_name = get_mutant_name
sys.argv[0] = "mutmut"
sys.exit(mutmut_main.cli())
'''

# what mutmut copies into its tree (everything the tests read)
SOURCE_PATHS = ["revcolv2", "revcolv2_bench", "projects", "tools", "configs"]
ALSO_COPY = ["pytest.ini", "setup.py", "requirements.txt", "docs", "README.md", "Makefile"]


def _toml_list(items: List[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def mutmut_config(target: Target, deselect: List[str]) -> str:
    selection = list(target.tests)
    if not target.slow:
        selection += ["-m", "not slow"]
    for test in deselect:
        selection += ["--deselect", test]
    return "\n".join([
        "",
        "[tool.mutmut]",
        f"source_paths = {_toml_list(SOURCE_PATHS)}",
        f"only_mutate = {_toml_list([target.file])}",
        f"also_copy = {_toml_list(ALSO_COPY)}",
        f"pytest_add_cli_args_test_selection = {_toml_list(selection)}",
        f"pytest_add_cli_args = {_toml_list(['-p', 'no:cacheprovider', '-W', 'ignore'])}",
        'process_isolation = "forkserver"',
        "timeout_multiplier = 5.0",
        "timeout_constant = 10.0",
        "use_git_change_detection = false",
        "",
    ])


def missing(repo: Path, target: Target) -> List[str]:
    """What the row names that does not exist: the module, a test file or test, a function."""
    out = []
    path = repo / target.file
    if not path.is_file():
        return [target.file]
    tree = ast.parse(path.read_text())
    for pattern in target.functions:
        cls = pattern.split("ǁ")[1] if "ǁ" in pattern else None
        name = pattern.split("ǁ")[-1] if cls else pattern[2:]
        scope = tree.body
        if cls:
            node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
            if node is None:
                out.append(f"{target.file}: class {cls}")
                continue
            scope = node.body
        if name != "*" and not any(isinstance(n, ast.FunctionDef) and n.name == name for n in scope):
            out.append(f"{target.file}: {pattern}")
    for test in target.tests:
        file, *names = test.split("[")[0].split("::")
        if not (repo / file).is_file():
            out.append(test)
            continue
        defined = {n.name for n in ast.walk(ast.parse((repo / file).read_text())) if isinstance(n, ast.FunctionDef)}
        out += [test for n in names if n not in defined]
    return out


def deselected(target: Target) -> List[str]:
    """The tests of ``DESELECT`` that the row's test files hold."""
    files = {t.split("::")[0] for t in target.tests}
    return [t for t in DESELECT if t.split("::")[0] in files]


def _scratch_copy(dest: Path) -> None:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         check=True, capture_output=True).stdout.decode()
    for rel in filter(None, out.split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def _mutmut() -> List[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mutmut"]


def parse_results(text: str) -> Dict[str, str]:
    """``mutmut results --all true`` -> {mutant: status}."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(\S+__mutmut_\d+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def mutant_diffs(mutated: Path, names: List[str]) -> Dict[str, str]:
    """{mutant: its changed lines}, read from mutmut's mutated file (each mutant is a copy of
    its function, ``<function>__mutmut_<n>``, beside ``<function>__mutmut_orig``): what
    ``mutmut show`` prints, without a process per mutant."""
    import difflib

    text = mutated.read_text()
    funcs = {n.name: ast.get_source_segment(text, n) for n in ast.walk(ast.parse(text))
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out = {}
    for name in sorted(names, key=lambda n: (n.rsplit("__mutmut_", 1)[0], int(n.rsplit("_", 1)[1]))):
        short = name.rsplit(".", 1)[-1]
        base = short.rsplit("__mutmut_", 1)[0]
        orig, mutant = funcs.get(base + "__mutmut_orig"), funcs.get(short)
        if orig is None or mutant is None:
            out[name] = "(source not found)"
            continue
        mutant = mutant.replace(short, base + "__mutmut_orig", 1)  # the def line differs by the name only
        lines = difflib.unified_diff(orig.splitlines(), mutant.splitlines(), lineterm="", n=0)
        out[name] = "\n".join(line for line in lines if line[:1] in "-+" and not line.startswith(("---", "+++")))
    return out


def check_mutmut() -> None:
    """The results in docs/TESTING.md are mutmut 3.8.1's: another version mutates differently."""
    try:
        from importlib.metadata import version

        found = version("mutmut")
    except Exception:  # PackageNotFoundError
        raise SystemExit(f"mutmut is not installed: pip install mutmut=={MUTMUT_VERSION}") from None
    if found != MUTMUT_VERSION:
        raise SystemExit(f"mutmut {found} is installed; these runs use mutmut=={MUTMUT_VERSION}")


def run(target: Target, max_children: int, mutants: List[str], keep: bool, show: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="revcolv2_mutmut_"))
    copy = work / "repo"
    copy.mkdir()
    try:
        _scratch_copy(copy)
        deselect = deselected(target)
        with open(copy / "pyproject.toml", "a") as f:
            f.write(mutmut_config(target, deselect))
        (copy / "run_mutmut.py").write_text(_LAUNCHER)
        # made now, before Python starts: a PYTHONPATH folder missing at start-up is cached as
        # "nothing here", and the editable install's finder would then import the checkout's code
        (copy / "mutants" / "projects" / "RevColV2").mkdir(parents=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join([str(copy / "mutants"), str(copy / "mutants" / "projects" / "RevColV2")]))
        env.pop("MUTANT_UNDER_TEST", None)
        names = mutants or target.mutant_globs()
        cmd = [sys.executable, "run_mutmut.py", "run", "--max-children", str(max_children), *names]
        print(f"scratch copy: {copy}\n$ {' '.join(cmd)}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=copy, env=env, text=True, capture_output=True)
        seconds = time.time() - start
        log = proc.stdout + proc.stderr
        (work / "mutmut.log").write_text(log)
        res = subprocess.run([sys.executable, "run_mutmut.py", "results", "--all", "true"], cwd=copy, env=env,
                             text=True, capture_output=True)
        statuses = parse_results(res.stdout)
        if names:
            import fnmatch
            statuses = {k: v for k, v in statuses.items() if any(fnmatch.fnmatch(k, n) for n in names)}
        if "failed to collect stats" in log:  # a selected test fails on the unmutated trampolines
            print(log[-3000:])
            raise SystemExit(f"mutmut's clean run of the tests failed; log: {work / 'mutmut.log'} "
                             f"(run them in {copy / 'mutants'} with MUTANT_UNDER_TEST=stats)")
        if proc.returncode != 0 and not statuses:
            print(log[-5000:])
            raise SystemExit(f"mutmut failed (exit {proc.returncode}); log: {work / 'mutmut.log'}")
        counts: Dict[str, int] = {}
        for status in statuses.values():
            counts[status] = counts.get(status, 0) + 1
        diffs = {}
        if show:
            diffs = mutant_diffs(copy / "mutants" / target.file, [n for n, s in statuses.items() if s != "killed"])
        return dict(target=target, counts=counts, statuses=statuses, diffs=diffs, seconds=seconds,
                    command=" ".join(["mutmut", "run", "--max-children", str(max_children), *names]),
                    copy=str(copy))
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def markdown_row(target: Target, r: dict, max_children: int, mutants: List[str]) -> str:
    """One line of the table in docs/TESTING.md, with the driver's command that made it."""
    c = dict(r["counts"])
    killed, survived, timeout = (c.pop(k, 0) for k in ("killed", "survived", "timeout"))
    other = ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "0"
    command = f"python tests/mutations/mutation_tool.py {shlex.quote(target.name)} --max-children {max_children}"
    if len(mutants) > 3:
        command += f" --mutants <the {len(mutants)} survivors of the first run>"
    elif mutants:
        command += " --mutants " + " ".join(shlex.quote(m) for m in mutants)
    return (f"| `{target.name}` | {len(r['statuses'])} | {killed} | {survived} | {timeout} | {other} "
            f"| {r['seconds'] / 60:.0f} min | `{command}` |")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="*", help="rows of TARGETS (default: every row without a pending run)")
    p.add_argument("--list", action="store_true", help="print the table: module, tests, functions")
    p.add_argument("--check", action="store_true", help="only check that every module, function and test exists")
    p.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    p.add_argument("--mutants", nargs="*", default=[], help="mutmut names or globs (a trial on some mutants)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy (mutmut show / results work there)")
    p.add_argument("--no-diffs", action="store_true", help="do not print the diff of each surviving mutant")
    p.add_argument("--json", type=Path, help="also write the statuses to this file")
    p.add_argument("--markdown", action="store_true",
                   help="end with each row's line of docs/TESTING.md (mutants, killed, survived, timeout, command)")
    args = p.parse_args(argv)

    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets {sorted(unknown)}; --list shows them")
    selected = [TARGETS[t] for t in args.targets] or [t for t in TARGETS.values() if not t.pending]
    if args.list or args.check:
        bad = 0
        for key, t in TARGETS.items():
            gone = missing(REPO, t)
            bad += bool(gone)
            if args.list:
                extra = f" functions {list(t.functions)}" if t.functions else ""
                print(f"{key}{extra}{' (' + t.pending + ')' if t.pending else ''}\n    tests: {' '.join(t.tests)}")
            if gone:
                print(f"{key}: not found: {gone}")
        return 1 if bad else 0

    check_mutmut()
    exit_status = 0
    rows = []
    for target in selected:
        r = run(target, args.max_children, args.mutants, args.keep, not args.no_diffs)
        c = r["counts"]
        print(f"\n{target.file}{' ' + str(list(target.functions)) if target.functions else ''}: "
              f"{len(r['statuses'])} mutants in {r['seconds']:.0f} s: "
              + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        print(f"command (in the scratch copy): {r['command']}")
        for name, diff in r["diffs"].items():
            print(f"\n# {r['statuses'][name]}: {name}\n{diff.strip()}")
        if args.json:
            data = json.loads(args.json.read_text()) if args.json.exists() else {}
            data[target.file + ("::" + ",".join(target.functions) if target.functions else "")] = dict(
                counts=c, statuses=r["statuses"], seconds=r["seconds"], command=r["command"])
            args.json.write_text(json.dumps(data, indent=1, sort_keys=True))
        if any(s != "killed" for s in r["statuses"].values()):
            exit_status = 1
        rows.append(markdown_row(target, r, args.max_children, args.mutants))
    if args.markdown:
        print("\n| Module | Mutants | Killed | Survived | Timeout | Other | Time | Command |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    return exit_status


if __name__ == "__main__":
    sys.exit(main())
