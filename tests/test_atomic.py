"""fedlm.atomic: content round trips, failures and kills leave the old or the new version, never neither."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedlm import atomic

PARTS = ("a.txt", "b.txt", "c.txt")


def make_folder(folder: Path, version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        (folder / part).write_text(version)


def folder_version(folder: Path) -> str | None:
    """The one version every part of the folder holds; fails on a partial or mixed folder; None if absent."""
    if not folder.exists():
        return None
    assert sorted(p.name for p in folder.iterdir()) == sorted(PARTS)
    versions = {(folder / part).read_text() for part in PARTS}
    assert len(versions) == 1, versions
    return versions.pop()


def test_file_round_trips(tmp_path):
    path = tmp_path / "deep" / "er" / "blob.bin"
    data = bytes(range(256)) * 10
    assert atomic.write_bytes(path, data) == path
    assert path.read_bytes() == data
    atomic.write_text(path, "héllo ✓\n")
    assert path.read_text(encoding="utf-8") == "héllo ✓\n"
    obj = {"b": [1, 2.5, None], "a": "ü"}
    atomic.write_json(path, obj, indent=2)
    assert path.read_text(encoding="utf-8") == json.dumps(obj, indent=2) + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["blob.bin"]  # no temporary file left


def test_file_mode_is_a_plain_writes(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic.write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_failed_file_write_keeps_the_old_file_and_no_litter(tmp_path):
    path = tmp_path / "out.json"
    atomic.write_text(path, "old")
    with pytest.raises(TypeError):
        atomic.write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_staged_dir_creates_and_replaces_a_folder(tmp_path):
    target = tmp_path / "sub" / "adapter"
    with atomic.staged_dir(target) as staging:
        assert staging.is_dir() and staging.parent == target.parent and not list(staging.iterdir())
        make_folder(staging, "v1")
    assert folder_version(target) == "v1"
    (target / "stale.txt").write_text("from v1 only")
    with atomic.staged_dir(target) as staging:
        make_folder(staging, "v2")
    assert folder_version(target) == "v2"  # whole folder replaced: v1's extra file is gone
    assert [p.name for p in target.parent.iterdir()] == ["adapter"]


def test_exception_in_staged_dir_leaves_the_old_folder_and_no_litter(tmp_path):
    target = tmp_path / "fuser"
    make_folder(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic.staged_dir(target) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("boom")
    assert folder_version(target) == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["fuser"]


@pytest.mark.skipif(atomic._renameat2() is None, reason="renameat2 is Linux (glibc 2.28+) only")
def test_replacing_a_folder_is_one_exchange_on_linux(tmp_path, monkeypatch):
    target = tmp_path / "model"
    make_folder(target, "old")
    calls = []
    real = atomic._exchange

    def spy(a, b):
        calls.append(real(a, b))
        assert folder_version(b) == "new" and folder_version(a) == "old"  # swapped in one step
        return calls[-1]

    monkeypatch.setattr(atomic, "_exchange", spy)
    with atomic.staged_dir(target) as staging:
        make_folder(staging, "new")
    assert calls == [True] and folder_version(target) == "new"


def test_exchange_reports_unsupported_as_false(tmp_path, monkeypatch):
    def unsupported(*_args):
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", lambda: unsupported)
    assert atomic._exchange(tmp_path / "a", tmp_path / "b") is False
    target = tmp_path / "t"
    make_folder(target, "old")
    with atomic.staged_dir(target) as staging:  # the two-rename fallback
        make_folder(staging, "new")
    assert folder_version(target) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["t"]


def test_recover_dir_restores_an_interrupted_fallback_swap(tmp_path):
    target = tmp_path / "t"
    old = tmp_path / ".t.old"
    make_folder(old, "old")  # killed between the two renames
    atomic.recover_dir(target)
    assert folder_version(target) == "old" and not old.exists()
    make_folder(old, "older")  # killed while deleting the old version after the swap
    atomic.recover_dir(target)
    assert folder_version(target) == "old" and not old.exists()


def test_litter_of_a_dead_writer_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    dead_tmp = tmp_path / f".out.json.{dead_pid}-0123abcd.tmp"
    dead_staging = tmp_path / f".out.json.{dead_pid}-89abcdef.staging"
    live = tmp_path / f".out.json.{os.getpid()}-0123abcd.tmp"
    other = tmp_path / f".other.{dead_pid}-0123abcd.tmp"
    for path in (dead_tmp, live, other):
        path.write_text("x")
    make_folder(dead_staging, "half")
    atomic.write_text(tmp_path / "out.json", "new")
    assert (tmp_path / "out.json").read_text() == "new"
    assert not dead_tmp.exists() and not dead_staging.exists()
    assert live.exists() and other.exists()


# A child process writes "new" over "old" and SIGKILLs itself at a chosen call: before or after the nth call of
# OWNER.ATTR. OWNER is the atomic module, os, or pathlib.Path (Path.write_text: midway through filling the folder).
CHILD = """
import os, signal, sys
from pathlib import Path
from fedlm import atomic

