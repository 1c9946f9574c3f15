"""Shared pieces of the detectron2 tests: the demo config shrunk to test size, and a
miniature built-in dataset."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "projects", "RevColV2", "configs", "demo", "mask_rcnn_revcolv2_tiny_shapes.py")
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")

SIZE = 128
# the demo config at 128x128 with a 32-wide backbone: seconds per iteration on a CPU
TINY_OVERRIDES = [
    "model.backbone.bottom_up.embed_dim=32",
    "model.backbone.bottom_up.num_heads=2",
    f"model.backbone.square_pad={SIZE}",
    f"model.backbone.bottom_up.square_pad={SIZE}",
    f"dataloader.train.mapper.augmentations.1.target_height={SIZE}",
    f"dataloader.train.mapper.augmentations.1.target_width={SIZE}",
    f"dataloader.train.mapper.augmentations.2.crop_size=[{SIZE},{SIZE}]",
    f"dataloader.test.mapper.augmentations.0.short_edge_length={SIZE}",
    f"dataloader.test.mapper.augmentations.0.max_size={SIZE}",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
]

MINI_SPLITS = {"train": (12, 0), "val": (6, 1)}


def make_mini_shapes(root: str) -> str:
    """A few-image copy of the built-in dataset under ``root`` (what the tools find there)."""
    from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes

    return ensure_synthetic_shapes(root, MINI_SPLITS)


def run_tool(args, datasets_root: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a tool in a subprocess with the built-in datasets under ``datasets_root``."""
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
