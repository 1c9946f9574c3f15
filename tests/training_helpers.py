"""Shared by the training tests: run the entry points (revcolv2.cli.*), make tiny data and tiny configs."""
import importlib
import warnings
from pathlib import Path

import torch

from revcolv2.synthetic_imagenet import generate_synthetic_imagenet

REPO = Path(__file__).resolve().parents[1]

# a tiny RevColV2 (same 2 BU + 1 TD columns x 4 levels) on 32x32 images with 8x8 patches
TINY_MODEL = "{embed_dim: 32, num_heads: 2, patch_size: 8}"


def tiny_dataset(root: Path, classes: int = 4, train_per_class: int = 8, val_per_class: int = 2) -> Path:
    if not (root / "train").is_dir():
        generate_synthetic_imagenet(root, num_classes=classes, train_per_class=train_per_class,
                                    val_per_class=val_per_class, size=40, seed=0)
    return root


class one_thread:
    """Run tiny models on one intra-op thread: their ops are microseconds long, and on a
    busy 2-core machine a second thread mostly adds synchronisation stalls."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def run_tool(name: str, *argv: str, quiet: bool = True) -> dict:
    with warnings.catch_warnings(), one_thread():
        if quiet:
            warnings.simplefilter("ignore", UserWarning)
        return importlib.import_module(f"revcolv2.cli.{name}").main([str(a) for a in argv])


PRETRAIN_DEMO = REPO / "configs" / "pretrain" / "revcolv2_tiny_demo.yaml"


def tiny_pretrain(data, out, *opts, extra=()) -> dict:
    """``tools/pretrain.py`` on :data:`TINY_MODEL` at 32x32: one epoch of 8-image batches,
    no warm-up, no reconstruction grids, no loader workers; ``extra``: more flags, ``opts``:
    more (or overriding) ``--opts`` values."""
    return run_tool(
        "pretrain", "--config", PRETRAIN_DEMO, "--data-path", data, "--output-dir", out, "--num-workers", "0",
        *extra, "--opts", "data.input_size=32", f"model.kwargs={TINY_MODEL}", "optim.batch_size=8",
        "train.batch_per_gpu=8", "train.vis_images=0", "schedule.warmup_epochs=0", "schedule.epochs=1", *opts,
    )


class Captured(Exception):
    """Raised by :func:`built_for_training`'s stand-in trainer: everything up to training was built."""


def built_for_training(monkeypatch, tool: str, trainer: str, *argv) -> dict:
    """Run the entry point ``tool`` (``revcolv2.cli.<tool>``) with ``argv`` until it constructs its
    trainer class ``trainer``; return the arguments it gave the trainer (model, optimizer,
    datasets, ...). Nothing is trained."""
    module = importlib.import_module(f"revcolv2.cli.{tool}")
    seen = {}

    def stand_in(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(module, trainer, stand_in)
    try:
        run_tool(tool, *argv)
    except Captured:
        return seen
    raise AssertionError(f"tools/{tool}.py {argv} ended without building its trainer")
