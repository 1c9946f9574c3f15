"""Checkpoint I/O: safe loads, atomic saves, and loads that report every key they could not use.

Every file is read without running code from it:

- ``.pth`` (and any other name) goes through ``torch.load(weights_only=True)``, which builds
  only tensors, numbers, strings, plain containers and, for checkpoints that hold them
  (older RevColV2 training checkpoints, detectron2 files), numpy arrays and scalars;
- ``.pkl`` (detectron2 model-zoo pickles) goes through :class:`RestrictedUnpickler`, which
  allows the same numpy types and nothing else.

A file holding anything else is refused with :class:`CheckpointError` naming it, as is a
file that is empty, truncated or not a checkpoint at all.

One rule for which weights a checkpoint provides (:func:`select_weights`): the EMA weights
(``model_ema``) where the checkpoint has them, unless the caller asks for the raw ones
(``ema=False``, ``--no-ema`` on the command line); the choice is printed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

# Tensors that exist only in MIM pre-training; fine-tuning may leave them unused.
PRETRAIN_ONLY_PREFIXES = ("mask_token", "decoder_pred", "decoder_norm")
LAST_CHECKPOINT_FILE = "last_checkpoint"
TMP_PREFIX = ".tmp_"


class CheckpointError(ValueError):
    """A file that cannot (or must not) be loaded as a checkpoint; the message names it."""


# --------------------------------------------------------------------------- safe loading
def _numpy_globals() -> List[Any]:
    """The numpy callables/classes a pickled ndarray or numpy scalar needs, and no others."""
    try:
        from numpy.core import multiarray
    except ImportError:  # pragma: no cover - numpy 2 without the numpy.core alias
        from numpy._core import multiarray
    out: List[Any] = [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype]
    out += sorted({type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                              np.uint16, np.uint32, np.uint64, np.float16, np.float32,
                                              np.float64)} - {np.dtype}, key=lambda c: c.__name__)
    return out


def _torch_safe_globals() -> List[Any]:
    """:func:`_numpy_globals` for ``torch.load``, also under the other numpy major version's
    module name (``numpy.core`` in 1.x, ``numpy._core`` in 2.x), so files from either load."""
    out: List[Any] = _numpy_globals()
    for obj in out[:2]:  # _reconstruct, scalar
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if module != obj.__module__:
                out.append((obj, f"{module}.{obj.__name__}"))
    return out


def _pickle_names() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object for :class:`RestrictedUnpickler`, under numpy 1.x and 2.x spellings."""
    import collections

    names: Dict[Tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    for obj in _numpy_globals():
        name = obj.__qualname__ if hasattr(obj, "__qualname__") else obj.__name__
        module = obj.__module__
        names[(module, name)] = obj
        for alias in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if module.endswith("multiarray"):
                names[(alias, name)] = obj
    return names


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that builds only plain containers, numbers, strings, bytes and
    numpy arrays/scalars; any other global (``os.system``, ``builtins.exec``, a class with
    ``__reduce__``...) is an ``UnpicklingError``."""

    _allowed: Optional[Dict[Tuple[str, str], Any]] = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _pickle_names()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


# words of torch's / our unpickler's message when a file asks for a callable outside the allowlist
_REFUSAL_WORDS = ("unsupported global", "is blocked", "not allowed", "unsupported operand")


def _is_refusal(exc: BaseException) -> bool:
    return any(w in str(exc).lower() for w in _REFUSAL_WORDS)


def _describe(exc: BaseException) -> str:
    """The informative line of torch's long weights-only message (or the whole message)."""
    text = str(exc)
    for line in text.splitlines():
        line = line.strip()
        if any(w in line.lower() for w in _REFUSAL_WORDS):
            return line
    return " ".join(text.split())[:300]


def load_file(path: "os.PathLike | str", mmap: bool = False) -> Any:
    """Read a checkpoint file without running code from it.

    Raises ``FileNotFoundError`` or :class:`CheckpointError`, both naming ``path``, for a
    missing, empty, truncated or corrupt file, or one that holds anything but tensors,
    numbers, strings, plain containers and numpy arrays. ``mmap=True`` maps the tensors
    instead of reading them (a cheap check that a ``.pth`` file is whole).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted copy or write?)")
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return RestrictedUnpickler(f, encoding="latin1").load()
        if mmap:
            import zipfile

            mmap = zipfile.is_zipfile(path)  # torch maps only its zip format; a truncated one is no zip
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if _is_refusal(e):
            raise CheckpointError(
                f"refusing to load {path}: it holds Python objects other than tensors, numbers, strings, "
                f"plain containers and numpy arrays ({_describe(e)}). Unpickling them could run arbitrary "
                "code; RevColV2 never writes such objects, so this file did not come from this project"
            ) from None
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated): {_describe(e)}") from None
    except (RuntimeError, EOFError, ValueError, UnicodeDecodeError, AttributeError, IndexError,
            TypeError, OSError, KeyError, MemoryError, OverflowError) as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or not a PyTorch/pickle file): "
            f"{type(e).__name__}: {_describe(e)}"
        ) from None


# --------------------------------------------------------------------------- which weights
def select_weights(checkpoint: Any, ema: bool = True, source: str = "checkpoint",
                   log=print) -> Tuple[Dict[str, torch.Tensor], str]:
    """The one rule for the weights a checkpoint provides; returns (state dict, what was taken).

    - ``model_ema`` (EMA weights) where the checkpoint has them, unless ``ema=False``;
    - else ``model``, else ``state_dict``, else the checkpoint itself (a raw state dict).
    A DDP ``module.`` prefix is stripped. ``log`` (``print`` by default; ``None`` for silence)
    receives one line saying which weights were taken from ``source``.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a state dict")
    has = {k for k in ("model_ema", "model", "state_dict") if isinstance(checkpoint.get(k), Mapping)}
    if "model_ema" in has and (ema or has == {"model_ema"}):
        key = "model_ema"
        note = "its EMA weights" + (" (--no-ema / ema=False takes 'model')" if "model" in has else "")
        if not ema:
            note = "its EMA weights, the only weights it holds"
    elif "model" in has:
        key = "model"
        note = "its raw weights" + (" (no EMA weights in it)" if ema else " (EMA not wanted)")
    elif "state_dict" in has:
        key, note = "state_dict", "its weights"
    else:
        key, note = "", "a plain state dict"
    sd = checkpoint[key] if key else checkpoint
    if log is not None:
        log(f"weights: {source}: {note}" + (f" ['{key}']" if key else ""))
    return strip_ddp_prefix(sd, source), key or "state dict"


def strip_ddp_prefix(sd: Mapping[str, Any], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    bad = [k for k in sd if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict: key {bad[0]!r} is not a tensor name")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def unwrap_state_dict(checkpoint: Any, ema: bool = True) -> Dict[str, torch.Tensor]:
    """Accept a raw state dict or the common wrappers; :func:`select_weights` without the
    printed line."""
    return select_weights(checkpoint, ema=ema, log=None)[0]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: unwrap and drop the pre-training-only tensors."""
    sd = unwrap_state_dict(state_dict)
    return {k: v for k, v in sd.items() if not k.startswith(PRETRAIN_ONLY_PREFIXES)}


def check_shapes(sd: Mapping[str, Any], own: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming the first tensor whose shape differs from the model's."""
    for k, v in sd.items():
        if k in own and hasattr(v, "shape") and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{source}: checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)}: the checkpoint is for a different model size"
            )


