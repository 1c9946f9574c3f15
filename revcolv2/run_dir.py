"""A run's output folder: holding it for one run (a lock) and refusing to overwrite a run,
atomic checkpoint writes and the ``last_checkpoint`` pointer, finding the checkpoint to
resume, removing what killed writes left behind, trimming the metrics log to a resumed
step (strict JSON lines), checkpoint retention, the best score, the written config.

Reading a checkpoint file safely is :mod:`revcolv2.checkpoint`'s job."""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import yaml

from .checkpoint import CheckpointError, load_file
from .distributed import DistInfo, barrier

_EPOCH_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.pth$")
_RESUME_POINT = re.compile(r"^checkpoint-(\d+|last)\.pth$")
LOG_FILE = "log.jsonl"
LAST_CHECKPOINT_FILE = "last_checkpoint"
TMP_PREFIX = ".tmp_"
LOCK_FILE = ".run.lock"


class RunFolderError(SystemExit):
    """The output folder cannot be used as asked. A ``SystemExit``: the tools stop with this
    one-line message (status 1), which says what to do, instead of a traceback."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RunExistsError(RunFolderError):
    """The output folder already holds a run; the message says how to continue or replace it."""


class RunInUseError(RunFolderError):
    """Another live process trains into the output folder; the message names its pid."""


class DiskFullError(RunFolderError):
    """A checkpoint write found the disk full (ENOSPC); the previous checkpoint is intact."""


@dataclass(frozen=True)
class RunLayout:
    """What a tool family leaves in its output folder, and how its command line continues a run."""

    is_run_file: Callable[[str], bool]  # file name -> whether it belongs to a training run
    resume: str      # the option that continues the run
    elsewhere: str   # how to write somewhere else
    restart: str     # where --overwrite starts again
    deleted: str     # what --overwrite deletes, in words


# tools/pretrain.py, finetune.py, linear_probe.py (checkpoint-best.pth is not part of it:
# a new run replaces it only with a better model)
CLASSIFICATION_RUN = RunLayout(
    is_run_file=lambda n: bool(_RESUME_POINT.match(n)) or n in (LAST_CHECKPOINT_FILE, LOG_FILE),
    resume="--resume auto", elsewhere="write to a new --output-dir", restart="step 0",
    deleted="its checkpoints and log")


def run_files(output_dir: str, layout: RunLayout = CLASSIFICATION_RUN) -> List[str]:
    """The files in ``output_dir`` that make it hold a training run of ``layout``'s tools
    (resume points, the pointer, the metrics log), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if layout.is_run_file(n))


def check_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, info: Optional["DistInfo"] = None,
                     layout: RunLayout = CLASSIFICATION_RUN) -> None:
    """Refuse to start a new run over an existing one.

    Without ``--resume`` a folder holding a run is an error that offers ``--resume``,
    another output folder or ``--overwrite``. With ``--overwrite`` the old run's files
    (:func:`run_files`) are removed and named. Called before the run writes anything.
    """
    info = info or DistInfo()
    if resume:
        return
    found = run_files(output_dir, layout)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise RunExistsError(
            f"{output_dir} already holds a run ({shown}). Continue it with {layout.resume}, "
            f"{layout.elsewhere}, or pass --overwrite to start again from {layout.restart} "
            f"({layout.deleted} will be deleted)."
        )
    barrier(info)  # every rank has looked before the main process deletes
    if info.is_main:
        for name in found:
            os.remove(os.path.join(output_dir, name))
        print(f"--overwrite: removed {len(found)} file(s) of the previous run in {output_dir}: {', '.join(found)}")
    barrier(info)


def make_output_dir(output_dir: str, option: str = "--output-dir") -> None:
    """Create ``output_dir`` (and its parents), or stop with one line that names ``option``
    and the path: a symbolic link to a folder that does not exist, a file in the way, no
    permission."""
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise RunFolderError(
            f"{option} {output_dir} is a symbolic link to {os.readlink(output_dir)}, which does not exist: "
            f"create that folder, or give {option} another path")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"{option} {output_dir}: cannot create the folder ({e.strerror}: {e.filename})") from None


@contextmanager
def claim_output_dir(output_dir: str, resume: Optional[str], overwrite: bool, info: Optional["DistInfo"] = None,
                     layout: RunLayout = CLASSIFICATION_RUN, option: str = "--output-dir"):
    """Hold ``output_dir`` for one run: create it, take its lock (:func:`locked_run_dir`,
    on the main process), then refuse or clear an earlier run (:func:`check_output_dir`).
    The lock is released when the ``with`` block ends, or by the OS when the process dies."""
    info = info or DistInfo()
    with locked_run_dir(output_dir, info, option):
        check_output_dir(output_dir, resume, overwrite, info, layout)
        yield


