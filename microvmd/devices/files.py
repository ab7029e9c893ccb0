"""Descriptor budgets: the files and sockets a guest holds, per VM and for the whole daemon (issue 13, row 1).

A guest's WASI files are opened by wasmtime's WASI implementation inside the daemon's process, so each one
is a descriptor of the daemon. Without a count, a guest that opens files in a loop takes every descriptor
the process may have, and the API can no longer accept a connection. So:

- ``wasi_snapshot_preview1.path_open``, ``fd_close`` and ``fd_renumber`` are shadowed on the daemon's
  linker by the host functions here. They count, and pass the call on to wasmtime's own function through
  the VM's WASI helper instance (``Machine.wasi_call``, devices/wasip1.py).
- Each VM has an ``OpenFiles`` part: its files and its sockets (devices/net.py charges them here too)
  together may number ``limits.open_files``; one more gets ``EMFILE``.
- All guests together may hold ``DescriptorBudget.total`` (``limits.total_open_files``); one more gets
  ``ENFILE``. What is left of the process's ``RLIMIT_NOFILE`` is the daemon's own reserve: its API
  connections, stores, console logs and snapshots.

A guest's descriptors are given back to the budget when its VM ends (its store is closed just after).
"""
from __future__ import annotations

import logging
import resource
import struct
import threading
from collections.abc import Sequence
from typing import Any

import wasmtime
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine import wt
from .base import Device, DeviceHost, DevicePart, GuestVm, NoState
from .wasi import EMFILE, GuestError, guarded

log = logging.getLogger("microvmd.files")

ENFILE = 41  # wasi-libc's "too many open files in system": the daemon-wide budget, not the VM's own
ENOSYS = 52
WASI = "wasi_snapshot_preview1"
SHADOWED = ("path_open", "fd_close", "fd_renumber")


