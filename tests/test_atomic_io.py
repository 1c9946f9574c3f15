"""revcolv2/atomic_io.py, the leaf every writer uses, called directly: the temporary file's
name and mode, a link replaced and not followed, a full disk (ENOSPC, EDQUOT, or a write error
that arose from one) as one line word for word, any other error passed on untouched with
nothing left behind, the append that refuses a link, which outputs would replace an input
(the same path, a link, a hard link), the umask read without setting it, and the clean-up of
what killed writers left (which pid is alive, links, entries that vanish meanwhile)."""
import errno
import os
import re
import stat
import subprocess
import sys

import pytest
import torch
from training_helpers import dead_pid

from revcolv2 import atomic_io
from revcolv2.atomic_io import (
    DiskFullError,
    current_umask,
    follow_umask,
    inputs_replaced,
    open_append,
    remove_stale_temporaries,
    save_atomic,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def temporaries(monkeypatch):
    """The name of each temporary file renamed into place, as the rename saw it."""
    names = []
    real_replace = os.replace

    def replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(os.path.abspath(dst)), (src, dst)  # beside it
        names.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return names


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- the three writers -------------------------------------------------------------------------


def test_each_writer_replaces_the_file_through_a_temporary_file_named_for_it(tmp_path, temporaries, umask_022):
    save_atomic({"w": torch.arange(3)}, str(tmp_path / "a.pth"))
    write_text_atomic(str(tmp_path / "last_checkpoint"), "épreuve ✓\n")
    write_bytes_atomic(str(tmp_path / "epoch_0001.png"), b"\x89PNG\r\n\x00\xff")
    assert torch.equal(torch.load(tmp_path / "a.pth")["w"], torch.arange(3))
    assert (tmp_path / "last_checkpoint").read_bytes() == "épreuve ✓\n".encode("utf-8")
    assert (tmp_path / "epoch_0001.png").read_bytes() == b"\x89PNG\r\n\x00\xff"
    pid = os.getpid()
    assert [re.sub(r"[0-9a-f]{12}", "<hex>", n) for n in temporaries] == [
        f".tmp_{pid}_<hex>.pth", f".tmp_{pid}_<hex>_last_checkpoint", f".tmp_{pid}_<hex>_epoch_0001.png"]
    assert sorted(os.listdir(tmp_path)) == ["a.pth", "epoch_0001.png", "last_checkpoint"]
    for name in os.listdir(tmp_path):  # 0666 less the umask, as open(path, "w") gives
        assert _mode(tmp_path / name) == 0o644, name


def test_a_writer_creates_the_folder_and_takes_a_relative_path(tmp_path, monkeypatch):
    write_bytes_atomic(str(tmp_path / "vis" / "deep" / "a.png"), b"one")
    write_bytes_atomic(str(tmp_path / "vis" / "deep" / "a.png"), b"two")  # the folder exists now
    assert (tmp_path / "vis" / "deep" / "a.png").read_bytes() == b"two"
    monkeypatch.chdir(tmp_path)
    write_text_atomic("note.txt", "here")
    assert (tmp_path / "note.txt").read_text() == "here"
    assert sorted(os.listdir(tmp_path)) == ["note.txt", "vis"]


@pytest.mark.parametrize("writer", [write_text_atomic, write_bytes_atomic])
def test_a_link_at_the_path_is_replaced_not_followed(tmp_path, writer):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"another user's file")
    os.symlink(victim, tmp_path / "out.txt")
    writer(str(tmp_path / "out.txt"), "new" if writer is write_text_atomic else b"new")
    assert not os.path.islink(tmp_path / "out.txt") and (tmp_path / "out.txt").read_bytes() == b"new"
    assert victim.read_bytes() == b"another user's file"


