"""Every repository file that a ``*.md``, ``*.py`` or ``*.txt`` file (or the Makefile) names exists.

A reference is a path-like token ending in a source or document extension
(``docs/TRAINING.md``, ``tools/export.py``, ``configs/pretrain/_table1.yaml``), a bare
document name (``NOTES.md``, also as "NOTES section 2" or "PLANNING notes") or a
``docs/NAME`` without extension. It resolves if it
exists relative to the repository root, to the citing file's folder, or to the
detectron2 project folder (whose configs are cited as ``configs/COCO/...``); a bare name
resolves if some tracked file has that name. Configs may also be cited relative to the
project's ``configs/`` folder, and detectron2's own configs as ``common/...``. Patterns (``{b,l}``, ``*``, ``<name>``),
absolute paths, URLs, another repository's files written ``owner/repo:path``, files that runs write (under
``output/``, ``datasets/``) and quoted
file names in code (``"config.yaml"``) are not references to repository files.
"""
import importlib.util
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(ROOT, "projects", "RevColV2")
# folders that a citation may be relative to, besides the root and the citing file's folder:
# the detectron2 project, its configs, and detectron2's own model-zoo configs (``common/...``)
BASES = [PROJECT, os.path.join(PROJECT, "configs")]
_D2 = importlib.util.find_spec("detectron2")
if _D2 is not None and _D2.submodule_search_locations:
    BASES.append(os.path.join(list(_D2.submodule_search_locations)[0], "model_zoo", "configs"))
SCANNED = (".md", ".py", ".txt")
_EXT = r"(?:py|md|txt|yaml|yml|sh|ini|cfg|toml)"
# a path-like token: segments of word characters, dots and dashes joined by '/', with an extension
_PATH = re.compile(r"(?<![\w/.$<>{}*\]:-])((?:[\w.-]+/)*[\w.-]+\." + _EXT + r")(?![\w/{}*])")
_DOCS_DIR = re.compile(r"(?<![\w/.])(docs/[A-Za-z_]+)(?![\w./])")
_GENERATED = ("output/", "datasets/", "vis/", "export/")
# a document cited by name and part, without extension: "NOTES section 2", "PLANNING notes"
_NAMED_DOC = re.compile(r"\b([A-Z][A-Z_]{3,})(?:\.md)?\s+(?:section|notes)\b")


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if os.path.exists(os.path.join(ROOT, f))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        found = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("output", "datasets", "__pycache__")]
            found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
        return found


FILES = _tracked_files()
BASENAMES = {os.path.basename(f) for f in FILES}


def _resolves(ref: str, citing: str) -> bool:
    if "/" not in ref:
        return ref in BASENAMES
    candidates = [os.path.join(base, ref) for base in [ROOT, os.path.join(ROOT, os.path.dirname(citing))] + BASES]
    if ref.startswith("docs/") and "." not in os.path.basename(ref):
        candidates += [c + ".md" for c in candidates]
    return any(os.path.exists(c) for c in candidates)


def _references(text: str, code: bool = False):
    for m in _PATH.finditer(text):
        ref = m.group(1)
        if ref.startswith(_GENERATED) or ref.startswith("."):
            continue
        if code and text[m.start(1) - 1:m.start(1)] in "\"'" and text[m.end(1):m.end(1) + 1] == text[m.start(1) - 1]:
            continue  # a quoted file name in code ("config.yaml"): what the code reads or writes
        if "/" not in ref and not ref.endswith((".md", ".py", ".txt")):
            continue  # a bare data-file name (config.yaml, x.yaml): what a run reads or writes
        yield ref
    yield from (m.group(1) for m in _DOCS_DIR.finditer(text))
    yield from (m.group(1) + ".md" for m in _NAMED_DOC.finditer(text))


def missing_references(files=None):
    """(citing file, line number, reference) for every reference that does not resolve."""
    bad = []
    for rel in files if files is not None else FILES:
        if not (rel.endswith(SCANNED) or os.path.basename(rel) == "Makefile") or rel == os.path.relpath(__file__, ROOT):
            continue
        with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f, 1):
                refs = dict.fromkeys(_references(line, code=rel.endswith(".py")))  # once per line
                bad += [(rel, i, ref) for ref in refs if not _resolves(ref, rel)]
    return bad


def test_every_cited_repository_file_exists():
    bad = missing_references()
    assert not bad, "references to files that are not in the repository:\n" + "\n".join(
        f"  {f}:{i}: {ref}" for f, i, ref in bad)


@pytest.mark.parametrize("text,expected", [
    ("see NO_SUCH_DOC.md section 2", ["NO_SUCH_DOC.md"]),
    ("recipe of NO_SUCH_DOC section 2 (see NO_SUCH_PLAN notes)", ["NO_SUCH_DOC.md", "NO_SUCH_PLAN.md"]),
    ("notes in docs/NO_SUCH_NOTES", ["docs/NO_SUCH_NOTES"]),
    ("notes in docs/INSTALL", []),
    ("run tools/no_such_tool.py", ["tools/no_such_tool.py"]),
    ("recipes: docs/TRAINING.md and configs/pretrain/_table1.yaml", []),
    ("COCO config configs/COCO/mask_rcnn_revcolv2_b_50ep.py", []),
    ("sizes mask_rcnn_revcolv2_{b,l}_50ep.py, output/demo/summary.md, https://x.org/a.md", []),
    ("detectron2's common/models/mask_rcnn_vitdet.py and common/train.py", []),
    ("the COCO/mask_rcnn_revcolv2_b_50ep.py config", []),
])
def test_the_checker_finds_dangling_references(text, expected):
    found = [ref for ref in dict.fromkeys(_references(text)) if not _resolves(ref, "README.md")]
    assert found == expected