@dataclass
class LoadReport:
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing in checkpoint ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unused from checkpoint ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        return "\n".join(lines)


def load_checkpoint(
    model: nn.Module,
    checkpoint: Any,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
    verbose: bool = True,
    ema: bool = True,
    source: Optional[str] = None,
) -> LoadReport:
    """Load a path or (wrapped) state dict into ``model`` and report what matched.

    Weights follow :func:`select_weights` (EMA where present unless ``ema=False``). A tensor
    whose shape differs from the model's raises ``ValueError`` naming it (a checkpoint of
    another size). Missing/unexpected keys are errors unless they start with one of the
    ``allow_*`` prefixes; either way they are listed in the returned report. Errors name
    the file (or ``source``, the file a given state dict came from).
    """
    source, from_file = source or "state dict", isinstance(checkpoint, (str, os.PathLike))
    if from_file:
        source = os.fspath(checkpoint)
        checkpoint = load_file(source)
    wrapped = isinstance(checkpoint, Mapping) and any(isinstance(checkpoint.get(k), Mapping)
                                                      for k in ("model_ema", "model", "state_dict"))
    sd, _ = select_weights(checkpoint, ema=ema, source=source,
                           log=print if verbose and (from_file or wrapped) else None)
    own = model.state_dict()
    check_shapes(sd, own, source)
    report = LoadReport(
        loaded=[k for k in own if k in sd],
        missing=[k for k in own if k not in sd],
        unexpected=[k for k in sd if k not in own],
    )
    bad_missing = [k for k in report.missing if not k.startswith(tuple(allow_missing))]
    bad_unexpected = [k for k in report.unexpected if not k.startswith(tuple(allow_unexpected))]
    if bad_missing or bad_unexpected:
        raise ValueError(f"{source} does not match the model:\n{report}")
    model.load_state_dict({k: sd[k] for k in report.loaded}, strict=False)
    if verbose:
        print(report)
    return report