def test_a_temporary_name_another_writer_holds_is_never_shared(tmp_path, monkeypatch, temporaries):
    """The random part drawn again when the name exists (O_EXCL): the other writer's file stays."""
    drawn = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    sizes = []
    monkeypatch.setattr(atomic_io.secrets, "token_hex", lambda n: (sizes.append(n), next(drawn))[1])
    tried = []
    real_open = os.open

    def open_new(path, flags, mode=0o777):
        assert path not in tried, f"{path} was found taken and is tried again"
        tried.append(path)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", open_new)
    other = tmp_path / f".tmp_{os.getpid()}_aaaaaaaaaaaa_out.txt"
    other.write_bytes(b"the other writer's half-written text")
    write_text_atomic(str(tmp_path / "out.txt"), "mine")
    assert temporaries == [f".tmp_{os.getpid()}_bbbbbbbbbbbb_out.txt"] and sizes == [6, 6] and len(tried) == 2
    assert other.read_bytes() == b"the other writer's half-written text"
    assert (tmp_path / "out.txt").read_text() == "mine"


def _fail_fsync(monkeypatch, error):
    def fsync(fd):
        raise error

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_word_for_word_and_the_old_file_stays(tmp_path, monkeypatch, code):
    for name in ("a.pth", "a.txt", "a.png"):
        (tmp_path / name).write_bytes(b"old")
    _fail_fsync(monkeypatch, OSError(code, os.strerror(code)))
    folder = str(tmp_path)
    calls = [(save_atomic, ({"w": 1}, str(tmp_path / "a.pth")),
              "the file was not replaced and the previous checkpoint is intact. Free space in "
              f"{folder} (or lower the checkpoints kept), then resume"),
             (write_text_atomic, (str(tmp_path / "a.txt"), "new"),
              f"the file was not replaced. Free space in {folder}, then run again"),
             (write_bytes_atomic, (str(tmp_path / "a.png"), b"new"),
              f"the file was not replaced. Free space in {folder}, then run again")]
    for writer, args, advice in calls:
        path = args[0] if writer is not save_atomic else args[1]
        with pytest.raises(DiskFullError) as e:
            writer(*args)
        expected = f"no space left on the device (ENOSPC) while writing {path}; {advice}"
        assert str(e.value) == expected and e.value.message == expected
        assert e.value.code == expected and e.value.args == (expected,)  # SystemExit prints it, status 1
        assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == code
    assert sorted(os.listdir(tmp_path)) == ["a.png", "a.pth", "a.txt"]
    assert all((tmp_path / n).read_bytes() == b"old" for n in ("a.pth", "a.txt", "a.png"))


def test_a_full_disk_reported_through_another_exception_is_found(tmp_path, monkeypatch):
    """torch.save raises a RuntimeError whose context is the OSError; a wrapper may chain it."""
    def save_in_context(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None

    def save_with_cause(obj, f):
        raise RuntimeError("write failed") from OSError(errno.EDQUOT, "Disk quota exceeded")

    for save in (save_in_context, save_with_cause):
        monkeypatch.setattr(torch, "save", save)
        with pytest.raises(DiskFullError, match=r"^no space left on the device \(ENOSPC\) while writing "):
            save_atomic({}, str(tmp_path / "a.pth"))
    assert os.listdir(tmp_path) == []


class _ReadOnce(RuntimeError):
    """An exception whose context is ``partner``, read at most once: a walk of the chain that
    comes round again fails at once instead of running on."""

    partner = None
    reads = 0

    @property
    def __context__(self):
        self.reads += 1
        if self.reads > 1:
            raise AssertionError(f"the context of {self} was read again: the walk loops")
        return self.partner


def test_any_other_error_is_passed_on_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"old")
    _fail_fsync(monkeypatch, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError) as e:
        write_text_atomic(str(tmp_path / "a.txt"), "new")
    assert type(e.value) is OSError and e.value.errno == errno.EIO
    monkeypatch.undo()

    looped = _ReadOnce("a")  # a context that leads back to itself: each exception looked at once
    looped.partner = _ReadOnce("b")
    looped.partner.partner = looped

    def save(obj, f):
        f.write(b"part of a checkpoint")
        raise looped

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RuntimeError) as e:
        save_atomic({}, str(tmp_path / "a.txt"))
    assert e.value is looped and looped.reads == looped.partner.reads == 1
    _fail_fsync(monkeypatch, KeyboardInterrupt())  # an interrupt mid-write, too
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(str(tmp_path / "a.txt"), b"new")
    assert os.listdir(tmp_path) == ["a.txt"] and (tmp_path / "a.txt").read_bytes() == b"old"


