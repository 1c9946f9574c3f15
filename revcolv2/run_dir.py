"""A run's output folder: refusing to overwrite a run, finding the checkpoint to resume,
trimming the metrics log to a resumed step, checkpoint retention, the best score, the
written config."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Optional

import torch
import yaml

from .checkpoint import LAST_CHECKPOINT_FILE, newest_readable_checkpoint, read_last_checkpoint
from .distributed import DistInfo, barrier


_EPOCH_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pth$")
_RESUME_POINT = re.compile(r"^checkpoint-(\d+|last)\.pth$")
LOG_FILE = "log.jsonl"


class RunExistsError(SystemExit):
    """The output folder already holds a run; the message says how to continue or replace it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_files(output_dir: str) -> List[str]:
    """The files in ``output_dir`` that make it hold a training run (resume points, the
    pointer, the metrics log), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir)
                  if _RESUME_POINT.match(n) or n in (LAST_CHECKPOINT_FILE, LOG_FILE))


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, info: "DistInfo") -> None:
    """Refuse to start a new run over an existing one.

    Without ``--resume`` a folder holding a run is an error that offers ``--resume auto``,
    a new ``--output-dir`` or ``--overwrite``. With ``--overwrite`` the old run's resume
    points, pointer and log are removed (``checkpoint-best.pth`` is kept: the new run
    replaces it only with a better model). Called before anything is written.
    """
    if resume:
        return
    found = run_files(output_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunExistsError(
            f"{output_dir} already holds a run ({shown}). Continue it with --resume auto, "
            f"write to a new --output-dir, or pass --overwrite to start again from step 0 "
            f"(its checkpoints and log will be deleted)."
        )
    barrier(info)  # every rank has looked before the main process deletes
    if info.is_main:
        for name in found:
            os.remove(os.path.join(output_dir, name))
        print(f"--overwrite: removed {len(found)} file(s) of the previous run in {output_dir}: {', '.join(found)}")
    barrier(info)


def prune_checkpoints(output_dir: str, keep_last: int, keep_every: int) -> List[str]:
    """Delete ``checkpoint-NNNN.pth`` files except the ``keep_last`` highest epochs and every
    epoch divisible by ``keep_every`` (0: none). ``keep_last <= 0`` keeps everything.
    Returns the deleted names."""
    if keep_last <= 0 or not os.path.isdir(output_dir):
        return []
    epochs = sorted(int(m.group(1)) for m in map(_EPOCH_CHECKPOINT.match, os.listdir(output_dir)) if m)
    keep = set(epochs[-keep_last:]) | {e for e in epochs if keep_every > 0 and e % keep_every == 0}
    deleted = []
    for e in epochs:
        if e not in keep:
            name = f"checkpoint-{e:04d}.pth"
            try:
                os.remove(os.path.join(output_dir, name))
            except FileNotFoundError:
                continue
            deleted.append(name)
    return deleted


def trim_log(path: str, step: int) -> int:
    """Drop the records of a JSON-lines log whose ``step`` is past ``step`` (they belong to
    training that a resume repeats). Returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill: drop it
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


def read_best(output_dir: str, key: str = "top1") -> Optional[Dict[str, Any]]:
    """``{"top1", "epoch"}`` of an existing ``checkpoint-best.pth`` (read memory-mapped), or
    None when there is none or it cannot be read."""
    path = os.path.join(output_dir, "checkpoint-best.pth")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        value = float(ckpt["best"][key]) if "best" in ckpt else float(max(
            ckpt["metrics"].get(key, -1.0), ckpt["metrics"].get("ema_" + key, -1.0)))
        return {key: value, "epoch": int(ckpt.get("epoch", 0))}
    except Exception as e:  # noqa: BLE001 - any unreadable file: warn, do not crash the run
        print(f"warning: cannot read the score of {path} ({type(e).__name__}: {e}); "
              "a new best model will replace it")
        return None


def find_resume_checkpoint(resume: Optional[str], output_dir: str, verbose: bool = True) -> Optional[str]:
    """``--resume``: a path, ``auto`` (the newest readable checkpoint in ``output_dir``) or None.

    ``auto`` reads the ``step`` of the checkpoint the ``last_checkpoint`` pointer names and of
    every ``checkpoint-*.pth`` beside it, and takes the highest (the pointer's on a tie). An
    unreadable file (truncated, corrupt, not a checkpoint) is skipped with a warning naming
    it, so a write cut short falls back to the previous good checkpoint. A pointer naming a
    file outside ``output_dir`` is an error. Returns None (and says so) when nothing is there.
    """
    if not resume:
        return None
    if resume != "auto":
        if not os.path.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such file")
        return resume
    pointed = read_last_checkpoint(output_dir)
    names = sorted(os.path.join(output_dir, n) for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                   if n.startswith("checkpoint-") and n.endswith(".pth"))
    found = newest_readable_checkpoint(([pointed] if pointed else []) + [p for p in names if p != pointed],
                                       "step", pointed, required=("optimizer",), log=print if verbose else None)
    if found is None:
        if verbose:
            print(f"--resume auto: no resumable checkpoint in {output_dir}; starting from scratch")
        return None
    return found[0]


def write_config(cfg: dict, output_dir: str, info: DistInfo) -> None:
    if info.is_main:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
