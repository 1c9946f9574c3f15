"""A run's output folder: held by one run at a time (a lock naming its holder), and a run
in it never overwritten by accident (refused, or with ``--overwrite`` deleted by name).

What a run writes there has its own modules: checkpoints and the resume pointer
(:mod:`revcolv2.run_checkpoints`), atomic writes (:mod:`revcolv2.atomic_io`), the metrics
log (:mod:`revcolv2.metrics_log`), the config (:func:`revcolv2.config.write_config`)."""
from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Tuple

from .distributed import DistInfo, barrier
from .metrics_log import LOG_FILE
from .run_checkpoints import LAST_CHECKPOINT_FILE

_RESUME_POINT = re.compile(r"^checkpoint-(\d+|last)\.pth$")
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


@dataclass(frozen=True)
class RunLayout:
    """What a tool family leaves in its output folder, and how its command line continues a run."""

    is_run_file: Callable[[str], bool]  # file name -> whether it belongs to a training run
    resume: str      # the option that continues the run
    elsewhere: str   # how to write somewhere else
    restart: str     # where --overwrite starts again
    deleted: str     # what --overwrite deletes, in words
    # the files a run opens in place (appends to, or writes without a rename): a symbolic
    # link among them is refused before the run writes anything (see :func:`refuse_links`)
    in_place: Tuple[str, ...] = ()


# tools/pretrain.py, finetune.py, linear_probe.py (checkpoint-best.pth is not part of it:
# a new run replaces it only with a better model)
CLASSIFICATION_RUN = RunLayout(
    is_run_file=lambda n: bool(_RESUME_POINT.match(n)) or n in (LAST_CHECKPOINT_FILE, LOG_FILE),
    resume="--resume auto", elsewhere="write to a new --output-dir", restart="step 0",
    deleted="its checkpoints and log", in_place=(LOG_FILE,))


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
        if info.is_main:
            refuse_links(output_dir, layout.in_place, option)
        check_output_dir(output_dir, resume, overwrite, info, layout)
        yield


def refuse_links(output_dir: str, names: Iterable[str], option: str = "--output-dir") -> None:
    """Stop with one line when one of ``names`` in ``output_dir`` is a symbolic link.

    A run opens these files in place (appends to them, or a library writes them without a
    rename); in a shared run folder, a link planted there would make the run write into
    another file, with the run's permissions. The files a run replaces by renaming a
    temporary file over them (checkpoints, the pointer, the config) need no check: the
    rename replaces a link, it never writes through it."""
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.islink(path):
            raise RunFolderError(
                f"{option} {output_dir}: {name} is a symbolic link (to {os.readlink(path)}); a run writes this file "
                "in place and will not write through a link. Remove the link (or give "
                f"{option} another path)")


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
    try:  # never through a link: it would empty another file and write our pid into it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise RunFolderError(
            f"{option} {output_dir}: {LOCK_FILE} is a symbolic link (to {os.readlink(path)}); the lock file is "
            "never opened through a link. Remove the link (or give "
            f"{option} another path)") from None
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
