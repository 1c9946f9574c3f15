"""A run's checkpoint files: the ``last_checkpoint`` pointer, finding the checkpoint to
resume (``--resume auto``, detectron2's ``--resume``), retention of the epoch checkpoints
and the score of ``checkpoint-best.pth``.

Reading one checkpoint file safely is :mod:`revcolv2.checkpoint`'s job; writing one is
:func:`revcolv2.atomic_io.save_atomic`'s."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .atomic_io import write_text_atomic
from .checkpoint import CheckpointError, load_file

LAST_CHECKPOINT_FILE = "last_checkpoint"
_EPOCH_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pth$")


# --------------------------------------------------------------------------- resume pointer
def write_last_checkpoint(folder: str, filename: str) -> None:
    """Record ``filename`` (a file in ``folder``) as the run's resume point, atomically."""
    write_text_atomic(os.path.join(folder, LAST_CHECKPOINT_FILE), os.path.basename(filename))


def read_last_checkpoint(folder: str) -> Optional[str]:
    """The file the ``last_checkpoint`` pointer of ``folder`` names (None without a pointer).

    The pointer may only name a file inside ``folder``: an absolute path, a path with a
    folder part or ``..`` raises :class:`CheckpointError` naming the pointer. The file
    itself may be missing (the caller decides).
    """
    pointer = os.path.join(folder, LAST_CHECKPOINT_FILE)
    try:
        with open(pointer) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} is unreadable: {e}") from None
    if not name:
        return None
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if os.path.isabs(name) or any(s in name for s in seps) or name in (".", ".."):
        raise CheckpointError(
            f"{pointer} names {name!r}, which is not a file inside {folder}: refusing to load it. "
            "The pointer may only name a checkpoint in its own folder; delete or correct it"
        )
    return os.path.join(folder, name)


# --------------------------------------------------------------------------- the checkpoint to resume
def newest_readable_checkpoint(candidates: Iterable[str], step_key: str, pointed: Optional[str] = None,
                               required: Iterable[str] = (), log=print) -> Optional[Tuple[str, int]]:
    """(path, step) of the checkpoint to resume: the ``pointed`` one (what ``last_checkpoint``
    names) when it is a readable checkpoint holding ``step_key`` and the ``required`` keys;
    otherwise the candidate with the highest ``ckpt[step_key]`` (then the newest file), with
    a line that says so; None when no candidate is such a checkpoint.

    The pointer wins over a higher step: a run rolled back to an earlier checkpoint and
    continued points at its own newest checkpoint, while the abandoned branch's files (a
    higher step) may still be in the folder. Each candidate is memory-mapped, not read, so
    this costs little even for large files; an unreadable one (truncated, corrupt, not a
    checkpoint) is skipped with a warning naming it, which is how a resume falls back past
    a write that was cut short.
    """
    say = log or (lambda *a, **k: None)
    required = tuple(required)

    def step_of(path: str) -> Optional[int]:
        if not os.path.isfile(path):
            if path == pointed:
                say(f"warning: {LAST_CHECKPOINT_FILE} names {path}, which does not exist")
            return None
        try:
            ckpt = load_file(path, mmap=True)
        except (CheckpointError, OSError) as e:
            say(f"warning: skipping an unreadable checkpoint: {e}")
            return None
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get(step_key), int)
                and all(k in ckpt for k in required)):
            return None  # e.g. checkpoint-best.pth: weights only, not a resume point
        return ckpt[step_key]

    if pointed:
        step = step_of(pointed)
        if step is not None:
            return pointed, step
    best: Optional[Tuple[tuple, str]] = None
    for path in candidates:
        if path == pointed:
            continue
        step = step_of(path)
        if step is not None and (best is None or (step, os.path.getmtime(path)) > best[0]):
            best = ((step, os.path.getmtime(path)), path)
    if best is None:
        return None
    if pointed:
        say(f"resuming from {best[1]} ({step_key} {best[0][0]}), the readable checkpoint with the highest "
            f"{step_key}: {pointed}, which {LAST_CHECKPOINT_FILE} names, cannot be resumed")
    return best[1], best[0][0]


def find_resume_checkpoint(resume: Optional[str], output_dir: str, verbose: bool = True) -> Optional[str]:
    """``--resume``: a path, ``auto`` (the run's resume point in ``output_dir``) or None.

    ``auto`` takes the checkpoint the ``last_checkpoint`` pointer names. Without a pointer,
    or when the file it names is missing or unreadable (truncated, corrupt, not a
    checkpoint), it takes the ``checkpoint-*.pth`` with the highest ``step`` and says so
    (:func:`newest_readable_checkpoint`), so a write cut short falls back to the previous
    good checkpoint. A pointer naming a file outside ``output_dir`` is an error. Returns
    None (and says so) when nothing is there.
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


# --------------------------------------------------------------------------- retention, best score
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


def read_best(output_dir: str, key: str = "top1") -> Optional[Dict[str, Any]]:
    """``{"top1", "epoch"}`` of an existing ``checkpoint-best.pth`` (read memory-mapped), or
    None when there is none or it cannot be read."""
    path = os.path.join(output_dir, "checkpoint-best.pth")
    if not os.path.isfile(path):
        return None
    try:
        ckpt = load_file(path, mmap=True)
        value = float(ckpt["best"][key]) if "best" in ckpt else float(max(
            ckpt["metrics"].get(key, -1.0), ckpt["metrics"].get("ema_" + key, -1.0)))
        return {key: value, "epoch": int(ckpt.get("epoch", 0))}
    except Exception as e:  # noqa: BLE001 - any unreadable file: warn, do not crash the run
        print(f"warning: cannot read the score of {path} ({type(e).__name__}: {e}); "
              "a new best model will replace it")
        return None
