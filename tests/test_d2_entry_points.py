"""The detectron2 entry points as a new user meets them: ``tools/lazyconfig_train_net.py
--help`` describes this project's configs, ``--resume`` / ``--overwrite`` and the demo, and
names only configs that exist; the warnings known to be harmless are filtered by message
and source, in the entry points, and nothing else is."""
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
from d2_helpers import ROOT

CONFIGS = os.path.join(ROOT, "projects", "RevColV2", "configs")


def _expand_braces(path: str):
    """Every name a brace pattern stands for: ``x_{b,l}`` -> ``x_b``, ``x_l`` (one brace at a time)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for choice in m.group(1).split(",") for p in _expand_braces(path[:m.start()] + choice + path[m.end():])]


def test_train_net_help_describes_our_configs_resume_overwrite_and_the_demo():
    from detectron2.engine import default_argument_parser

    from revcolv2_d2.train_net import argument_parser

    parser = argument_parser()
    text = parser.format_help()
    assert "Yacs" not in text and "MODEL.WEIGHTS" not in text  # detectron2's stock text is gone
    for needed in ("LazyConfig", "--resume", "--overwrite", "make demo", "train.init_checkpoint",
                   "revcolv2_tiny", "$DETECTRON2_DATASETS", "docs/OPERATIONS.md"):
        assert needed in text, needed
    named = re.findall(r"\b(?:demo|COCO|ADE20K)/[\w{},]+\.py", text)
    assert len(named) >= 7
    for path in named:
        for one in _expand_braces(path):
            assert os.path.isfile(os.path.join(CONFIGS, one)), one
    # what default_setup and launch read, under detectron2's names and defaults
    args = parser.parse_args(["--config-file", "c.py", "--eval-only", "train.max_iter=5"])
    assert (args.config_file, args.eval_only, args.resume, args.opts) == ("c.py", True, False, ["train.max_iter=5"])
    d2 = default_argument_parser()
    for name in ("num_gpus", "num_machines", "machine_rank", "dist_url"):
        assert parser.get_default(name) == d2.get_default(name), name


@pytest.fixture
def restore_filters():
    fx = logging.getLogger("torch.fx._symbolic_trace")
    saved = list(fx.filters)
    with warnings.catch_warnings():
        yield
    fx.filters[:] = saved


def _shown(message, category, module) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)
    return bool(seen)


def test_the_known_harmless_warnings_are_filtered_by_message_and_source(restore_filters, caplog):
    from revcolv2_d2.known_warnings import ignore_known_harmless_warnings

    known = [
        ("`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.", FutureWarning,
         "torch.jit._script"),
        ("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument. (Triggered "
         "internally at TensorShape.cpp)", UserWarning, "torch.functional"),
        ("pkg_resources is deprecated as an API. See https://setuptools.pypa.io/", UserWarning,
         "detectron2.config.lazy"),
        ("The given NumPy array is not writable, and PyTorch does not support non-writable tensors.",
         UserWarning, "detectron2.data.detection_utils"),
    ]
    others = [  # the same modules or messages, but not what is known to be harmless
        ("torch.jit.trace is deprecated", FutureWarning, "torch.jit._script"),
        ("torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument.",
         UserWarning, "revcolv2.model"),
        ("something else", UserWarning, "torch.functional"),
        ("The given NumPy array is not writable", UserWarning, "revcolv2_d2.data.ade20k"),
    ]
    warnings.simplefilter("always")
    assert all(_shown(*w) for w in known + others)
    ignore_known_harmless_warnings()
    installed = list(warnings.filters)
    ignore_known_harmless_warnings()
    assert warnings.filters == installed  # calling it again changes nothing
    assert not any(_shown(*w) for w in known)
    assert all(_shown(*w) for w in others)

    fx = logging.getLogger("torch.fx._symbolic_trace")
    with caplog.at_level(logging.WARNING, logger=fx.name):
        fx.warning("is_fx_tracing will return true for both fx.symbolic_trace and torch.export. Please use ...")
        fx.warning("another torch.fx warning")
    assert "is_fx_tracing" not in caplog.text and "another torch.fx warning" in caplog.text


@pytest.mark.slow  # a subprocess
def test_train_net_prints_no_known_warning_at_start():
    """The import-time warnings (torch.jit.script in detectron2 and fvcore) no longer show."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"), "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "LazyConfig" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
