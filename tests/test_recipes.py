"""The recipe files in ``configs/`` hold the paper's numbers, and every value says where it
comes from.

The expected numbers below are copied from the paper's supplementary material (Han, Cai,
Zhang, "Exploring Disentangled Representations in Masked Image Modeling", NeurIPS 2023):
Table 1 (MIM pre-training), Table 2 (IN-22K intermediate fine-tuning), Table 3 (IN-1K
fine-tuning after MIM), Table 4 (IN-1K fine-tuning after IN-22K); the supervised baseline
and linear probing from the paper's text, completed by MAE's recipes (He et al., "Masked
Autoencoders Are Scalable Vision Learners", appendix A: Table 9 linear probing, Table 11
supervised ViT from scratch).

Each value line of a recipe file ends in a comment whose first word is its source:
``T1``-``T4`` (that supplementary table), ``paper`` (the paper's text), ``MAE`` / ``MAE-sup``
(MAE's recipes), ``ours`` (our choice), ``demo`` (the CPU demo's shrunk schedule) or
``run-time`` (not a recipe value). A value labelled with a table must be one of that
table's entries, so a number cannot be passed off as the paper's.
"""
import os
import re

import pytest

from revcolv2.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
SOURCES = {"T1", "T2", "T3", "T4", "paper", "MAE", "MAE-sup", "ours", "demo", "run-time"}
RANDAUG_9_05 = ("m9", "mstd0.5")  # RandAug(9, 0.5): magnitude 9, magnitude std 0.5

# supplementary Table 1: MIM pre-training ("-" for layer decay: none)
TABLE1 = {
    "optim.betas": [0.9, 0.95], "optim.base_lr": 1.5e-4, "optim.weight_decay": 0.05,
    "optim.batch_size": 4096, "schedule.epochs": 1600, "schedule.warmup_epochs": 40,
    "model.drop_path_rate": 0.0,
}
# supplementary Table 2: IN-22K intermediate fine-tuning; (B, L) where the sizes differ
TABLE2 = {
    "optim.betas": [0.9, 0.999], "optim.base_lr": 2.5e-4, "optim.weight_decay": 0.05, "optim.layer_decay": 0.8,
    "optim.batch_size": 4096, "schedule.epochs": 90, "schedule.warmup_epochs": 5,
    "mixup.label_smoothing": 0.1, "mixup.mixup": 0.8, "mixup.cutmix": 1.0,
    "model.drop_path_rate": (0.1, 0.2), "model.head_init_scale": 0.001, "ema.decay": None,
    "data.auto_augment": RANDAUG_9_05,
}
# supplementary Table 3: IN-1K fine-tuning after MIM
TABLE3 = {
    "optim.betas": [0.9, 0.999], "optim.base_lr": 5e-4, "optim.weight_decay": 0.05, "optim.layer_decay": 0.75,
    "optim.batch_size": 1024, "schedule.epochs": (100, 50), "schedule.warmup_epochs": 5,
    "mixup.label_smoothing": 0.1, "mixup.mixup": 0.8, "mixup.cutmix": 1.0,
    "model.drop_path_rate": 0.1, "model.head_init_scale": 0.001, "ema.decay": 0.9999,
    "data.auto_augment": RANDAUG_9_05,
}
# supplementary Table 4: IN-1K fine-tuning after IN-22K (no warm-up, no mixup/cutmix)
TABLE4 = {
    "optim.betas": [0.9, 0.999], "optim.base_lr": 2.5e-5, "optim.weight_decay": 0.01, "optim.layer_decay": 0.9,
    "optim.batch_size": 512, "schedule.epochs": 30, "schedule.warmup_epochs": 0,
    "mixup.label_smoothing": 0.1, "mixup.mixup": 0.0, "mixup.cutmix": 0.0,
    "model.drop_path_rate": (0.1, 0.2), "model.head_init_scale": 0.001, "ema.decay": 0.9999,
    "data.auto_augment": RANDAUG_9_05,
}
# paper text: the supervised baseline is "the IN-1K recipe of MAE's supervised ViT baseline
# plus EMA 0.999"; the rest is MAE appendix Table 11 (ViT from scratch, B / L)
SUPERVISED_PAPER = {"ema.decay": 0.999}
SUPERVISED_MAE = {
    "optim.betas": [0.9, 0.95], "optim.base_lr": 1e-4, "optim.weight_decay": 0.3, "optim.batch_size": 4096,
    "schedule.epochs": (300, 200), "schedule.warmup_epochs": 20, "model.drop_path_rate": (0.1, 0.2),
    "mixup.label_smoothing": 0.1, "mixup.mixup": 0.8, "mixup.cutmix": 1.0, "data.auto_augment": RANDAUG_9_05,
}
# paper text: linear probing with LARS for 90 epochs (MAE's protocol); MAE appendix Table 9
LINEAR_PROBE_PAPER = {"schedule.epochs": 90}
LINEAR_PROBE_MAE = {
    "optim.base_lr": 0.1, "optim.weight_decay": 0.0, "optim.momentum": 0.9, "optim.batch_size": 16384,
    "schedule.warmup_epochs": 10,
}

