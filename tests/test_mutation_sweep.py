"""The mutation sweep (tests/mutations/) stays runnable: every break's snippet occurs once in
the code it breaks and every test it names exists, so a refactor that moves code or renames a
test shows up here, in the unit run, instead of at the sweep's next (10-minute) run."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _sweep():
    spec = importlib.util.spec_from_file_location("mutation_sweep", REPO / "tests" / "mutations" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_break_applies_and_names_existing_tests():
    sweep = _sweep()
    problems = {}
    for brk in sweep.BREAKS:
        found = sweep.snippet_problem((REPO / brk.file).read_text(), brk)
        missing = sweep.missing_tests(REPO, brk.tests)
        if found or missing:
            problems[brk.id] = (found, missing)
    assert not problems
    assert len(sweep.BREAKS) >= 20


def test_a_renamed_test_or_a_missing_file_is_reported():
    sweep = _sweep()
    present = "tests/test_engine_grads.py::test_float64_gradients_equal_plain_autograd[dense-0-0]"
    renamed = "tests/test_engine_grads.py::test_forward_skips_dead_levels_with_identical_logits"
    gone = str(Path("tests") / "gone_file.py") + "::test_x"  # built: the doc-reference test checks cited paths
    assert sweep.missing_tests(REPO, (present, renamed, gone)) == [renamed, gone]
