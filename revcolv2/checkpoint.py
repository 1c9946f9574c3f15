"""Checkpoint loading: safe loads, and loads that report every key they could not use.

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

Writing checkpoints atomically is :mod:`revcolv2.atomic_io`'s job; the ``last_checkpoint``
pointer and finding the checkpoint to resume are :mod:`revcolv2.run_checkpoints`'.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

# Tensors that exist only in MIM pre-training; fine-tuning may leave them unused.
PRETRAIN_ONLY_PREFIXES = ("mask_token", "decoder_pred", "decoder_norm")


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


def _numpy_frombuffer() -> Any:
    """numpy's ``_frombuffer(buffer, dtype, shape, order)``: how an ndarray pickled with
    protocol 5 (``pickle.HIGHEST_PROTOCOL``) is rebuilt (an array over the pickled bytes)."""
    try:
        from numpy.core import numeric
    except ImportError:  # pragma: no cover - numpy 2 without the numpy.core alias
        from numpy._core import numeric
    return numeric._frombuffer


def _torch_safe_globals() -> List[Any]:
    """:func:`_numpy_globals` for ``torch.load``, also under the other numpy major version's
    module name (``numpy.core`` in 1.x, ``numpy._core`` in 2.x), so files from either load."""
    out: List[Any] = _numpy_globals()
    for obj in out[:2]:  # _reconstruct, scalar
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if module != obj.__module__:
                out.append((obj, f"{module}.{obj.__name__}"))
    frombuffer = _numpy_frombuffer()
    out += [(frombuffer, f"{module}._frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    return out


def _pickle_names() -> Dict[Tuple[str, str], Any]:
    """(module, name) -> object for :class:`RestrictedUnpickler`, under numpy 1.x and 2.x
    spellings, for every pickle protocol: protocols 0-2 write ``bytes`` through
    ``_codecs.encode``, protocol 5 writes arrays through numpy's ``_frombuffer``."""
    import codecs
    import collections

    names: Dict[Tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict,
                                         ("_codecs", "encode"): codecs.encode}
    for obj in _numpy_globals():
        name = obj.__qualname__ if hasattr(obj, "__qualname__") else obj.__name__
        module = obj.__module__
        names[(module, name)] = obj
        for alias in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if module.endswith("multiarray"):
                names[(alias, name)] = obj
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        names[(module, "_frombuffer")] = _numpy_frombuffer()
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
    numbers, strings, plain containers and numpy arrays, or whose top level is not a dict
    (a checkpoint always is). ``mmap=True`` maps the tensors
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
                loaded = RestrictedUnpickler(f, encoding="latin1").load()
        else:
            if mmap:
                import zipfile

                mmap = zipfile.is_zipfile(path)  # torch maps only its zip format; a truncated one is no zip
            with torch.serialization.safe_globals(_torch_safe_globals()):
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    if not isinstance(loaded, Mapping):
        # every checkpoint this reads (ours, timm's, detectron2's .pth and .pkl) is a dict; a few
        # bytes of junk can still be a valid pickle of a number or a string
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(loaded).__name__}, not a dict")
    return loaded


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


class ShapeMismatchError(ValueError):
    """A checkpoint tensor whose shape differs from the model's; ``source`` is the file."""

    def __init__(self, message: str, source: str):
        super().__init__(message)
        self.source = source


def check_shapes(sd: Mapping[str, Any], own: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`ShapeMismatchError` (a ``ValueError``) naming the first tensor whose
    shape differs from the model's."""
    for k, v in sd.items():
        if k in own and hasattr(v, "shape") and tuple(own[k].shape) != tuple(v.shape):
            raise ShapeMismatchError(
                f"{source}: checkpoint tensor {k!r} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(own[k].shape)}: the checkpoint is for a different model size", source
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


def group_keys(keys: Iterable[str], limit: int = 16) -> str:
    """Tensor names grouped by the part of the model that holds them, with counts: a
    column's level (``columns.2.levels.0.* (14)``), else their module cut after two name
    parts (``decoder_pred.* (2)``, ``roi_heads.box_head.* (12)``, ``mask_token``); at most
    ``limit`` groups shown, then how many more."""
    groups: Dict[str, int] = {}
    for k in keys:
        module = k.split(".")[:-1]
        module = module[:4] if module[:1] == ["columns"] else module[:2]
        group = ".".join(module) + ".*" if module else k
        groups[group] = groups.get(group, 0) + 1
    shown = [f"{g} ({n})" if n > 1 else g for g, n in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")
