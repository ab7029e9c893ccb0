"""Module ``microvm_blk``: virtual disks (guest-sdk/ABI.md), plus the disk controller behind /v1/disks.

The guest's calls run synchronously on its vCPU worker and move bytes with ``preadv``/``pwritev`` straight
between the disk file and guest memory. Every argument is checked; a bad one comes back as a negative
WASI errno, never as a trap. A call moves at most ``MAX_IO`` bytes (short reads and writes are allowed).

A throttled call does not sleep the worker: it returns a ``ThrottleOp``; the guest is suspended until the
rate limiter's timer fires on the event loop, and the I/O happens when it resumes.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..engine import wt
from ..engine.hostop import HostOp
from ..errors import BadRequest, InvalidState, MicrovmError, NotFound, PayloadTooLarge
from .base import Device, DeviceHost, DevicePart, GuestVm, NoState
from .disks import Backend, Busy, Disk, DiskStore, check_name, check_size, open_backends
from .ratelimit import LimiterConfig, RateLimiter, RateLimitError
from .wasi import EBADF, EFAULT, EINVAL, EIO, ENOSPC, EROFS, errno_of, guarded

log = logging.getLogger("microvmd.blk")

MAX_IO = 16 << 20
UPLOAD_CHUNK = 4 << 20


@dataclass
class BlkStats:
    read_bytes: int = 0
    write_bytes: int = 0
    read_ops: int = 0
    write_ops: int = 0
    flushes: int = 0
    throttled_s: float = 0.0
    errors: int = 0


class Attachment:
    """One disk as one VM sees it: device ``index`` of that VM."""

    def __init__(self, index: int, disk: Disk, mode: str, backend: Backend, limits: LimiterConfig) -> None:
        self.index = index
        self.name = disk.name
        self.mode = mode
        self.size = disk.size
        self.backend = backend
        self.limiter = RateLimiter(limits)
        self.stats = BlkStats()

    @property
    def readonly(self) -> bool:
        return self.mode == "ro"

    def to_api(self) -> dict[str, Any]:
        s = self.stats
        return {"index": self.index, "name": self.name, "mode": self.mode, "size": self.size,
                "read_bytes": s.read_bytes, "write_bytes": s.write_bytes, "read_ops": s.read_ops,
                "write_ops": s.write_ops, "flushes": s.flushes, "throttled_s": round(s.throttled_s, 6),
                "errors": s.errors, "private_bytes": self.backend.private_bytes(),
                "rate_limiter": self.limiter.cfg.to_api()}


class BlkState(DevicePart[NoState]):
    """The disks of one VM (its ``vm.devices`` part ``"blk"``)."""

    name = "blk"

    def __init__(self, device: BlockDevice, vm_id: str, attachments: list[Attachment]) -> None:
        self.device = device
        self.vm_id = vm_id
        self.disks = attachments
        self.busy = Busy()
        self.pending: ThrottleOp | None = None

    def get(self, dev: int) -> Attachment | None:
        return self.disks[dev] if 0 <= dev < len(self.disks) else None

    def to_api(self) -> list[dict[str, Any]]:
        return [a.to_api() for a in self.disks]

    def close(self) -> None:
        """On the event loop when the VM ends (may be called more than once)."""
        self.device.forget(self.vm_id)
        op, self.pending = self.pending, None
        if op is not None:
            op.cancel()
        if self.busy.close():
            self.close_backends()

    # ---- snapshot: a disk's state is its content, which the snapshot captures as a disk (snapshot_views)
    def save(self) -> None:
        return None

    @classmethod
    def load(cls, raw: object) -> NoState:
        return NoState()

    def restore(self, state: NoState) -> None:
        pass

    def snapshot_views(self) -> list[SnapshotView]:
        """What a snapshot copies: each disk as this VM sees it (its cow overlay merged in)."""
        return [SnapshotView(self, a) for a in self.disks]

    def close_backends(self) -> None:
        for a in self.disks:
            try:
                a.backend.close()
            except OSError as exc:
                log.warning("closing disk %s: %s", a.name, exc)


class SnapshotView:
    """One disk's point-in-time content, read on an I/O thread while the VM is frozen."""

    def __init__(self, state: BlkState, att: Attachment) -> None:
        self._state = state
        self._att = att
        self.index, self.name, self.mode = att.index, att.name, att.mode

    def size(self) -> int:
        return int(self._att.size)

    def read_at(self, off: int, n: int) -> bytes:
        """``n`` bytes at ``off`` as the VM sees them (a snapshot streams a disk chunk by chunk)."""
        buf = bytearray(n)
        if not self._state.busy.enter():
            raise MicrovmError(f"disk {self.name} was detached", code="disk_detached")
        try:
            self._att.backend.read_into(memoryview(buf), off)
        finally:
            if self._state.busy.leave():
                self._state.close_backends()
        return bytes(buf)


