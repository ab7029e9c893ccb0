"""Stable storage: what the API acknowledges is fsynced, files and the directories that name them.

PostgreSQL's rule: a rename is durable only once the directory holding the new name is fsynced, and a file's
content only once the file is. Callers write to a temporary name, ``sync_file`` it, rename it into place and
``sync_dir`` the directory. Every step is skipped when ``durable`` is false (the per-request opt-out,
``?durable=false``, for callers that can lose the last moments of work after a power loss).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-back of the range's dirty pages, do not wait


def _sync_file_range() -> Any:
    try:
        # the symbols already loaded in this process (libc's among them): no library search, no subprocess
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux/glibc: the final fsync does all the work
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range of a file to the disk now, without waiting (sync_file_range(2) with
    SYNC_FILE_RANGE_WRITE; ctypes releases the GIL). It guarantees nothing by itself: the file's fsync still
    decides durability. It only means the disk works while the rest of the file is still being produced, so
    the fsync finds little left to do (a 64 MiB snapshot pack: ~50 ms of fsync after the writes, ~10 ms
    when every run's write-back was started as it was written)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # an error: the fsync reports it


def sync_fd(fd: int) -> None:
    os.fsync(fd)


def sync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str | Path) -> None:
    """Every file under ``path`` and every directory, ``path`` itself included (a new image's directory)."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            sync_file(os.path.join(root, f))
        sync_dir(root)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes, tmp: Path | None = None, durable: bool = True) -> None:
    """``data`` at ``path`` whole or not at all; on stable storage before returning when ``durable``."""
    tmp = tmp or path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        write_all(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        sync_dir(path.parent)