# --- the append that refuses a link -----------------------------------------------------------


def test_open_append_appends_and_creates_with_the_umask_mode(tmp_path, umask_022):
    path = tmp_path / "log.jsonl"
    with open_append(str(path)) as f:
        f.write("one\n")
    with open_append(str(path)) as f:
        f.write("two\n")
    assert path.read_text() == "one\ntwo\n" and _mode(path) == 0o644


def test_open_append_refuses_a_link_naming_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    os.symlink(victim, tmp_path / "log.jsonl")
    path = str(tmp_path / "log.jsonl")
    with pytest.raises(OSError) as e:
        open_append(path)
    assert e.value.errno == errno.ELOOP and e.value.filename == path
    assert e.value.strerror == f"{path} is a symbolic link; refusing to append to it"
    assert e.value.__suppress_context__ and victim.read_text() == "keep\n"
    missing = str(tmp_path / "missing" / "log.jsonl")
    with pytest.raises(FileNotFoundError) as e:  # any other error as open raised it
        open_append(missing)
    assert e.value.strerror == "No such file or directory" and e.value.filename == missing


# --- outputs that would replace an input ------------------------------------------------------


def test_inputs_replaced_finds_the_same_file_by_path_link_and_hard_link(tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "photos" / name).write_bytes(name.encode())
    os.symlink(tmp_path / "photos", tmp_path / "vis")
    (tmp_path / "other").mkdir()
    os.link(tmp_path / "photos" / "b.png", tmp_path / "other" / "b.png")
    (tmp_path / "other" / "c.png").write_bytes(b"c")
    a, b = str(tmp_path / "photos" / "a.png"), str(tmp_path / "photos" / "b.png")
    outs = [str(tmp_path / "vis" / "a.png"), str(tmp_path / "other" / "b.png"), str(tmp_path / "other" / "c.png"),
            str(tmp_path / "other" / "new.png"), a]
    assert inputs_replaced(outs, ["", str(tmp_path / "missing.png"), a, b]) == [
        (outs[0], a), (outs[1], b), (a, a)]
    assert inputs_replaced([str(tmp_path / "other" / "new.png")], [a]) == []


def test_inputs_replaced_names_the_input_at_that_path_before_another_name_of_it(tmp_path):
    """Two inputs that are one file (hard links): an output at one's path names that one."""
    (tmp_path / "a.png").write_bytes(b"a")
    os.link(tmp_path / "a.png", tmp_path / "also_a.png")
    a, also = str(tmp_path / "a.png"), str(tmp_path / "also_a.png")
    assert inputs_replaced([a, also], [a, also]) == [(a, a), (also, also)]


# --- the umask --------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_the_umask_is_read_without_setting_it(monkeypatch, tmp_path, umask):
    old = os.umask(umask)
    try:
        def no_umask(mask):
            raise AssertionError("current_umask set the umask where /proc/self/status reports it")

        monkeypatch.setattr(os, "umask", no_umask)
        assert current_umask() == umask
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"")
        os.chmod(path, 0o600)  # as safetensors writes it
        follow_umask(str(path))
        assert _mode(path) == 0o666 & ~umask
    finally:
        monkeypatch.undo()
        os.umask(old)


@pytest.mark.parametrize("status", [None, "Name:\tpython\nPid:\t1\n"])
def test_without_proc_the_umask_is_read_by_setting_it_back(monkeypatch, status):
    """No /proc (another system), or a kernel that does not report the umask there."""
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/self/status"
        if status is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        import io
        return io.StringIO(status)

    monkeypatch.setattr(atomic_io, "open", fake_open, raising=False)
    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)


