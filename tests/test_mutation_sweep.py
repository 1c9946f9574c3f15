"""The mutation sweep (tests/mutations/) stays runnable: every break's snippet occurs once in
the code it breaks and every test it names exists, so a refactor that moves code or renames a
test shows up here, in the unit run, instead of at the sweep's next (10-minute) run."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, file: str):
    """A script of tests/mutations/ imported as the module ``name`` (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "mutations" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _sweep():
    return _script("mutation_sweep", "sweep.py")


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


def _mutation_tool():
    return _script("mutation_tool", "mutation_tool.py")


def test_the_mutation_tool_table_names_existing_modules_functions_and_tests():
    """Every row of ``mutation_tool.TARGETS`` (module -> the tests mutmut runs against it)
    names a module, functions and tests that exist, the deselected tests exist, and the
    modules of issue #31 each have a row (mutmut itself is not needed: no run happens here)."""
    import tomllib

    tool = _mutation_tool()
    assert {t: tool.missing(REPO, target) for t, target in tool.TARGETS.items() if tool.missing(REPO, target)} == {}
    assert sweep_missing(list(tool.DESELECT)) == []
    files = {t.file for t in tool.TARGETS.values()}
    assert {"revcolv2/reversible.py", "revcolv2/layers.py", "revcolv2/model.py", "revcolv2/cli/torchrun.py",
            "revcolv2/signals.py", "revcolv2/checkpoint.py", "revcolv2/atomic_io.py", "revcolv2/export.py",
            "projects/RevColV2/revcolv2_d2/safe_config.py",
            "projects/RevColV2/revcolv2_d2/data/coco_checks.py"} <= files
    for target in tool.TARGETS.values():
        config = tomllib.loads(tool.mutmut_config(target, tool.deselected(target)))["tool"]["mutmut"]
        assert config["only_mutate"] == [target.file]
        assert config["pytest_add_cli_args_test_selection"][:len(target.tests)] == list(target.tests)
        assert target.module.startswith(("revcolv2.", "revcolv2_d2."))


def test_a_missing_module_function_or_test_of_the_mutation_table_is_reported():
    tool = _mutation_tool()
    row = tool.Target("revcolv2/model.py", ("tests/test_model.py::test_gone", "tests/gone.py"),
                      functions=("xǁBlockǁforward", "xǁNoSuchClassǁf", "x_no_such_function"))
    assert tool.missing(REPO, row) == ["revcolv2/model.py: class NoSuchClass", "revcolv2/model.py: x_no_such_function",
                                       "tests/test_model.py::test_gone", "tests/gone.py"]
    assert tool.missing(REPO, tool.Target("revcolv2/gone.py", ())) == ["revcolv2/gone.py"]


def sweep_missing(tests):
    return _sweep().missing_tests(REPO, tuple(tests))
