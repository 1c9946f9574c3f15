"""Shared by the training tests: run the entry points (revcolv2.cli.*), make tiny data and tiny configs."""
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from revcolv2.synthetic_imagenet import generate_synthetic_imagenet

REPO = Path(__file__).resolve().parents[1]

# a tiny RevColV2 (same 2 BU + 1 TD columns x 4 levels) on 32x32 images with 8x8 patches
TINY_MODEL = "{embed_dim: 32, num_heads: 2, patch_size: 8}"


def dead_pid() -> int:
    """The pid of a process that has ended (a writer killed before cleaning up): what the
    clean-up of stale temporaries must treat as gone."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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


# ----------------------------------------------------------------------------- randomised parameters
ALPHA_MIN = 1e-3  # Column.alpha_min: the smallest magnitude an alpha takes (docs/ARCHITECTURE.md)
# a wrapper's prefix (timm's feature nets, DDP, the detectron2 backbone) is not part of the key
_WRAPPERS = ("model.", "body.", "graph_module.", "module.", "net.")


def _key(name: str) -> str:
    while name.startswith(_WRAPPERS):
        name = name.split(".", 1)[1]
    return name


def randomize_parameters(model, seed: int = 0, alphas: str = "mixed"):
    """Set every parameter whose initial value is a constant, or near zero, to random values,
    so that a test comparing two code paths sees a path that reads another module's
    parameters (at their initial values every LayerNorm is the identity affine, both gammas
    of a block and all alphas are equal, biases are 0, a fine-tuning head is 0.001 x random):

    - every LayerNorm: weight 1 + 0.5 N(0, 1), bias 0.5 N(0, 1) (blocks, fusion, ``fc_norm``,
      ``decoder_norm``, detectron2's channel LayerNorm);
    - ``gamma1`` / ``gamma2`` (models built with ``layer_scale_init``): U(0.2, 1.2);
    - every ``Linear`` / ``Conv2d`` / ``ConvTranspose2d`` bias: 0.2 N(0, 1); the classifier's
      weight N(0, 1/fan_in);
    - ``mask_token``: N(0, 1);
    - ``alphas``: ``"mixed"`` gives both signs, most magnitudes in U(0.3, 1.5) and, per
      level, some at 0, some below ``ALPHA_MIN`` and some around it (clamped by
      ``Column.alpha_values``); ``"large"`` only U(0.3, 1.5) with both signs (tests whose
      float32 / bf16 tolerance the division by a clamped alpha of 1e-3 would swamp).

    The values of a parameter depend on ``seed`` and its name only (without a wrapper's
    prefix such as ``model.``), so a pruned model, a ``features_only`` model or a detectron2
    backbone gets the same values as the full model for the parameters they share. Other
    weights (the matrices, random already) are left as built. Returns ``model``."""
    import zlib

    from torch import nn

    if alphas not in ("mixed", "large"):
        raise ValueError(f"alphas must be 'mixed' or 'large', got {alphas!r}")
    owners = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners[id(p)] = (module, pname)
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = _key(name)
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2 ** 63)

            def randn(*shape, g=g):
                return torch.randn(*shape, generator=g, dtype=torch.float64)

            def rand(*shape, g=g):
                return torch.rand(*shape, generator=g, dtype=torch.float64)

            module, leaf = owners[id(p)]
            value = None
            if isinstance(module, nn.LayerNorm) or type(module).__name__ in ("LayerNorm", "LayerNorm2d"):
                value = 1 + 0.5 * randn(p.shape) if leaf == "weight" else 0.5 * randn(p.shape)
            elif leaf in ("gamma1", "gamma2"):
                value = 0.2 + rand(p.shape)
            elif isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and leaf == "bias":
                value = 0.2 * randn(p.shape)
            elif key == "head.weight":
                value = randn(p.shape) / p.shape[1] ** 0.5
            elif leaf == "mask_token":
                value = randn(p.shape)
            elif leaf == "alphas":
                sign = torch.where(rand(p.shape) < 0.5, -1.0, 1.0)
                value = sign * (0.3 + 1.2 * rand(p.shape))
                if alphas == "mixed":  # per level: channel 0 at 0, 1-2 below ALPHA_MIN, 3-4 around it
                    d = p.shape[-1]
                    value[:, 0] = 0.0
                    value[:, 1:3] = sign[:, 1:3] * ALPHA_MIN * rand(p.shape[0], 2) * 0.9
                    value[:, 3:5] = sign[:, 3:5] * ALPHA_MIN * (0.5 + 1.5 * rand(p.shape[0], 2))
                    assert d > 5, "mixed alphas need more than 5 channels"
            if value is not None:
                p.copy_(value.to(p.dtype))
    return model