class ThrottleOp(HostOp):
    """A disk call waiting for its rate limiter; ``finish`` does the I/O on the worker once woken."""

    name = "blk_throttle"

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, io: Callable[[wt.GuestMemory], int]) -> None:
        super().__init__()
        self._io = io
        self._handle: asyncio.TimerHandle | None = None
        loop.call_soon_threadsafe(self._arm, loop, seconds)

    def _arm(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        if not self.cancelled and not self.ready():
            self._handle = loop.call_later(seconds, self.set_result, 0)

    def wake_now(self) -> None:
        """On the event loop: the limit was lifted or changed; go ahead without waiting."""
        if self._handle is not None:
            self._handle.cancel()
        self.set_result(0)

    def cancel(self) -> None:
        super().cancel()
        if self._handle is not None:
            self._handle.cancel()

    def finish(self, mem: wt.GuestMemory) -> Sequence[int]:
        return [self._io(mem)]


class BlockDevice(Device):
    """Defines the ``microvm_blk`` imports, attaches disks to VMs and is the controller of the disk store."""

    name = "blk"

    def __init__(self, hv: DeviceHost) -> None:
        self.hv = hv
        self.store = DiskStore(hv.cfg.state_dir / "disks")
        self.store.load()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.states: dict[str, BlkState] = {}

    # ------------------------------------------------------------------ guest imports
    def define(self, linker: wasmtime.Linker) -> None:
        m = "microvm_blk"
        wt.define_host_func(linker, m, "blk_count", [], ["i32"], self._guarded(self._count))
        wt.define_host_func(linker, m, "blk_size", ["i32"], ["i64"], self._guarded(self._size))
        wt.define_host_func(linker, m, "blk_flags", ["i32"], ["i32"], self._guarded(self._flags))
        wt.define_host_func(linker, m, "blk_read", ["i32", "i64", "i32", "i32"], ["i32"], self._guarded(self._read))
        wt.define_host_func(linker, m, "blk_write", ["i32", "i64", "i32", "i32"], ["i32"],
                            self._guarded(self._write))
        wt.define_host_func(linker, m, "blk_flush", ["i32"], ["i32"], self._guarded(self._flush))

    @staticmethod
    def _guarded(fn: wt.HostFn) -> wt.HostFn:
        return guarded(fn, log, "microvm_blk call")

    @staticmethod
    def _state() -> BlkState | None:
        vm: GuestVm | None = wt.current_vm()
        return vm.devices.get(BlkState) if vm is not None else None

    def _count(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        st = self._state()
        return [len(st.disks) if st is not None else 0]

    def _size(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        st = self._state()
        att = st.get(args[0]) if st is not None else None
        return [att.size if att is not None else -EBADF]

    def _flags(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        st = self._state()
        att = st.get(args[0]) if st is not None else None
        return [(1 if att.readonly else 0) if att is not None else -EBADF]

    def _read(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        return self._transfer(mem, args, write=False)

    def _write(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        return self._transfer(mem, args, write=True)

    def _transfer(self, mem: wt.GuestMemory, args: Sequence[int], write: bool) -> wt.HostResult:
        dev, offset, ptr, length = args
        st = self._state()
        att = st.get(dev) if st is not None else None
        if st is None or att is None:
            return [-EBADF]
        if offset < 0 or length < 0:
            return self._fail(att, EINVAL)
        if write and att.readonly:
            return self._fail(att, EROFS)
        ptr &= 0xFFFFFFFF
        length = min(length, MAX_IO)
        if not mem.check(ptr, length):
            return self._fail(att, EFAULT)
        n = max(0, min(length, att.size - offset))
        if n == 0:
            if write and length > 0:
                return self._fail(att, ENOSPC)
            return [0]
        if not att.limiter.enabled:  # the common case: no rate limiter, so no lock, no closure, no op
            return [self._do_transfer(st, att, mem, offset, ptr, n, write)]

        def io(m: wt.GuestMemory) -> int:
            return self._do_transfer(st, att, m, offset, ptr, n, write)

        return self._throttled(mem, st, att, n, io)

    def _flush(self, mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
        st = self._state()
        att = st.get(args[0]) if st is not None else None
        if st is None or att is None:
            return [-EBADF]
        return self._throttled(mem, st, att, 0, lambda m: self._do_flush(st, att))

    def _throttled(self, mem: wt.GuestMemory, st: BlkState, att: Attachment, nbytes: int,
                   io: Callable[[wt.GuestMemory], int]) -> wt.HostResult:
        delay = att.limiter.reserve(nbytes)
        if delay <= 0:
            return [io(mem)]
        vm: GuestVm = wt.current_vm()
        assert self.loop is not None
        att.stats.throttled_s += delay
        op = ThrottleOp(self.loop, delay, lambda m: self._guarded_io(att, io, m))
        st.pending = op
        vm.block_on(op)
        return op

    @staticmethod
    def _fail(att: Attachment, err: int) -> list[int]:
        att.stats.errors += 1
        return [-err]

    def _guarded_io(self, att: Attachment, io: Callable[[wt.GuestMemory], int], mem: wt.GuestMemory) -> int:
        try:
            return io(mem)
        except Exception as exc:
            att.stats.errors += 1
            return -errno_of(exc, log, "microvm_blk call")

    def _do_transfer(self, st: BlkState, att: Attachment, mem: wt.GuestMemory, offset: int, ptr: int, n: int,
                     write: bool) -> int:
        try:
            view = mem.view(ptr, n)  # checked again: the guest may have been suspended (and grown) since
        except wt.MemoryFault:
            return self._fail(att, EFAULT)[0]
        if not st.busy.enter():
            return self._fail(att, EIO)[0]
        try:
            if write:
                att.backend.write_from(view, offset)
                att.stats.write_bytes += n
                att.stats.write_ops += 1
            else:
                att.backend.read_into(view, offset)
                att.stats.read_bytes += n
                att.stats.read_ops += 1
            return n
        except OSError as exc:
            return self._fail(att, ENOSPC if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EIO)[0]
        finally:
            view.release()
            if st.busy.leave():
                st.close_backends()

    def _do_flush(self, st: BlkState, att: Attachment) -> int:
        if not st.busy.enter():
            return self._fail(att, EIO)[0]
        try:
            att.backend.flush()
            att.stats.flushes += 1
            return 0
        except OSError:
            return self._fail(att, EIO)[0]
        finally:
            if st.busy.leave():
                st.close_backends()

    # ------------------------------------------------------------------ VM lifecycle
    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        self.loop = asyncio.get_running_loop()
        specs = list(vm.spec.disks or [])
        if not specs:
            return
        try:
            limits = [LimiterConfig.from_dict(s.rate_limiter) for s in specs]
        except RateLimitError as exc:
            raise BadRequest(str(exc), code="invalid_field") from None
        self._prune()
        disks = self.store.claim(vm.id, vm.name, [(s.name, s.mode) for s in specs])
        try:
            backends = await hv.sched.on_io(open_backends, disks, [s.mode for s in specs], vm.dir)
        except BaseException as exc:
            self.store.release(vm.id)
            if isinstance(exc, OSError):
                raise MicrovmError(f"cannot open disk: {exc.strerror or exc}", code="disk_open_failed") from None
            raise
        st = BlkState(self, vm.id, [Attachment(i, d, s.mode, b, lim)
                                    for i, (d, s, b, lim) in enumerate(zip(disks, specs, backends, limits,
                                                                          strict=True))])
        self.states[vm.id] = st
        vm.devices.add(st)
        vm.log.info("attached disks %s", ", ".join(f"{a.index}:{a.name}:{a.mode}" for a in st.disks))

    def forget(self, vm_id: str) -> None:
        self.states.pop(vm_id, None)
        self.store.release(vm_id)

    def _prune(self) -> None:
        """Drop the claims of VMs that ended without closing their devices (e.g. a failed create)."""
        for vm_id, st in list(self.states.items()):
            vm = self.hv.vms.get(vm_id)
            if vm is None or vm.state.terminal:
                st.close()

    def metrics(self, hv: DeviceHost) -> list[Metric]:
        series = {
            "read_bytes": ("microvmd_blk_read_bytes_total", "Bytes read by guests from virtual disks"),
            "write_bytes": ("microvmd_blk_write_bytes_total", "Bytes written by guests to virtual disks"),
            "read_ops": ("microvmd_blk_read_ops_total", "Guest disk reads"),
            "write_ops": ("microvmd_blk_write_ops_total", "Guest disk writes"),
            "flushes": ("microvmd_blk_flushes_total", "Guest disk flushes"),
            "errors": ("microvmd_blk_errors_total", "Guest disk calls that returned an error"),
            "throttled_s": ("microvmd_blk_throttled_seconds_total", "Time guests waited for disk rate limits"),
        }
        atts = [(vm.id[:12], a) for vm in list(hv.vms.values())
                if (st := vm.devices.get(BlkState)) is not None for a in st.disks]
        out: list[Metric] = [GaugeMetricFamily("microvmd_disks", "Virtual disks in the store",
                                               value=len(self.store.disks))]
        for key, (metric, help_) in series.items():
            fam = CounterMetricFamily(metric, help_, labels=["vm", "disk", "index"])
            for vm_id, a in atts:
                fam.add_metric([vm_id, a.name, str(a.index)], getattr(a.stats, key))
            out.append(fam)
        return out

    async def shutdown(self) -> None:
        for st in list(self.states.values()):
            st.close()

    # ------------------------------------------------------------------ disk controller (API)
    def list_disks(self) -> list[Disk]:
        self._prune()
        return self.store.all()

    def get_disk(self, name: str) -> Disk:
        self._prune()
        return self.store.get(name)

    async def create_disk(self, name: Any, size: Any, durable: bool = True) -> Disk:
        check_name(name)
        size = check_size(size)
        self.store.reserve(name)
        try:
            disk = await self.hv.sched.on_io(self.store.create_files, name, size, durable)
        except OSError as exc:
            self.store.unreserve(name)
            raise MicrovmError(f"cannot create disk {name}: {exc.strerror or exc}", code="disk_create_failed") \
                from None
        except BaseException:
            self.store.unreserve(name)
            raise
        self.store.added(disk)
        log.info("created disk %s (%d bytes)", name, size)
        return disk

    async def materialize_with(self, name: str, size: int, fill: Callable[[int], None],
                               keep_name: bool = False) -> str:
        """A new sparse disk of ``size`` bytes that ``fill(fd)`` writes (on an I/O thread), durably; returns
        its name: ``name`` itself when ``keep_name`` and it is free, else ``NAME.restored-HEX``."""
        new = name if keep_name and name not in self.store.disks and not self.store.reserved(name) else \
            f"{name[:100]}.restored-{uuid.uuid4().hex[:8]}"
        disk = await self.create_disk(new, size)
        disk.uploading = True

        def run() -> None:
            fd = os.open(disk.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                fill(fd)
                os.fsync(fd)  # (the restore's answer acknowledges the content as the VM's disk)
            finally:
                os.close(fd)
        try:
            await self.hv.sched.on_io(run)
        except BaseException:
            del self.store.disks[new]
            await self.hv.sched.on_io(self.store.remove_files, disk)
            raise
        finally:
            disk.uploading = False
        return new

    async def remove_disk(self, name: str) -> None:
        self._prune()
        disk = self.store.check_removable(name)
        del self.store.disks[name]
        await self.hv.sched.on_io(self.store.remove_files, disk)
        log.info("removed disk %s", name)

    async def upload(self, name: str, chunks: AsyncIterator[bytes], limit: int, durable: bool = True) -> Disk:
        """Replace a disk's content with the uploaded bytes; size becomes max(size, bytes received)."""
        self._prune()
        disk = self.store.check_removable(name)
        disk.uploading = True
        sched = self.hv.sched
        try:
            fd = await sched.on_io(self.store.open_upload, name)
            total, buf = 0, bytearray()
            try:
                async for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"content is larger than the maximum disk size of {limit} bytes")
                    buf += chunk
                    if len(buf) >= UPLOAD_CHUNK:
                        data, buf = bytes(buf), bytearray()
                        await sched.on_io(_write_all, fd, data)
                if buf:
                    await sched.on_io(_write_all, fd, bytes(buf))
            except BaseException:
                await sched.on_io(self.store.abort_upload, name, fd)
                raise
            disk.size = await sched.on_io(self.store.finish_upload, disk, fd, total, durable)
        except OSError as exc:
            raise MicrovmError(f"cannot write disk {name}: {exc.strerror or exc}", code="disk_write_failed") \
                from None
        finally:
            disk.uploading = False
        log.info("disk %s: %d bytes of content, size %d", name, total, disk.size)
        return disk

    def vm_disk(self, vm: GuestVm, index: int) -> tuple[BlkState, Attachment]:
        st = vm.devices.get(BlkState)
        att = st.get(index) if st is not None else None
        if st is None or att is None:
            raise NotFound(f"VM {vm.name} has no disk {index}", code="disk_not_attached")
        return st, att

    def set_rate_limiter(self, vm: GuestVm, index: int, body: Any) -> dict[str, Any]:
        """PATCH semantics: ``{"rate_limiter": null}`` removes it; a bucket left out keeps its setting."""
        if not isinstance(body, dict) or "rate_limiter" not in body:
            raise BadRequest("body must be {\"rate_limiter\": {\"bandwidth\": ..., \"ops\": ...} or null}",
                             code="invalid_field")
        st, att = self.vm_disk(vm, index)
        if vm.state.terminal:
            raise InvalidState(f"VM {vm.name} is {vm.state.value}; its disks are detached")
        try:
            cfg = att.limiter.cfg.updated(body["rate_limiter"])
        except RateLimitError as exc:
            raise BadRequest(str(exc), code="invalid_field") from None
        att.limiter.configure(cfg)
        op = st.pending
        if op is not None and not op.ready():
            op.wake_now()  # it waited under the old limits; the new buckets start full
        vm.log.info("disk %d (%s): rate limiter %s", index, att.name, cfg.to_api())
        return att.to_api()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
