"""Dirty-page tracking of guest memory with userfaultfd write-protect in async mode (Linux >= 6.7).

A ``--diff`` snapshot must find the chunks written since its parent. Without help from the kernel that is a
memcmp of the whole memory against the parent copy (~6 ms for 64 MiB, however little changed). Linux has
two kinds of help: soft-dirty bits (not in every kernel: this one has none) and, since 6.7, userfaultfd
write-protect in *async* mode plus the ``PAGEMAP_SCAN`` ioctl:

- ``UFFDIO_REGISTER`` (mode WP) on the memory's range and ``UFFDIO_WRITEPROTECT`` arm it while the guest is
  frozen at a snapshot;
- a write to a protected page, by the guest, by the host or by the kernel (a ``read()`` into guest memory),
  is resolved by the kernel itself (``UFFD_FEATURE_WP_ASYNC``): no fault reaches us, no thread waits on the
  descriptor, the page just loses its protection;
- at the next snapshot ``PAGEMAP_SCAN`` lists the pages that lost it (``PAGE_IS_WRITTEN``) and protects them
  again in the same call (``PM_SCAN_WP_MATCHING``), atomically.

The daemon opens one descriptor for all VMs (``UFFD_USER_MODE_ONLY``, so it works without privileges where
``vm.unprivileged_userfaultfd`` is 0). If anything is missing (an older kernel, a seccomp filter, another
architecture) :func:`tracker` says why and the controller compares memory instead: slower, same result.

What a scan reports is a superset of what changed (a page written with its old bytes counts), never a
subset: the caller still compares the reported chunks with the parent copy.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

log = logging.getLogger("microvmd.snapshot")

PAGE = os.sysconf("SC_PAGE_SIZE")

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282}
_UFFD_USER_MODE_ONLY = 1
_UFFD_API = 0xAA
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_REGISTER_MODE_WP = 1 << 1
_UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
_PAGE_IS_WRITTEN = 1 << 1
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64)]


class _ScanArg(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class _Region(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_UFFDIO_API = _ioc(3, 0xAA, 0x3F, ctypes.sizeof(_Api))
_UFFDIO_REGISTER = _ioc(3, 0xAA, 0x00, ctypes.sizeof(_Register))
_UFFDIO_WRITEPROTECT = _ioc(3, 0xAA, 0x06, ctypes.sizeof(_WriteProtect))
_PAGEMAP_SCAN = _ioc(3, ord("f"), 16, ctypes.sizeof(_ScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int


class TrackingError(OSError):
    pass


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise TrackingError(err, f"{what}: {os.strerror(err)}")
    return ret


class DirtyTracker:
    """One userfaultfd (async write-protect) and one /proc/self/pagemap descriptor for the whole daemon."""

    VEC = 512  # regions per PAGEMAP_SCAN call; the walk continues where a full vector stopped

    def __init__(self) -> None:
        self.uffd = -1
        self.pagemap = -1
        self._vec = (_Region * self.VEC)()
        self._lock = threading.Lock()  # the region vector is shared
        self._open()

    def _open(self) -> None:
        nr = _SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise TrackingError(0, f"userfaultfd: unknown syscall number on {platform.machine()}")
        self.uffd = _check(_libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY), "userfaultfd")
        try:
            api = _Api(_UFFD_API, _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED, 0)
            _check(_libc.ioctl(self.uffd, _UFFDIO_API, ctypes.addressof(api)), "UFFDIO_API (async write-protect)")
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            self._self_test()
        except BaseException:
            self.close()
            raise

    def _self_test(self) -> None:
        """Arm two private pages, write one, and expect exactly that one back (then the scan re-armed it)."""
        size = 4 * PAGE
        addr = _libc.mmap(None, size, 3, 0x22, -1, 0)  # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
        if addr in (None, ctypes.c_void_p(-1).value):
            raise TrackingError(ctypes.get_errno(), "mmap for the self-test failed")
        try:
            ctypes.memset(addr, 1, size)
            self.arm(addr, size)
            ctypes.memset(addr + 2 * PAGE, 2, 1)
            first = self.collect_pages(addr, size)
            second = self.collect_pages(addr, size)
            if first != [(2 * PAGE, 3 * PAGE)] or second:
                raise TrackingError(0, f"PAGEMAP_SCAN self-test got {first} then {second}")
        finally:
            _libc.munmap(addr, size)

    def close(self) -> None:
        for fd in (self.uffd, self.pagemap):
            if fd >= 0:
                os.close(fd)
        self.uffd = self.pagemap = -1

    def arm(self, address: int, size: int) -> None:
        """Start tracking [address, address+size): register (idempotent) and write-protect every page."""
        if size <= 0:
            return
        reg = _Register(_Range(address, size), _UFFDIO_REGISTER_MODE_WP, 0)
        _check(_libc.ioctl(self.uffd, _UFFDIO_REGISTER, ctypes.addressof(reg)), "UFFDIO_REGISTER")
        wp = _WriteProtect(_Range(address, size), _UFFDIO_WRITEPROTECT_MODE_WP)
        _check(_libc.ioctl(self.uffd, _UFFDIO_WRITEPROTECT, ctypes.addressof(wp)), "UFFDIO_WRITEPROTECT")

    def collect_pages(self, address: int, size: int) -> list[tuple[int, int]]:
        """Page ranges (offsets from ``address``) written since they were last armed, re-protecting them in
        the same walk. Raises :class:`TrackingError` if any page of the range is not tracked (it was
        remapped or never armed): the caller must then compare memory instead."""
        out: list[tuple[int, int]] = []
        end = address + size
        start = address
        with self._lock:
            while start < end:
                arg = _ScanArg(ctypes.sizeof(_ScanArg), _PM_SCAN_WP_MATCHING | _PM_SCAN_CHECK_WPASYNC, start, end,
                               0, ctypes.addressof(self._vec), self.VEC, 0,
                               0, _PAGE_IS_WRITTEN, 0, _PAGE_IS_WRITTEN)
                n = _check(_libc.ioctl(self.pagemap, _PAGEMAP_SCAN, ctypes.addressof(arg)), "PAGEMAP_SCAN")
                for i in range(n):
                    r = self._vec[i]
                    if out and out[-1][1] == r.start - address:
                        out[-1] = (out[-1][0], r.end - address)
                    else:
                        out.append((r.start - address, r.end - address))
                if arg.walk_end <= start:
                    raise TrackingError(0, f"PAGEMAP_SCAN made no progress at {start:#x}")
                start = arg.walk_end
        return out

    def collect_chunks(self, address: int, size: int, chunk: int) -> list[int]:
        """Indices of the ``chunk``-sized pieces holding a written page (see :meth:`collect_pages`)."""
        chunks: list[int] = []
        for lo, hi in self.collect_pages(address, size):
            first, last = lo // chunk, (hi - 1) // chunk
            if chunks and chunks[-1] >= first:
                first = chunks[-1] + 1
            chunks.extend(range(first, last + 1))
        return chunks


_tracker: DirtyTracker | None = None
_reason = "not probed"
_probe_lock = threading.Lock()


def tracker() -> DirtyTracker | None:
    """The daemon's tracker, opened on first use; None (see :func:`status`) where the kernel cannot do it."""
    global _tracker, _reason
    with _probe_lock:
        if _reason == "not probed":
            try:
                _tracker = DirtyTracker()
                _reason = "userfaultfd async write-protect + PAGEMAP_SCAN"
            except OSError as e:
                _reason = f"unavailable ({e}); --diff compares memory"
                log.info("dirty-page tracking %s", _reason)
        return _tracker


def status() -> str:
    tracker()
    return _reason


def describe(enabled: bool) -> str:
    """How ``--diff`` finds changed pages, for /v1/info and the log."""
    return status() if enabled else "off (engine.dirty_tracking = false); --diff compares memory"