kind, path, owner_name, attr, when, nth, exchange = sys.argv[1:]
owner = {"atomic": atomic, "os": os, "Path": Path}[owner_name]
real, calls = getattr(owner, attr), []

def kill_at(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(nth) and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if len(calls) == int(nth) and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, attr, kill_at)
if exchange == "no":
    atomic._exchange = lambda a, b: False
if kind == "file":
    atomic.write_text(path, "new")
else:
    with atomic.staged_dir(path) as staging:
        for part in {parts!r}:
            (staging / part).write_text("new")
""".replace("{parts!r}", repr(PARTS))


def kill_child(kind: str, path: Path, point: tuple[str, str, str, int], exchange: bool = True) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(atomic.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    args = [kind, str(path), *map(str, point), "yes" if exchange else "no"]
    child = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr  # it died where we said, not earlier or never


posix_only = pytest.mark.skipif(os.name != "posix", reason="SIGKILL")


@posix_only
@pytest.mark.parametrize(
    ("point", "expected"),
    [
        (("os", "fsync", "before", 1), "old"),  # temporary file written, not yet on disk
        (("os", "replace", "before", 1), "old"),
        (("os", "replace", "after", 1), "new"),
    ],
)
def test_killed_file_write_leaves_old_or_new(tmp_path, point, expected):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    kill_child("file", path, point)
    assert path.read_text() == expected
    atomic.write_text(path, "next")  # the next run is not disturbed, and clears the dead writer's litter
    assert path.read_text() == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@posix_only
@pytest.mark.parametrize(
    ("point", "exchange", "expected"),
    [
        (("Path", "write_text", "before", 2), True, "old"),  # staging folder half written
        (("atomic", "_fsync_tree", "after", 1), True, "old"),
        (("atomic", "_exchange", "after", 1), True, "new"),  # swapped; the old folder is still in the staging path
        (("Path", "write_text", "before", 2), False, "old"),
        (("os", "rename", "before", 1), False, "old"),
        (("os", "rename", "after", 1), False, "old"),  # between the two renames: only .NAME.old holds a version
        (("os", "rename", "after", 2), False, "new"),
    ],
)
def test_killed_folder_write_leaves_old_or_new(tmp_path, point, exchange, expected):
    if exchange and atomic._renameat2() is None:
        pytest.skip("renameat2 is Linux (glibc 2.28+) only")
    target = tmp_path / "adapter"
    make_folder(target, "old")
    kill_child("dir", target, point, exchange)
    if exchange:  # an exchange never leaves the target missing, not even for a moment
        assert folder_version(target) == expected
    else:
        if not target.exists():  # killed between the two renames: the old version waits whole at .NAME.old
            assert folder_version(tmp_path / ".adapter.old") == "old"
        atomic.recover_dir(target)  # what a reader or the next writer does first
        assert folder_version(target) == expected
    with atomic.staged_dir(target) as staging:
        make_folder(staging, "next")
    assert folder_version(target) == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@posix_only
def test_killed_first_write_of_a_folder_leaves_nothing_but_does_not_block_the_next(tmp_path):
    target = tmp_path / "fresh"
    kill_child("dir", target, ("os", "rename", "before", 1))
    assert not target.exists()
    with atomic.staged_dir(target) as staging:
        make_folder(staging, "v1")
    assert folder_version(target) == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["fresh"]
