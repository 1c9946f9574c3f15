"""Seeding and the exact save / restore of every RNG a run draws from (Python, NumPy,
torch, CUDA), in a form a checkpoint loads with ``weights_only=True``."""
from __future__ import annotations

import random
from typing import Any, Dict, List

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """This process's RNG states as tensors and lists only (a checkpoint loads with
    ``weights_only=True``); :func:`set_rng_state` restores them exactly."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state` (also the tuple / ndarray form of older checkpoints)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    npst = state["numpy"]
    if isinstance(npst, dict):
        keys = np.asarray(npst["keys"].numpy() if torch.is_tensor(npst["keys"]) else npst["keys"]).astype(np.uint32)
        npst = (npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(info: DistInfo) -> List[Dict[str, Any]]:
    """Every rank's RNG state, in rank order (on every rank)."""
    mine = rng_state()
    if not info.enabled:
        return [mine]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out
