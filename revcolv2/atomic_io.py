"""Files written whole or not at all: a checkpoint or a small text file goes to a temporary
file beside its destination and is renamed over it, with the mode a plain write would give
(0666 less the umask). A full disk is a one-line :class:`DiskFullError`; what killed
writers left behind is removed by :func:`remove_stale_temporaries`.

A leaf: it imports nothing of the project, so every module that writes a file may use it."""
from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch

TMP_PREFIX = ".tmp_"


class DiskFullError(SystemExit):
    """A write found the disk full (ENOSPC, or a quota: EDQUOT); the file it would have
    replaced is intact. A ``SystemExit``: the tools stop with this one-line message (status
    1), which names the file and says what to do, instead of a traceback."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous checkpoint intact; the temporary file
    (``.tmp_<pid>_*.pth``) is removed at once on an error, or by
    :func:`remove_stale_temporaries` at the next start after a kill. The file's mode is the
    one ``torch.save(obj, path)`` gives: 0666 less the umask. A full disk (ENOSPC, or a
    quota: EDQUOT) is a :class:`DiskFullError` naming the file.
    """
    _replace(path, ".pth", lambda f: torch.save(obj, f),
             "the file was not replaced and the previous checkpoint is intact. Free space in {folder} "
             "(or lower the checkpoints kept), then resume")


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a uniquely named temporary file renamed over
    it, as :func:`save_atomic` writes a checkpoint: a reader sees the old text or the new,
    never a part, and two writers never share a temporary file."""
    _replace(path, "_" + os.path.basename(path), lambda f: f.write(text.encode()),
             "the file was not replaced. Free space in {folder}, then run again")


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` as :func:`write_text_atomic` writes text (a drawing, an
    encoded image): whole or not at all, and a link at ``path`` is replaced, not followed."""
    _replace(path, "_" + os.path.basename(path), lambda f: f.write(data),
             "the file was not replaced. Free space in {folder}, then run again")


def open_append(path: str):
    """``open(path, "a")`` for a log that a run appends to in place, without following a
    symbolic link at ``path`` (``O_NOFOLLOW``): in a shared run folder a link planted there
    would make the run write into its target. A link is an ``OSError`` (ELOOP) naming it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, f"{path} is a symbolic link; refusing to append to it", path) from None
        raise
    return os.fdopen(fd, "a")


def _replace(path: str, suffix: str, write: Callable[[Any], Any], when_full: str) -> None:
    """``write(binary file)`` into a new temporary file beside ``path``, flushed to the disk,
    then renamed over ``path``; on any error the temporary file is removed, and a full disk
    becomes a :class:`DiskFullError` ending with ``when_full`` (``{folder}`` filled in)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temporary(folder, suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if _disk_full(e):
            raise DiskFullError(f"no space left on the device (ENOSPC) while writing {path}; "
                                + when_full.format(folder=folder)) from e
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


def inputs_replaced(outputs: Iterable[str], inputs: Iterable[str]) -> List[Tuple[str, str]]:
    """(output, input) for each output path whose writing would replace an input file: the
    same file after symbolic links are resolved, or another name of it (a hard link). The
    tools refuse these before they write anything: no tool writes over its input."""
    by_path: Dict[str, str] = {}
    by_inode: Dict[Tuple[int, int], str] = {}
    for p in inputs:
        if p and os.path.exists(p):
            by_path[os.path.realpath(p)] = p
            st = os.stat(p)
            by_inode[(st.st_dev, st.st_ino)] = p
    clashes = []
    for out in outputs:
        hit = by_path.get(os.path.realpath(out))
        if hit is None and os.path.exists(out):
            st = os.stat(out)
            hit = by_inode.get((st.st_dev, st.st_ino))
        if hit is not None:
            clashes.append((out, hit))
    return clashes


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
