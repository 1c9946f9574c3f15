"""A classifier's checkpoints record the class names it was trained on (best, last and
periodic), and whatever reads its head compares them with the data's: ``--eval`` refuses
another folder's classes naming both lists, ``--resume`` refuses them, ``--finetune`` does
not load a head trained on other classes; a checkpoint written before the names were
recorded is accepted with a note."""
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import timm
import torch
from training_helpers import REPO, TINY_MODEL, run_tool, tiny_dataset

import revcolv2  # noqa: F401
from revcolv2 import classification
from revcolv2.classification import evaluate_checkpoint, load_pretrained
from revcolv2.distributed import DistInfo

pytestmark = pytest.mark.usefixtures("single_thread")
# (SystemExit in the code before the names were recorded: nothing raised it)
ClassMismatchError = getattr(classification, "ClassMismatchError", SystemExit)

FINETUNE = REPO / "configs" / "finetune" / "revcolv2_tiny_demo.yaml"
LEGACY = Path(__file__).parent / "fixtures" / "pre_v2" / "finetune_checkpoint-best.pth"
TINY = dict(embed_dim=32, num_heads=2, patch_size=8)


def named_dataset(root: Path, names) -> Path:
    """The tiny synthetic dataset with its class folders renamed to ``names`` (sorted order kept)."""
    if not (root / "val").is_dir():
        tiny_dataset(root / "src", classes=len(names), train_per_class=4, val_per_class=1)
        for split in ("train", "val"):
            for old, new in zip(sorted(p.name for p in (root / "src" / split).iterdir()), sorted(names)):
                shutil.copytree(root / "src" / split / old, root / split / new)
    return root


class _Folder(torch.utils.data.Dataset):
    """A validation set of two images whose class names are given (the check comes before any image is read)."""

    def __init__(self, classes):
        self.classes = list(classes)

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32), i % len(self.classes)


def _classifier(num_classes=2):
    torch.manual_seed(0)
    return timm.create_model("revcolv2_tiny", num_classes=num_classes, img_size=32, **TINY)


def _evaluate(model, path, classes, **kwargs):
    return evaluate_checkpoint(model, str(path), _Folder(classes), DistInfo(), 2, 0, nullcontext, **kwargs)


# ----------------------------------------------------------------------------- --eval
def test_eval_refuses_other_class_names_naming_both_lists(tmp_path):
    model = _classifier()
    torch.save({"model": model.state_dict(), "classes": ["cat", "dog"]}, tmp_path / "best.pth")
    with pytest.raises(ClassMismatchError) as e:
        _evaluate(model, tmp_path / "best.pth", ["apple", "banana"])
    msg = str(e.value)
    assert "['cat', 'dog']" in msg and "['apple', 'banana']" in msg and "best.pth" in msg and "\n" not in msg, msg


def test_eval_refuses_the_same_names_in_another_order_of_indices(tmp_path):
    model = _classifier(3)
    torch.save({"model": model.state_dict(), "classes": ["a", "b", "c"]}, tmp_path / "best.pth")
    with pytest.raises(ClassMismatchError, match="first difference at index 1: 'b' in the checkpoint, 'x' here"):
        _evaluate(model, tmp_path / "best.pth", ["a", "x", "c"])


def test_eval_of_matching_class_names_measures(tmp_path):
    model = _classifier()
    torch.save({"model": model.state_dict(), "classes": ["cat", "dog"]}, tmp_path / "best.pth")
    results = _evaluate(model, tmp_path / "best.pth", ["cat", "dog"])
    assert [r["weights"] for r in results] == ["model"] and 0 <= results[0]["top1"] <= 100


def test_a_checkpoint_without_class_names_is_evaluated_with_a_note(capsys):
    """The fixture was written before checkpoints recorded their classes (4 classes, 16 wide)."""
    model = timm.create_model("revcolv2_tiny", num_classes=4, img_size=32, embed_dim=16, num_heads=2, patch_size=8)
    results = _evaluate(model, LEGACY, ["a", "b", "c", "d"], ema=False)
    assert len(results) == 1
    out = capsys.readouterr().out
    assert "records no class names" in out and str(LEGACY) in out and "['a', 'b', 'c', 'd']" in out, out