# variant file -> (tables it follows, size index 0 = B / 1 = L)
RECIPE_FILES = {
    "pretrain/revcolv2_base.yaml": ([TABLE1], 0),
    "pretrain/revcolv2_large.yaml": ([TABLE1], 1),
    "finetune/revcolv2_base_in22k.yaml": ([TABLE2], 0),
    "finetune/revcolv2_large_in22k.yaml": ([TABLE2], 1),
    "finetune/revcolv2_base_in1k.yaml": ([TABLE3], 0),
    "finetune/revcolv2_large_in1k.yaml": ([TABLE3], 1),
    "finetune/revcolv2_base_in1k_after_in22k.yaml": ([TABLE4], 0),
    "finetune/revcolv2_large_in1k_after_in22k.yaml": ([TABLE4], 1),
    "finetune/revcolv2_base_supervised.yaml": ([SUPERVISED_PAPER, SUPERVISED_MAE], 0),
    "finetune/revcolv2_large_supervised.yaml": ([SUPERVISED_PAPER, SUPERVISED_MAE], 1),
    "linear_probe/revcolv2_base.yaml": ([LINEAR_PROBE_PAPER, LINEAR_PROBE_MAE], 0),
    "linear_probe/revcolv2_large.yaml": ([LINEAR_PROBE_PAPER, LINEAR_PROBE_MAE], 1),
}
# the table each source label stands for (for the "labelled values are the table's" check)
LABELLED = {"T1": TABLE1, "T2": TABLE2, "T3": TABLE3, "T4": TABLE4, "paper": {**SUPERVISED_PAPER, **LINEAR_PROBE_PAPER}}


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"config has no {dotted!r}")
        node = node[part]
    return node


def check_value(where: str, key: str, actual, expected, size: int) -> None:
    if isinstance(expected, tuple) and expected and isinstance(expected[0], str):  # substrings
        assert isinstance(actual, str) and all(s in actual for s in expected), (where, key, actual, expected)
        return
    if isinstance(expected, tuple):  # (B, L)
        expected = expected[size]
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-12, abs=0), (where, key, actual, expected)
    else:
        assert actual == expected, (where, key, actual, expected)


def value_lines(path: str):
    """(dotted key, value text, comment or None) of every ``key: value`` line of a YAML file."""
    stack = []  # (indent, key) of the open sections
    out = []
    with open(path) as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = re.match(r"^( *)([A-Za-z_][\w]*):(.*)$", line)
            assert m, f"{path}: cannot read the line {line!r}"
            indent, key, rest = len(m.group(1)), m.group(2), m.group(3)
            value, _, comment = rest.partition(" #")
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if value.strip():
                dotted = ".".join([k for _, k in stack] + [key])
                out.append((dotted, value.strip(), comment.strip() or None))
            else:
                stack.append((indent, key))
    return out


