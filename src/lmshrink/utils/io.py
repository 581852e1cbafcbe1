"""Atomic file and directory writes: a crash or a kill never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmshrink.errors import LmshrinkError


def _check_writable_parent(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmshrinkError(f"cannot create output directory {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise LmshrinkError(f"no write permission for {parent}; choose a writable output location")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so a rename survives power loss (best effort on filesystems without it)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed.

    >>> with atomic_path("/tmp/x.bin") as tmp:
    ...     _ = tmp.write_bytes(b"data")
    """
    final = Path(path)
    _check_writable_parent(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (an existing file keeps its own)
        with contextlib.suppress(OSError):
            os.chmod(tmp, final.stat().st_mode & 0o7777 if final.exists() else 0o666 & ~_umask())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_directory(path: str | os.PathLike[str]) -> None:
    """Repair what an interrupted :func:`atomic_directory` left beside ``path``.

    A kill between moving the previous version aside and moving the new one in leaves no directory under the
    final name: the previous version is moved back. Temporary directories of writers that are no longer running
    are removed (they are incomplete by construction).
    """
    final = Path(path)
    parent = final.parent
    if not parent.is_dir():
        return
    backups = sorted(parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for old in backups:
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if not final.exists():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f".{final.name}.*.tmp"):
        pid = tmp.name[len(final.name) + 2 :].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Any:
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` when the
    platform or filesystem cannot (the caller falls back to two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when complete.

    An existing directory at ``path`` is replaced only after the new one is fully written, so an interrupted
    save leaves the previous version intact. On Linux the swap is one atomic ``renameat2(RENAME_EXCHANGE)``: the
    final name always holds a complete version. Elsewhere it is two renames, and a kill between them is repaired
    by :func:`recover_directory`, which runs first on every call. Temporary names carry the writer's pid so that
    leftovers of killed writers are cleaned up.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise LmshrinkError(f"output path {final} exists and is not a directory")
    _check_writable_parent(final)
    recover_directory(final)
    if final.exists() and not overwrite:
        raise LmshrinkError(f"output directory {final} already exists; pass overwrite=True to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        with contextlib.suppress(OSError):  # mkdtemp creates 0700; give it the mode a plain mkdir would
            os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            if exchange_paths(tmp, final):
                # one atomic step: the final name now holds the new version and tmp the previous one
                shutil.rmtree(tmp, ignore_errors=True)
            else:  # no atomic exchange here: move aside, move in (recover_directory repairs a kill between)
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def directory_size(path: str | os.PathLike[str]) -> int:
    """Bytes of all regular files below ``path`` (or of the file itself)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
