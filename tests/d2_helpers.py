"""Shared pieces of the detectron2 tests: the demo config shrunk to test size, a miniature
built-in dataset, training runs through tools/lazyconfig_train_net.py and checks of drawn
overlays."""
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "projects", "RevColV2", "configs", "demo", "mask_rcnn_revcolv2_tiny_shapes.py")
TRAIN_NET = os.path.join(ROOT, "tools", "lazyconfig_train_net.py")

SIZE = 128
# the demo config at 128x128 (its backbone as it is: the revcolv2_tiny preset)
SMALL_INPUTS = [
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
# ... and with a 32-wide backbone: seconds per iteration on a CPU
TINY_OVERRIDES = ["model.backbone.bottom_up.embed_dim=32", "model.backbone.bottom_up.num_heads=2", *SMALL_INPUTS]

MINI_SPLITS = {"train": (12, 0), "val": (6, 1)}


def make_mini_shapes(root: str) -> str:
    """A few-image copy of the built-in dataset under ``root`` (what the tools find there)."""
    from revcolv2_d2.data.synthetic_shapes import ensure_synthetic_shapes

    return ensure_synthetic_shapes(root, MINI_SPLITS)


def run_tool(args, datasets_root: str, timeout: int = 300, env: Optional[Dict[str, str]] = None
             ) -> subprocess.CompletedProcess:
    """Run a tool in a subprocess with the built-in datasets under ``datasets_root`` (and
    ``env`` added to the environment)."""
    env = {**os.environ, "DETECTRON2_DATASETS": datasets_root, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_net(args, datasets_root, timeout: int = 300) -> str:
    """tools/lazyconfig_train_net.py ``args`` in a subprocess on two threads, warnings off;
    returns its stdout + stderr (a failed run fails the test with their tails)."""
    proc = run_tool(["-W", "ignore", TRAIN_NET, *map(str, args)], str(datasets_root), timeout,
                    env={"OMP_NUM_THREADS": "2"})
    return proc.stdout + proc.stderr


def train_metrics(output_dir) -> List[dict]:
    """The records of a training run's ``metrics.json`` (one JSON object a line)."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def train_demo(tmp_path_factory, config: str, overrides, timeout: int = 300) -> Tuple[Path, Path, str]:
    """Train ``config`` with ``overrides`` on the built-in data, in fresh temporary folders for the
    datasets and the output (for module-scoped fixtures); returns (datasets, output dir, log)."""
    datasets, out = tmp_path_factory.mktemp("datasets"), tmp_path_factory.mktemp("train_out")
    log = train_net(["--config-file", config, f"train.output_dir={out}", *overrides], datasets, timeout)
    return datasets, out, log


def copy_val_images(datasets: Path, dest: Path, count: int = 2) -> Path:
    """The first ``count`` validation images of the built-in ADE20K-style dataset, copied into
    the new folder ``dest``."""
    dest.mkdir()
    val = datasets / "synthetic_ade" / "images" / "validation"
    names = sorted(os.listdir(val))[:count]
    assert len(names) == count, f"{val} holds {len(names)} images, {count} wanted"
    for name in names:
        (dest / name).write_bytes((val / name).read_bytes())
    return dest


def assert_overlays_drawn(images: Path, drawn: Path) -> None:
    """``drawn`` holds one picture per image of ``images``, the first at its image's size and
    visibly changed by an overlay."""
    from PIL import Image

    names = sorted(os.listdir(drawn))
    assert len(names) == len(os.listdir(images)), (str(drawn), names)
    original = np.asarray(Image.open(images / sorted(os.listdir(images))[0]).convert("RGB"))
    picture = np.asarray(Image.open(drawn / names[0]).convert("RGB"))
    assert picture.shape == original.shape  # drawn at the image's own size
    assert np.abs(picture.astype(int) - original.astype(int)).mean() > 5  # an overlay was drawn