@contextmanager
def locked_run_dir(output_dir: str, info: Optional["DistInfo"] = None, option: str = "--output-dir"):
    """An exclusive ``fcntl.flock`` on ``output_dir/.run.lock`` for the ``with`` block, taken
    by the main process only (ranks of one run share the folder). A second run into the
    same folder stops with :class:`RunInUseError` naming the holder's pid and host. The OS
    drops the lock when its process dies, so ``kill -9`` leaves no stale lock. (``flock``
    over NFS is as reliable as the NFS client; on a local disk it is exact.)"""
    info = info or DistInfo()
    if not info.is_main:
        yield
        return
    make_output_dir(output_dir, option)
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that left no pid"
            raise RunInUseError(
                f"{output_dir} is in use by another run ({holder}): two runs in one folder would overwrite "
                f"each other's checkpoints. Wait for it to end, stop it, or give {option} another path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


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


def json_line(record: Dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: NaN and infinities, which JSON has no
    spelling for (Python would write the invalid tokens ``NaN`` / ``Infinity``), become
    ``null``."""
    return json.dumps(json_compatible(record), allow_nan=False)


def json_compatible(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, in nested dicts,
    lists and tuples too."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_compatible(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_compatible(v) for v in obj]
    return obj


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JsonLines(NamedTuple):
    kept: List[str]       # the lines to keep, as they were
    past: int             # records dropped by ``keep``
    malformed: List[int]  # line numbers (1-based) of the malformed records, dropped too


def split_json_lines(path: str, key: str, keep: Callable[[float], bool], log=print) -> JsonLines:
    """Sort the lines of the JSON-lines log ``path`` into kept and dropped.

    A record keeps its line when it has no ``key`` or when ``keep(record[key])`` is true. A
    line that is not a JSON object (cut short by a kill, edited by hand) or whose ``key`` is
    not a number is malformed: it is dropped, and one warning through ``log`` counts such
    lines and names the file and their line numbers.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    kept, past, malformed = [], 0, []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or (key in record and not _is_number(record[key])):
            malformed.append(number)
        elif key in record and not keep(record[key]):
            past += 1
        else:
            kept.append(line)
    if malformed and log is not None:
        shown = ", ".join(map(str, malformed[:10])) + (" ..." if len(malformed) > 10 else "")
        log(f"warning: {path}: skipped {len(malformed)} malformed record(s) (not a JSON object, or "
            f"'{key}' not a number) at line(s) {shown}")
    return JsonLines(kept, past, malformed)


def trim_log(path: str, step: int, log=print) -> int:
    """Drop the records of a JSON-lines log whose ``step`` is past ``step`` (they belong to
    training that a resume repeats), and its malformed records (with a warning naming
    them, see :func:`split_json_lines`). Returns how many records past ``step`` were dropped."""
    if not os.path.isfile(path):
        return 0
    lines = split_json_lines(path, "step", lambda s: s <= step, log)
    if lines.past or lines.malformed:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in lines.kept))
        os.replace(tmp, path)
    return lines.past


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


# --------------------------------------------------------------------------- saving
def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact; the temporary file
    (``.tmp_<pid>_*.pth``) is removed at once on an error, or by
    :func:`remove_stale_temporaries` at the next start after a kill. The file's mode is the
    one ``torch.save(obj, path)`` gives: 0666 less the umask. A full disk (ENOSPC, or a
    quota: EDQUOT) is a :class:`DiskFullError` naming the file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temporary(folder, ".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _disk_full(e):
            raise DiskFullError(
                f"no space left on the device (ENOSPC) while writing {path}; the file was not replaced and "
                f"the previous checkpoint is intact. Free space in {folder} (or lower the checkpoints kept), "
                "then resume") from e
        raise


def _create_temporary(folder: str, suffix: str) -> Tuple[int, str]:
    """(fd, path) of a new, empty ``.tmp_<pid>_<random><suffix>`` in ``folder``, opened for
    writing. Created with mode 0666, which the umask then narrows, as ``open(path, "w")``
    does: ``tempfile.mkstemp``'s 0600 would keep the others of a team out of a shared run
    folder once the file is renamed into place."""
    while True:
        path = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}_{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:  # 2**48 names: practically never
            continue


def follow_umask(path: str) -> None:
    """Give ``path`` the mode a plain ``open(path, "w")`` would have given it (0666 less the
    umask), for files that a library wrote 0600 (safetensors does)."""
    os.chmod(path, 0o666 & ~current_umask())


def current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux reports it (setting
    it to read it back, the portable way, is not safe while other threads create files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it arose from is ENOSPC / EDQUOT (torch.save reports
    a failed write as a RuntimeError whose context is the OSError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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