def all_recipe_files():
    return sorted(os.path.relpath(os.path.join(d, n), CONFIGS)
                  for d, _, names in os.walk(CONFIGS) for n in names if n.endswith(".yaml"))


def test_every_full_scale_recipe_file_is_checked_against_its_table():
    full_scale = {f for f in all_recipe_files() if not os.path.basename(f).startswith("_") and "demo" not in f}
    assert full_scale == set(RECIPE_FILES)


@pytest.mark.parametrize("rel", sorted(RECIPE_FILES))
def test_recipe_holds_the_papers_values(rel):
    tables, size = RECIPE_FILES[rel]
    cfg = load_config(os.path.join(CONFIGS, rel))
    assert cfg["model"]["name"] == ("revcolv2_base", "revcolv2_large")[size]
    for table in tables:
        for key, expected in table.items():
            check_value(rel, key, get(cfg, key), expected, size)


def test_pretraining_has_no_layer_decay_and_classifier_recipes_no_warmup_mismatch():
    """Table 1 lists no layer decay; Table 4 no warm-up (a zero, not a missing key)."""
    cfg = load_config(os.path.join(CONFIGS, "pretrain/revcolv2_base.yaml"))
    assert cfg["optim"].get("layer_decay", 1.0) == 1.0
    assert "mixup" not in cfg  # Table 1: no label smoothing / mixup / cutmix
    t4 = load_config(os.path.join(CONFIGS, "finetune/revcolv2_large_in1k_after_in22k.yaml"))
    assert t4["schedule"]["warmup_epochs"] == 0


@pytest.mark.parametrize("rel", all_recipe_files())
def test_every_value_says_where_it_comes_from(rel):
    path = os.path.join(CONFIGS, rel)
    variant_file = not os.path.basename(rel).startswith("_")
    for key, value, comment in value_lines(path):
        if key == "_base_" or (variant_file and key == "model.name"):
            continue  # the file it extends; a variant file's own model, named in its header
        assert comment, f"{rel}: {key}: {value} has no provenance comment"
        source = re.match(r"([A-Za-z0-9-]+)", comment)
        assert source and source.group(1) in SOURCES, (
            f"{rel}: {key}: the comment {comment!r} does not start with a source ({sorted(SOURCES)})")


@pytest.mark.parametrize("rel", all_recipe_files())
def test_values_labelled_with_a_table_are_that_tables_entries(rel):
    """A ``# T3`` label on a number that is not in Table 3 (or ``# paper`` on one the
    paper's text does not give) is a false claim of provenance."""
    for key, value, comment in value_lines(os.path.join(CONFIGS, rel)):
        source = re.match(r"([A-Za-z0-9-]+)", comment or "")
        if source and source.group(1) in LABELLED:
            table = LABELLED[source.group(1)]
            assert key in table, f"{rel}: {key}: {value} is labelled {source.group(1)}, which has no such entry"


def test_provenance_labels_of_table_1_say_mae_where_the_paper_is_silent():
    """The supplementary gives no mask ratio and Table 1 lists no flip: both are MAE's."""
    labels = {k: c for k, _, c in value_lines(os.path.join(CONFIGS, "pretrain/_table1.yaml"))}
    assert labels["model.mask_ratio"].startswith("MAE")
    assert labels["data.hflip"].startswith("MAE")


def test_value_line_reader_sees_nested_keys_and_missing_comments(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("a:            # section\n  b: 1  # T1: yes\n  c:\n    d: [1, 2]\ne: x\n")
    assert value_lines(str(p)) == [("a.b", "1", "T1: yes"), ("a.c.d", "[1, 2]", None), ("e", "x", None)]
