"""Mutation sweep: apply each deliberate break of ``breaks.py`` to a scratch copy of the
repository, run the tests named for it there, and report whether they caught it.

    .venv/bin/python tests/mutations/sweep.py               # every break (about 10 minutes on 2 cores)
    .venv/bin/python tests/mutations/sweep.py --check       # only: every snippet there once, every test there?
    .venv/bin/python tests/mutations/sweep.py drop-path-unscaled colour-coco-train-bgr   # some breaks
    .venv/bin/python tests/mutations/sweep.py --markdown    # the table for docs/TESTING.md

The copy holds the files git tracks plus the untracked ones it does not ignore (the working
tree as it is, uncommitted edits included); the tests run there with this interpreter and
``PYTHONPATH=<copy>:<copy>/projects/RevColV2``, so the copy's code wins over the editable
install. First the named tests run on the unbroken copy (they must pass, or a "caught" would
mean nothing); then, one break at a time: replace its snippet, run its tests, restore.

Each break is an exact snippet that must occur exactly once in its file. When code moves,
the sweep says "snippet not found" (or "snippet not unique") for that break instead of
testing nothing: update the snippet in breaks.py to the code's new form.

Exit status: 0 when every break was caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _load_breaks():
    """breaks.py next to this file (loaded by path: the tests folder is not a package)."""
    spec = importlib.util.spec_from_file_location("mutation_breaks", HERE / "breaks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_breaks = _load_breaks()
BREAKS, Break = _breaks.BREAKS, _breaks.Break


def tracked_files(repo: Path) -> List[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f and (repo / f).is_file()]


def scratch_copy(repo: Path, dest: Path) -> None:
    for rel in tracked_files(repo):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)


def snippet_problem(text: str, brk: Break) -> Optional[str]:
    n = text.count(brk.old)
    if n == 0:
        return "snippet not found"
    if n > 1:
        return f"snippet not unique ({n} matches)"
    return None


def missing_tests(repo: Path, tests: Tuple[str, ...]) -> List[str]:
    """The pytest ids of ``tests`` whose file, or whose test function, no longer exists (a test
    renamed by a refactor): the sweep would otherwise stop at its baseline run."""
    missing = []
    for test in tests:
        file, *names = test.split("[")[0].split("::")
        path = repo / file
        if not path.is_file():
            missing.append(test)
            continue
        defined = {node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        if any(name not in defined for name in names):
            missing.append(test)
    return missing


def run_tests(copy: Path, tests: List[str], timeout: int) -> Tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=f"{copy}{os.pathsep}{copy / 'projects' / 'RevColV2'}",
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.time() - start
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\ntimed out after {timeout} s", time.time() - start


def evidence(output: str) -> str:
    """The first assertion line of a failure (what changed), else its error line."""
    for pattern in (r"^E\s+(\S.*)$", r"^(FAILED .*|ERROR .*)$"):
        m = re.search(pattern, output, re.MULTILINE)
        if m:
            line = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/\s]+/", "", m.group(1).strip())  # tmp_path
            return line if len(line) <= 200 else line[:197] + "..."
    return output.strip().splitlines()[-1] if output.strip() else ""


def sweep(selected: List[Break], timeout: int, keep: bool, baseline: bool) -> List[dict]:
    work = Path(tempfile.mkdtemp(prefix="revcolv2_mutation_"))
    copy = work / "repo"
    results = []
    try:
        scratch_copy(REPO, copy)
        print(f"scratch copy: {copy}", flush=True)
        runnable = []
        for brk in selected:
            problem = snippet_problem((copy / brk.file).read_text(), brk)
            if problem:
                results.append(dict(brk=brk, status=problem, evidence="", seconds=0.0))
                print(f"{brk.id:34s} {problem} in {brk.file}", flush=True)
            else:
                runnable.append(brk)
        if baseline and runnable:
            tests = sorted({t for brk in runnable for t in brk.tests})
            rc, out, secs = run_tests(copy, tests, timeout * 2)
            print(f"baseline: {len(tests)} test ids on the unbroken copy: rc {rc} in {secs:.0f} s", flush=True)
            if rc != 0:
                print(out[-3000:])
                raise SystemExit("the named tests fail on the unbroken copy: fix that first "
                                 "(nothing would be measured)")
        for brk in runnable:
            path = copy / brk.file
            original = path.read_text()
            path.write_text(original.replace(brk.old, brk.new, 1))
            try:
                rc, out, secs = run_tests(copy, list(brk.tests), timeout)
            finally:
                path.write_text(original)
            if rc == 0:
                status = "SURVIVED"
            elif rc == 1:
                status = "caught"
            elif rc == -1:
                status = "timeout"
            else:
                status = f"caught (pytest exit {rc}: error)" if rc in (2, 3) else f"no tests ran (pytest exit {rc})"
            results.append(dict(brk=brk, status=status, evidence=evidence(out) if rc else "", seconds=secs))
            print(f"{brk.id:34s} {status:8s} {secs:5.1f} s  {results[-1]['evidence']}", flush=True)
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: List[dict]) -> str:
    lines = ["| Break | File: one-line change | Output that changes | Caught by | Result (first assertion) |",
             "|---|---|---|---|---|"]
    for r in results:
        b = r["brk"]
        tests = ", ".join(f"`{t.replace('tests/', '')}`" for t in b.tests)
        ev = r["evidence"].replace("|", "\\|")
        lines.append(f"| `{b.id}` | `{b.file}`: {b.change} | {b.output} | {tests} | {r['status']}: {ev} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ids", nargs="*", help="break ids to run (default: all)")
    p.add_argument("--check", action="store_true",
                   help="only check that every snippet occurs once in this tree and every named test exists")
    p.add_argument("--list", action="store_true", help="list the breaks")
    p.add_argument("--markdown", action="store_true", help="print the results as the table of docs/TESTING.md")
    p.add_argument("--timeout", type=int, default=600, help="seconds per break (default 600)")
    p.add_argument("--keep", action="store_true", help="keep the scratch copy")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the named tests on the unbroken copy")
    args = p.parse_args(argv)

    ids = [b.id for b in BREAKS]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SystemExit(f"duplicate break ids in breaks.py: {sorted(dup)}")
    unknown = set(args.ids) - set(ids)
    if unknown:
        raise SystemExit(f"unknown break ids {sorted(unknown)}; --list shows them")
    selected = [b for b in BREAKS if not args.ids or b.id in args.ids]

    if args.list:
        for b in selected:
            print(f"{b.id:34s} {b.file}: {b.change}")
        return 0
    if args.check:
        bad = 0
        for b in selected:
            problem = snippet_problem((REPO / b.file).read_text(), b)
            missing = missing_tests(REPO, b.tests)
            if problem or missing:
                bad += 1
                print(f"{b.id:34s} {problem or ''} {'tests not found: ' + str(missing) if missing else ''}")
        print(f"{len(selected) - bad} of {len(selected)} breaks apply to this tree")
        return 1 if bad else 0

    start = time.time()
    results = sweep(selected, args.timeout, args.keep, not args.no_baseline)
    caught = sum(r["status"].startswith("caught") for r in results)
    print(f"\n{caught} of {len(results)} breaks caught in {time.time() - start:.0f} s")
    if args.markdown:
        print()
        print(markdown(results))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
