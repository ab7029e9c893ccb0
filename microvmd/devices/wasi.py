"""What every device call shares: the guest's errno numbers and the guard that keeps a failure from trapping it.

A device call answers a mistake of the guest's (a bad descriptor, a pointer outside its memory) with a
negative errno, and a bug of the device's with ``-EIO``, logged: neither traps the guest nor unwinds
into wasmtime.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from ..engine import wt

# wasi-libc's numbering (the guest's errno.h); a call returns them negated
EADDRINUSE = 3
EAGAIN = 6
EBADF = 8
ECONNREFUSED = 14
ECONNRESET = 15
EFAULT = 21
EHOSTUNREACH = 23
EINVAL = 28
EIO = 29
EMFILE = 33
ENOSPC = 51
ENOTCONN = 53
ENOTSUP = 58
EPIPE = 64
EROFS = 69
ETIMEDOUT = 73


class GuestError(Exception):
    """Raised inside a device call to answer it with ``-code`` (the guest's mistake, not the device's)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def errno_of(exc: Exception, log: logging.Logger, call: str) -> int:
    """The errno a device call answers when ``exc`` ended it. Call it in the ``except`` block: a device bug
    is logged with its traceback."""
    if isinstance(exc, GuestError):
        return exc.code
    if isinstance(exc, wt.MemoryFault):
        return EFAULT
    log.exception("%s failed", call)
    return EIO


def guarded(fn: wt.HostFn, log: logging.Logger, call: str) -> wt.HostFn:
    """``fn`` as a guest import whose failures become negative errnos (``errno_of``). A ``HostTrap`` is
    the one deliberate way to trap the guest and passes through."""
    def host(mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        try:
            return fn(mem, args)
        except wt.HostTrap:
            raise
        except Exception as exc:
            return [-errno_of(exc, log, call)]
    return host