# --------------------------------------------------------------------------- saving
def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact; the temporary file
    (``.tmp_<pid>_*.pth``) is removed by :func:`remove_stale_temporaries` at the next start.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: "os.PathLike | str", prefix: str = TMP_PREFIX) -> List[str]:
    """Delete what killed writers left in ``folder``: entries named ``<prefix>[_]<pid>_*``
    whose process no longer runs on this machine, and ``<prefix>*`` entries without a pid
    (written by older versions). Returns the removed paths (each is also printed)."""
    import re
    import shutil

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(prefix):
            continue
        m = re.match(r"_?(\d+)_", name[len(prefix):])
        if m and _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
        print(f"removed {path}: left behind by an interrupted write")
    return removed


# --------------------------------------------------------------------------- resume pointer
def write_last_checkpoint(folder: str, filename: str) -> None:
    """Record ``filename`` (a file in ``folder``) as the run's resume point, atomically."""
    name = os.path.basename(filename)
    pointer = os.path.join(folder, LAST_CHECKPOINT_FILE)
    tmp = os.path.join(folder, f".{LAST_CHECKPOINT_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(name)
    os.replace(tmp, pointer)


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


def newest_readable_checkpoint(candidates: Iterable[str], step_key: str, pointed: Optional[str] = None,
                               required: Iterable[str] = (), log=print) -> Optional[Tuple[str, int]]:
    """(path, step) of the candidate with the highest ``ckpt[step_key]``, the ``pointed``
    one on a tie (then the newest file); None when no candidate is a readable checkpoint
    holding ``step_key`` and the ``required`` keys.

    Each candidate is memory-mapped, not read, so this costs little even for large files;
    an unreadable one (truncated, corrupt, not a checkpoint) is skipped with a warning
    naming it, which is how a resume falls back past a write that was cut short.
    """
    say = log or (lambda *a, **k: None)
    best: Optional[Tuple[tuple, str]] = None
    for path in candidates:
        if not os.path.isfile(path):
            if path == pointed:
                say(f"warning: {LAST_CHECKPOINT_FILE} names {path}, which does not exist")
            continue
        try:
            ckpt = load_file(path, mmap=True)
        except (CheckpointError, OSError) as e:
            say(f"warning: skipping an unreadable checkpoint: {e}")
            continue
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get(step_key), int)
                and all(k in ckpt for k in required)):
            continue  # e.g. checkpoint-best.pth: weights only, not a resume point
        key = (ckpt[step_key], path == pointed, os.path.getmtime(path))
        if best is None or key > best[0]:
            best = (key, path)
        del ckpt
    if best is None:
        return None
    if pointed and best[1] != pointed:
        say(f"resuming from {best[1]} ({step_key} {best[0][0]}), the newest readable checkpoint, "
            f"not from {pointed}, which {LAST_CHECKPOINT_FILE} names")
    return best[1], best[0][0]