# ----------------------------------------------------------------------------- --finetune
def test_finetune_from_a_classifier_of_other_classes_leaves_its_head_out(tmp_path, capsys):
    source = _classifier()
    torch.save({"model": source.state_dict(), "classes": ["cat", "dog"]}, tmp_path / "cls.pth")
    model = _classifier()
    head = model.head.weight.detach().clone()
    report = load_pretrained(model, str(tmp_path / "cls.pth"), classes=["apple", "banana"])
    assert torch.equal(model.head.weight, head) and "head.weight" in report.missing
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    out = capsys.readouterr().out
    assert "not loading the checkpoint's classifier" in out and "['cat', 'dog']" in out and "['apple', 'banana']" in out


def test_finetune_from_a_classifier_of_the_same_classes_loads_its_head(tmp_path):
    source = _classifier()
    torch.save({"model": source.state_dict(), "classes": ["cat", "dog"]}, tmp_path / "cls.pth")
    model = _classifier()
    load_pretrained(model, str(tmp_path / "cls.pth"), classes=["cat", "dog"], verbose=False)
    assert torch.equal(model.head.weight, source.head.weight)


# ----------------------------------------------------------------------------- the tools
def finetune(data, out, *opts, extra=()):
    return run_tool(
        "finetune", "--config", FINETUNE, "--data-path", data, "--output-dir", out, "--num-workers", "0", *extra,
        "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8", "train.batch_per_gpu=8",
        "train.eval_batch=8", "schedule.warmup_epochs=0", *opts)


@pytest.mark.slow  # fine-tuning runs
def test_the_issues_case_end_to_end(tmp_path):
    """Fine-tune on [cat, dog]; every checkpoint records the names; ``--eval`` on an [apple,
    banana] folder and ``--resume`` there stop with both lists instead of a number."""
    pets = named_dataset(tmp_path / "pets", ["cat", "dog"])
    fruit = named_dataset(tmp_path / "fruit", ["apple", "banana"])
    out = tmp_path / "run"
    finetune(pets, out, "schedule.epochs=1")
    for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
        assert torch.load(out / name, weights_only=True)["classes"] == ["cat", "dog"], name
    with pytest.raises(ClassMismatchError, match=r"\['cat', 'dog'\].*\['apple', 'banana'\]"):
        finetune(fruit, out, extra=("--eval", "--resume", out / "checkpoint-best.pth"))
    with pytest.raises(SystemExit, match=r"\['cat', 'dog'\].*\['apple', 'banana'\]"):
        finetune(fruit, out, "schedule.epochs=2", extra=("--resume", "auto"))
    res = finetune(pets, out, extra=("--eval", "--resume", out / "checkpoint-best.pth"))["results"]
    assert len(res) == 2  # the same classes: measured (raw and EMA weights)


@pytest.mark.slow  # a linear-probing run
def test_linear_probe_checkpoints_record_their_classes(tmp_path):
    pets = named_dataset(tmp_path / "pets", ["cat", "dog"])
    fruit = named_dataset(tmp_path / "fruit", ["apple", "banana"])
    common = ["--config", REPO / "configs/linear_probe/revcolv2_tiny_demo.yaml", "--output-dir", tmp_path / "run",
              "--num-workers", "0"]
    opts = ["--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
            "train.batch_per_gpu=8", "train.eval_batch=8", "schedule.epochs=1", "schedule.warmup_epochs=0"]
    run_tool("linear_probe", *common, "--data-path", pets, *opts)
    assert torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["classes"] == ["cat", "dog"]
    with pytest.raises(ClassMismatchError, match="apple"):
        run_tool("linear_probe", *common, "--data-path", fruit, "--eval", "--resume",
                 tmp_path / "run" / "checkpoint-last.pth", *opts)
