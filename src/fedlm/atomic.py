"""The one atomic write, for files and for folders.

The guarantee: if a write through this module is interrupted at any point (an exception, a kill, a power cut), the
path holds the complete old version or the complete new one: never a partial file or folder, never nothing. When a
call returns, the new version is in place and on disk (its data and the directory entry are fsynced).

Files (`write_bytes`, `write_text`, `write_json`): written to a hidden temporary file in the same folder, flushed and
fsynced, then `os.replace`d over the target, then the folder is fsynced. The temporary file is removed on any
exception.

Folders (`staged_dir`): the caller fills a hidden staging folder beside the target; on success it is fsynced and
swapped into place. On Linux the swap is one `renameat2(RENAME_EXCHANGE)`, so the target always names a whole
folder; the staging path then holds the old one, which is deleted. A target that does not exist yet is a plain
rename. See `_swap` for the fallback where the exchange is not available.

A killed writer leaves only hidden litter named after its process id (`.NAME.PID-XXXXXXXX.tmp` or `.staging`): the
next write of the same path deletes it once that process is gone. This module imports nothing from fedlm, so every
package (models/ included) can use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["recover_dir", "staged_dir", "write_bytes", "write_json", "write_text"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` atomically (creating its parent folders); the file's mode is a plain write's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = _fresh_name(path, "tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def write_json(path: str | Path, obj: Any, **dump_kwargs: Any) -> Path:
    """`json.dumps(obj, **dump_kwargs)` and a newline, written atomically."""
    return write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


@contextlib.contextmanager
def staged_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder to write the new version of the folder `target` into; when the block ends
    without an exception, the staging folder replaces `target` whole. On an exception `target` is left untouched
    and the staging folder is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    _remove_stale(target)
    staging = _fresh_name(target, "staging")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        _swap(staging, target)
    finally:
        _remove(staging)  # after an exchange: the old version; after a failure: the unfinished new one


def recover_dir(target: str | Path) -> None:
    """Finish a fallback swap that a kill interrupted (see `_swap`): put `.NAME.old` back if `target` is missing,
    delete it if `target` is there. `staged_dir` calls this first; a reader may too. A no-op after an exchange."""
    target = Path(target)
    old = _old_name(target)
    if not os.path.lexists(old):
        return
    if os.path.lexists(target):
        _remove(old)
    else:
        os.rename(old, target)
        _fsync_dir(target.parent)


def _swap(staging: Path, target: Path) -> None:
    """Put `staging` in place of `target`, atomically where the system allows.

    Without renameat2(RENAME_EXCHANGE) (not Linux, an old kernel or a file system without it) no call replaces a
    non-empty folder atomically, so the fallback is two renames: `target` to `.NAME.old`, then `staging` to `target`,
    then `.NAME.old` is deleted. A kill between the two renames leaves the old version whole at `.NAME.old`, and
    `recover_dir` (run by the next writer, or a reader) renames it back.
    """
    if not os.path.lexists(target):
        os.rename(staging, target)
    elif not _exchange(staging, target):
        old = _old_name(target)
        os.rename(target, old)
        os.rename(staging, target)
        _remove(old)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where that is not available."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


_libc_renameat2: Any = None


def _renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+), or None."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        function = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                function.restype = ctypes.c_int
        _libc_renameat2 = function or False
    return _libc_renameat2 or None


def _fresh_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _remove_stale(path: Path) -> None:
    """Delete the temporary files and staging folders that writers of `path` left when they were killed."""
    if os.name != "posix":  # telling a dead process from a live one needs os.kill(pid, 0)
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.(tmp|staging)")
    with os.scandir(path.parent) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _alive(int(match.group(1))):
            _remove(path.parent / name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: str | Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_path(os.path.join(root, name), os.O_RDONLY)
        _fsync_dir(root)


def _fsync_dir(folder: str | Path) -> None:
    _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync_path(path: str | Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # Windows opens no folders; a symlink may dangle
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
