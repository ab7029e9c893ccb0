"""The WASI console: stdout and stderr written by wasmtime straight to per-VM files, kept under a cap.

wasmtime owns the file descriptors, so the cap cannot be applied at write time. After each scheduling
slice the VM checks the file size; once a stream exceeds twice its cap, the oldest bytes are released with
FALLOC_FL_PUNCH_HOLE. The file keeps its logical size (wasmtime's offset stays valid) but only the last
``cap`` bytes use disk, and readers start at ``size - cap``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from pathlib import Path

log = logging.getLogger("microvmd.console")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

STREAMS = ("stdout", "stderr")


class Console:
    def __init__(self, directory: Path, cap: int) -> None:
        self.dir = directory
        self.cap = cap
        self.released = {s: 0 for s in STREAMS}  # bytes punched out at the start of each stream

    def path(self, stream: str) -> Path:
        return self.dir / f"{stream}.log"

    def create(self) -> None:
        for s in STREAMS:
            self.path(s).touch()

    def size(self, stream: str) -> int:
        try:
            return os.stat(self.path(stream)).st_size
        except FileNotFoundError:
            return 0

    def enforce_cap(self) -> None:
        """Cheap when under the cap: one stat per stream."""
        for s in STREAMS:
            size = self.size(s)
            if size <= 2 * self.cap:
                continue
            cut = (size - self.cap) & ~0xFFF
            if cut <= self.released[s]:
                continue
            fd = os.open(self.path(s), os.O_WRONLY)
            try:
                if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, cut) != 0:
                    err = ctypes.get_errno()
                    if err != errno.EOPNOTSUPP:
                        log.warning("cannot trim %s: %s", self.path(s), os.strerror(err))
                    continue
            finally:
                os.close(fd)
            self.released[s] = cut

    def start_offset(self, stream: str) -> int:
        return max(self.released[stream], self.size(stream) - self.cap)

    def read(self, stream: str, offset: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        """Read from ``offset`` (clamped to what is kept); returns the data and the next offset."""
        offset = max(offset, self.start_offset(stream))
        try:
            with open(self.path(stream), "rb") as f:
                f.seek(offset)
                data = f.read(limit)
        except FileNotFoundError:
            return b"", offset
        return data, offset + len(data)