# --- what killed writers left -----------------------------------------------------------------


def test_stale_temporaries_of_dead_writers_go_and_live_writers_keep_theirs(tmp_path, capsys):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        names = [f".tmp_{live.pid}_aa.pth",      # another live process: kept
                 f".tmp_{dead}_bb.pth",          # a dead one: removed
                 f".tmp_{os.getpid()}_cc.pth",   # this process: kept
                 ".tmp_legacyname.pth",          # no pid (older versions): removed
                 "checkpoint-0001.pth", "a_last", ".tmp"]  # not temporaries
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / f".tmp_{dead}_dir").mkdir()
        (tmp_path / f".tmp_{dead}_dir" / "train").mkdir()
        target = tmp_path / "kept_folder"
        target.mkdir()
        os.symlink(target, tmp_path / f".tmp_{dead}_link")  # a link to a folder: the link goes, not the folder
        removed = remove_stale_temporaries(tmp_path)
        expected = [str(tmp_path / n) for n in (f".tmp_{dead}_bb.pth", f".tmp_{dead}_dir", f".tmp_{dead}_link",
                                                 ".tmp_legacyname.pth")]
        assert removed == sorted(expected) == expected
        assert capsys.readouterr().out == "".join(f"removed {p}: left behind by an interrupted write\n"
                                                  for p in expected)
        assert sorted(os.listdir(tmp_path)) == sorted([f".tmp_{live.pid}_aa.pth", f".tmp_{os.getpid()}_cc.pth",
                                                       "checkpoint-0001.pth", "a_last", ".tmp", "kept_folder"])
        assert live.poll() is None  # asked whether it runs (signal 0), never signalled
    finally:
        live.kill()
        live.wait()


def test_stale_temporaries_with_another_prefix(tmp_path):
    dead = dead_pid()
    for name in (f".synthetic_shapes_{dead}_ab", f".synthetic_shapes{dead}_cd", ".synthetic_shapesxyz",
                 f".tmp_{dead}_x.pth"):
        (tmp_path / name).mkdir()
    removed = remove_stale_temporaries(str(tmp_path), prefix=".synthetic_shapes")
    assert [os.path.basename(p) for p in removed] == [
        f".synthetic_shapes{dead}_cd", f".synthetic_shapes_{dead}_ab", ".synthetic_shapesxyz"]
    assert os.listdir(tmp_path) == [f".tmp_{dead}_x.pth"]


def test_a_temporary_removed_meanwhile_is_skipped_and_the_rest_cleaned(tmp_path, monkeypatch):
    """Two runs cleaning one folder: an entry the other removed first is not reported."""
    dead = dead_pid()
    for name in ("a", "b"):
        (tmp_path / f".tmp_{dead}_{name}").write_bytes(b"x")
    real_remove = os.remove

    def remove(path):
        real_remove(path)
        if path.endswith("_a"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)

    monkeypatch.setattr(os, "remove", remove)
    assert remove_stale_temporaries(tmp_path) == [str(tmp_path / f".tmp_{dead}_b")]
    assert os.listdir(tmp_path) == []


def test_no_folder_no_temporaries(tmp_path):
    assert remove_stale_temporaries(tmp_path / "missing") == []
    (tmp_path / "file").write_bytes(b"")
    assert remove_stale_temporaries(tmp_path / "file") == []


def test_a_pid_is_alive_unless_no_process_has_it(monkeypatch):
    assert atomic_io._pid_alive(os.getpid()) and not atomic_io._pid_alive(dead_pid())
    sent = []

    def kill(pid, sig):
        sent.append((pid, sig))
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "kill", kill)
    assert atomic_io._pid_alive(12345) and sent == [(12345, 0)]  # someone else's live process
    assert atomic_io._pid_alive(os.getpid()) and sent == [(12345, 0)]  # this one: not asked