def process_limit() -> int:
    """The process's soft RLIMIT_NOFILE (the daemon raises it to the hard limit at start)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def plan(nofile: int, total: int, reserve: int) -> tuple[int, int]:
    """(guests' budget, daemon's reserve) for a process limit of ``nofile`` descriptors.

    ``reserve`` 0: a quarter of the limit, at most 1024. ``total`` 0: half the limit less the reserve (the
    other half is what file-mode consoles may hold, see ``engine.console``), at least 16. A configured total
    above what the limit leaves is cut down to it."""
    reserve = reserve or min(1024, nofile // 4)
    room = max(16, nofile - reserve)
    if not total:
        return max(16, nofile // 2 - reserve), reserve
    if total > room:
        log.warning("limits.total_open_files = %d is more than RLIMIT_NOFILE (%d) less the reserve (%d) "
                    "allows: using %d", total, nofile, reserve, room)
    return min(total, room), reserve


class DescriptorBudget:
    """The descriptors all guests together may hold (files and sockets); thread-safe."""

    def __init__(self, total: int, reserve: int = 0, per_vm: int = 1024) -> None:
        self.total = total
        self.reserve = reserve
        self.per_vm = per_vm
        self.used = 0
        self.refused = 0  # calls answered EMFILE or ENFILE (for metrics)
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.used >= self.total:
                self.refused += 1
                return False
            self.used += 1
            return True

    def take_anyway(self) -> None:
        """Count a descriptor that exists already (a restored socket), even past the total."""
        with self._lock:
            self.used += 1

    def give(self, n: int = 1) -> None:
        if n:
            with self._lock:
                self.used -= n


class OpenFiles(DevicePart[NoState]):
    """One VM's descriptors: WASI files by guest fd, and a count of its sockets (devices/net.py)."""

    name = "files"

    def __init__(self, budget: DescriptorBudget, limit: int) -> None:
        self.budget = budget
        self.limit = limit
        self.files: set[int] = set()
        self.pending = 0  # opens under way (counted before wasmtime opens the file)
        self.sockets = 0
        self.guest_only = 0  # of ``sockets``: those with no host descriptor (listeners), not in the budget
        self.refused = 0
        self.closed = False
        self._lock = threading.Lock()

    def count(self) -> int:
        return len(self.files) + self.pending + self.sockets

    def take(self, force: bool = False, host: bool = True) -> None:
        """Count one descriptor more, or raise GuestError(EMFILE/ENFILE). ``force``: count it anyway (a
        restored socket that exists already). ``host`` False: a guest-only socket (a listener), counted
        against this VM's limit but not the daemon's descriptor budget."""
        with self._lock:
            if not force and self.count() >= self.limit:
                self.refused += 1
                self.budget.refused += 1  # (a plain counter for metrics: a lost update costs nothing)
                raise GuestError(EMFILE)
            if not host:
                self.pending += 1
                return
            if not self.budget.take():
                if not force:
                    self.refused += 1
                    raise GuestError(ENFILE)
                self.budget.take_anyway()
            self.pending += 1

    def opened(self, fd: int | None) -> None:
        """A taken descriptor is now guest fd ``fd`` (None: the open failed)."""
        with self._lock:
            self.pending -= 1
            if fd is None or fd in self.files or self.closed:
                self.budget.give()
            else:
                self.files.add(fd)

    def socket_opened(self, host: bool = True) -> None:
        with self._lock:
            self.pending -= 1
            self.sockets += 1
            if not host:
                self.guest_only += 1

    def socket_closed(self, host: bool = True) -> None:
        with self._lock:
            if self.sockets > 0 and not self.closed:
                self.sockets -= 1
                if host:
                    self.budget.give()
                elif self.guest_only > 0:
                    self.guest_only -= 1

    def file_closed(self, fd: int) -> None:
        with self._lock:
            if fd in self.files:
                self.files.discard(fd)
                self.budget.give()

    def renumbered(self, src: int, dst: int) -> None:
        """``fd_renumber(src, dst)`` succeeded: ``dst`` (closed if it was open) is now what ``src`` was."""
        with self._lock:
            had_src, had_dst = src in self.files, dst in self.files
            self.files.discard(src)
            self.files.discard(dst)
            if had_src:
                self.files.add(dst)
            if had_dst:
                self.budget.give()

    def to_api(self) -> dict[str, Any]:
        return {"open": len(self.files) + self.sockets, "files": len(self.files), "sockets": self.sockets,
                "limit": self.limit, "refused": self.refused}

    def close(self) -> None:
        """The VM ended: its store (and every file wasmtime opened for it) is closed right after."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.budget.give(len(self.files) + self.sockets - self.guest_only)
            self.files.clear()
            self.sockets = self.guest_only = 0

    def save(self) -> NoState | None:
        return None  # open WASI files are not part of a snapshot: the restored VM starts with none

    @classmethod
    def load(cls, raw: object) -> NoState:
        return NoState()

    def restore(self, state: NoState) -> None:
        return None


class FilesDevice(Device):
    """Shadows WASI's calls that open and close descriptors, and gives every VM its ``OpenFiles``."""

    name = "files"
    shadows_wasi = True  # modules without path_open get the plain linker: they open no file to count

    def __init__(self, budget: DescriptorBudget) -> None:
        self.budget = budget

    def define(self, linker: wasmtime.Linker) -> None:
        wt.define_host_func(linker, WASI, "path_open", ["i32"] * 5 + ["i64", "i64"] + ["i32"] * 2, ["i32"],
                            _wasi_guarded(self._path_open, "path_open"))
        wt.define_host_func(linker, WASI, "fd_close", ["i32"], ["i32"], _wasi_guarded(self._fd_close, "fd_close"))
        wt.define_host_func(linker, WASI, "fd_renumber", ["i32", "i32"], ["i32"],
                            _wasi_guarded(self._fd_renumber, "fd_renumber"))

    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        vm.devices.add(OpenFiles(self.budget, self.budget.per_vm))

    def metrics(self, hv: DeviceHost) -> list[Metric]:
        b = self.budget
        fam = GaugeMetricFamily("microvmd_open_files", "Descriptors: the guests' budget (limits.total_open_files), "
                                "what guests hold, the daemon's reserve, the process limit", labels=["kind"])
        for kind, value in (("total", b.total), ("used", b.used), ("reserved", b.reserve),
                            ("process_limit", process_limit())):
            fam.add_metric([kind], value)
        refused = CounterMetricFamily("microvmd_open_files_refused_total",
                                      "Guest opens refused with EMFILE or ENFILE", value=b.refused)
        return [fam, refused]

    @staticmethod
    def _context(name: str, mem: wt.GuestMemory) -> tuple[Any, OpenFiles | None]:
        """wasmtime's own call ``name`` for the calling VM (None: it has none) and the VM's open-files part."""
        vm = wt.current_vm()
        machine = getattr(vm, "machine", None)
        real = machine.wasi_call(name, mem) if machine is not None else None
        part = vm.devices.get(OpenFiles) if vm is not None else None
        return real, part

    def _path_open(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        real, part = self._context("path_open", mem)
        if real is None:
            return [ENOSYS]
        dirfd, dirflags, path, path_len, oflags, base, inheriting, fdflags, out = args
        if part is not None:
            part.take()
        fd: int | None = None
        try:
            rc = mem.call(real, [dirfd, dirflags, path, path_len, oflags, *_halves(base), *_halves(inheriting),
                                 fdflags, out])[0]
            if rc == 0:
                fd = struct.unpack("<I", mem.read(out, 4))[0]
        finally:
            if part is not None:
                part.opened(fd)
        return [rc]

    def _fd_close(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        real, part = self._context("fd_close", mem)
        if real is None:
            return [ENOSYS]
        rc = mem.call(real, [args[0]])[0]
        if rc == 0 and part is not None:
            part.file_closed(args[0] & 0xFFFFFFFF)
        return [rc]

    def _fd_renumber(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        real, part = self._context("fd_renumber", mem)
        if real is None:
            return [ENOSYS]
        rc = mem.call(real, [args[0], args[1]])[0]
        if rc == 0 and part is not None:
            part.renumbered(args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF)
        return [rc]


def _wasi_guarded(fn: wt.HostFn, call: str) -> wt.HostFn:
    """``fn`` as a WASI import: WASI answers an errno as it is (the SDK's calls negate it, see ``guarded``)."""
    inner = guarded(fn, log, call)

    def host(mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        result = inner(mem, args)
        if isinstance(result, list) and result and result[0] < 0:
            return [-result[0]]
        return result
    return host


def _halves(value: int) -> tuple[int, int]:
    """An i64 as two i32 arguments (low, high) for the helper's all-i32 ``path_open``."""
    value &= (1 << 64) - 1
    lo, hi = value & 0xFFFFFFFF, value >> 32
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)
