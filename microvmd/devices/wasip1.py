"""Module ``microvm_wasi``: WASI's blocking calls served by the daemon, so that they suspend the guest.

A module rewritten with Asyncify at import (images/rewrite.py) imports ``fd_read``, ``poll_oneoff`` and
``clock_time_get`` from here instead of ``wasi_snapshot_preview1``. The first two are suspension points: a
guest blocked in them holds no thread and can be paused, stopped or snapshotted, as with the SDK's
``sleep_ms``.

- ``poll_oneoff``: clock subscriptions (relative or absolute; realtime, monotonic, and the CPU-time clocks
  as monotonic) wait on an event-loop timer; ``fd_read`` on fd 0 waits for the VM's stdin; every other fd
  subscription (files, stdout, stderr) is reported ready at once, as wasmtime does for files.
- ``clock_time_get``: realtime is the host's; the monotonic clock counts from the VM's creation and goes on
  across a snapshot (``WasiState``), so a deadline the guest computed before it still means the same.
- ``fd_read`` on fd 0 reads the VM's ``StdinBuffer`` (the hook for ``run -i``/``attach``: ``feed``/``close``);
  other descriptors go to wasmtime's own ``fd_read`` through a small helper instance in the same
  store (WASI's host functions need a caller that exports the memory).

A suspended call is repeated from its start after a snapshot (rewind): a relative sleep sleeps again in
full, a read reads what is there on the new host.
"""
from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime

from ..engine import wt
from ..engine.hostop import HostOp
from ..images.rewrite import HOST_MODULE, WASI
from .base import Device, DeviceHost, DevicePart, GuestVm
from .wasi import guarded

log = logging.getLogger("microvmd.wasi")

ESUCCESS, EBADF, EFAULT, EINVAL = 0, 8, 21, 28
SUB_SIZE, EVENT_SIZE = 48, 32
CLOCK_REALTIME = 0
TAG_CLOCK, TAG_FD_READ, TAG_FD_WRITE = 0, 1, 2
ABSTIME = 1
HANGUP = 1
MAX_SUBSCRIPTIONS = 4096
STDIN_LIMIT = 1 << 20  # bytes kept for a guest that does not read (feed refuses more)

_SUB = struct.Struct("<QB7xIxxxxQQH6x")  # userdata, tag, (clock id | fd), timeout, precision, flags
_EVENT = struct.Struct("<QHBxxxxxQH6x")  # userdata, error, type, nbytes, flags
assert _SUB.size == SUB_SIZE and _EVENT.size == EVENT_SIZE

HELPER_WAT = f"""(module
  (import "{WASI}" "fd_read" (func $read (param i32 i32 i32 i32) (result i32)))
  (import "{WASI}" "path_open" (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "{WASI}" "fd_close" (func $close (param i32) (result i32)))
  (import "{WASI}" "fd_renumber" (func $renumber (param i32 i32) (result i32)))
  (import "env" "memory" (memory 0))
  (export "memory" (memory 0))
  (func $i64 (param i32 i32) (result i64)
    (i64.or (i64.extend_i32_u (local.get 0)) (i64.shl (i64.extend_i32_u (local.get 1)) (i64.const 32))))
  (func (export "fd_read") (param i32 i32 i32 i32) (result i32)
    (call $read (local.get 0) (local.get 1) (local.get 2) (local.get 3)))
  (func (export "path_open") (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)
    (call $open (local.get 0) (local.get 1) (local.get 2) (local.get 3) (local.get 4)
      (call $i64 (local.get 5) (local.get 6)) (call $i64 (local.get 7) (local.get 8))
      (local.get 9) (local.get 10)))
  (func (export "fd_close") (param i32) (result i32) (call $close (local.get 0)))
  (func (export "fd_renumber") (param i32 i32) (result i32) (call $renumber (local.get 0) (local.get 1))))"""
HELPER_CALLS = ("fd_read", "path_open", "fd_close", "fd_renumber")
_helpers: dict[int, wasmtime.Module] = {}
_helpers_lock = threading.Lock()


def helper_module(engine: wasmtime.Engine) -> wasmtime.Module:
    """The helper module, compiled once per engine (the builder asks for it at start-up, so that no VM's
    first file call compiles it on a vCPU worker)."""
    with _helpers_lock:
        mod = _helpers.get(id(engine))
        if mod is None:
            mod = _helpers[id(engine)] = wasmtime.Module(engine, HELPER_WAT)
        return mod


def wasi_helper(engine: wasmtime.Engine, store: Any, memory: wasmtime.Memory) -> dict[str, wasmtime.Func]:
    """wasmtime's own WASI calls for this store (``store``: a wasmtime.Store, or the caller's store inside a
    host call, where Machine.wasi_call makes them on first use), callable from a host function: ``fd_read``
    (the daemon's own serves stdin only) and the calls that open and close descriptors (devices/files.py
    counts them). ``path_open`` takes its two i64 rights as (low, high) i32 pairs, so that every argument is
    an i32."""
    mod = helper_module(engine)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    linker.define(store, "env", "memory", memory)
    inst = wt.instantiate(store, linker, mod)
    exports = inst.exports(store)
    calls = {}
    for name in HELPER_CALLS:
        func = exports[name]
        assert isinstance(func, wasmtime.Func)
        calls[name] = func
    return calls


class StdinBuffer:
    """A VM's standard input, as the daemon serves it to a rewritten guest.

    ``feed(data)`` adds bytes, ``close()`` ends the input (EOF once the bytes are read). It starts closed
    (a guest reading stdin sees EOF) unless made with ``open=True``; ``reopen()`` opens it again. Called on
    the event loop; the guest reads on its vCPU worker.
    """

    def __init__(self, open: bool = False) -> None:  # noqa: A002 - the natural word here
        self._lock = threading.Lock()
        self._data = bytearray()
        self.eof = not open
        self._waiters: list[HostOp] = []
        # feeders (POST .../stdin) waiting for the guest to make room, each woken on its own loop
        self._room: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def feed(self, data: bytes) -> int:
        """Add input; returns how many bytes were taken (fewer when STDIN_LIMIT is buffered already)."""
        with self._lock:
            if self.eof:
                raise ValueError("stdin is closed")
            n = max(0, min(len(data), STDIN_LIMIT - len(self._data)))
            self._data += data[:n]
            waiters = self._waiters if n else []
            if n:
                self._waiters = []
        for op in waiters:
            op.set_result(None)
        return n

    def close(self) -> None:
        with self._lock:
            self.eof = True
            waiters, self._waiters = self._waiters, []
            room, self._room = self._room, []
        for op in waiters:
            op.set_result(None)
        _wake(room)

    def room(self) -> asyncio.Future[None]:
        """On the event loop: a future that is done once the buffer has room again (the guest read some of
        it) or the input is closed (the VM ended, another attacher closed it). A feeder awaits it instead
        of polling."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.eof or len(self._data) < STDIN_LIMIT:
                fut.set_result(None)
            else:
                self._room.append((loop, fut))
        return fut

    def reopen(self) -> None:
        with self._lock:
            self.eof = False

    def ready(self) -> bool:
        return bool(self._data) or self.eof

    def buffered(self) -> int:
        return len(self._data)

    def pending(self) -> bytes:
        """The input not read yet (for a snapshot)."""
        with self._lock:
            return bytes(self._data)

    def replace(self, data: bytes, eof: bool) -> None:
        """The input as a snapshot left it (a restored VM, before it runs)."""
        with self._lock:
            self._data = bytearray(data)
            self.eof = eof
            room, self._room = self._room, []
        _wake(room)

    def take(self, n: int) -> bytes | None:
        """Up to ``n`` bytes; b"" at end of input; None when the guest would have to wait."""
        with self._lock:
            if self._data:
                out = bytes(self._data[:n])
                del self._data[:n]
                room, self._room = self._room, []
            else:
                return b"" if self.eof else None
        _wake(room)  # (on the guest's vCPU worker: through the feeder's loop)
        return out

    def wake_on_input(self, op: HostOp) -> None:
        with self._lock:
            if not (self._data or self.eof):
                self._waiters.append(op)
                return
        op.set_result(None)

    def forget(self, op: HostOp) -> None:
        with self._lock:
            if op in self._waiters:
                self._waiters.remove(op)


def _wake(room: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    for loop, fut in room:
        loop.call_soon_threadsafe(_settle, fut)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True)
class WasiSaved:
    """What a snapshot keeps of a rewritten guest's WASI part: input not read yet, and its clock."""

    stdin: bytes
    stdin_eof: bool
    monotonic_ns: int

    def encode(self) -> dict[str, Any]:
        return {"stdin": self.stdin, "stdin_eof": self.stdin_eof, "monotonic_ns": self.monotonic_ns}


class WasiState(DevicePart[WasiSaved]):
    """A rewritten guest's part in ``vm.devices`` (``"wasi"``): its stdin and its monotonic clock, which
    counts from the VM's creation and goes on from where it was after a restore (WASI says it never goes
    back; wasmtime's own would start again at 0 in the new VM)."""

    name = "wasi"

    def __init__(self, stdin_open: bool = False) -> None:
        self.stdin = StdinBuffer(open=stdin_open)
        self.mono_base_ns = time.monotonic_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns() - self.mono_base_ns

    def to_api(self) -> dict[str, Any]:
        return {"stdin": {"buffered": self.stdin.buffered(), "eof": self.stdin.eof}}

    def save(self) -> WasiSaved:
        return WasiSaved(self.stdin.pending(), self.stdin.eof, self.monotonic_ns())

    @classmethod
    def load(cls, raw: object) -> WasiSaved:
        if not isinstance(raw, dict):
            raise ValueError("the wasi state must be a map")
        data = raw.get("stdin", b"")
        if not isinstance(data, (bytes, bytearray)) or len(data) > STDIN_LIMIT:
            raise ValueError("stdin must be at most 1 MiB of bytes")
        mono = raw.get("monotonic_ns", 0)
        if isinstance(mono, bool) or not isinstance(mono, int) or not 0 <= mono < 1 << 62:
            raise ValueError("monotonic_ns must be a count of nanoseconds")
        return WasiSaved(bytes(data), bool(raw.get("stdin_eof", True)), mono)

    def restore(self, state: WasiSaved) -> None:
        self.stdin.replace(state.stdin, state.stdin_eof)
        self.mono_base_ns = time.monotonic_ns() - state.monotonic_ns

    def close(self) -> None:
        self.stdin.close()


class WaitOp(HostOp):
    """Until a deadline (host monotonic ns, or None) passes or stdin has input; then ``answer`` runs."""

    name = "wasi_wait"

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline_ns: int | None, stdin: StdinBuffer | None,
                 answer: Callable[[wt.GuestMemory], Sequence[int]], name: str) -> None:
        super().__init__()
        self.name = name  # the call the guest is blocked in, as inspect shows it (blocked_in)
        self._handle: asyncio.TimerHandle | None = None
        self._stdin = stdin
        self._answer_fn = answer
        if stdin is not None:
            stdin.wake_on_input(self)
        if deadline_ns is not None:
            loop.call_soon_threadsafe(self._arm, loop, max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))

    def _arm(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        if not self.cancelled and not self.ready():
            self._handle = loop.call_later(seconds, self.set_result, 0)

    def cancel(self) -> None:
        super().cancel()
        if self._handle is not None:
            self._handle.cancel()
        if self._stdin is not None:
            self._stdin.forget(self)

    def finish(self, mem: wt.GuestMemory) -> Sequence[int]:
        if self._handle is not None:
            self._handle.cancel()
        if self._stdin is not None:
            self._stdin.forget(self)
        return self._answer_fn(mem)


class WasiDevice(Device):
    """WASI's blocking calls for rewritten guests (module ``microvm_wasi``); a part for each such VM."""

    name = "wasi"

    def __init__(self, images: Any) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.images = images  # which modules were rewritten: their imports name microvm_wasi
        self._rewritten: dict[str, bool] = {}  # by image digest

    def define(self, linker: wasmtime.Linker) -> None:
        wt.define_host_func(linker, HOST_MODULE, "poll_oneoff", ["i32"] * 4, ["i32"],
                            guarded(self._poll, log, "poll_oneoff"), suspends=True)
        wt.define_host_func(linker, HOST_MODULE, "fd_read", ["i32"] * 4, ["i32"],
                            guarded(self._fd_read, log, "fd_read"), suspends=True)
        wt.define_host_func(linker, HOST_MODULE, "clock_time_get", ["i32", "i64", "i32"], ["i32"],
                            guarded(self._clock, log, "clock_time_get"))

    # ---- clock_time_get ----
    def _clock(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        clock_id, _precision, out = args
        if clock_id == CLOCK_REALTIME:
            now = time.time_ns()
        elif 0 < clock_id <= 3:  # monotonic, and the CPU-time clocks as monotonic (as wasmtime does)
            state = self._state(wt.current_vm())
            now = state.monotonic_ns() if state is not None else time.monotonic_ns()
        else:
            return [EINVAL]
        try:
            mem.write(out, struct.pack("<Q", now))
        except wt.MemoryFault:
            return [EFAULT]
        return [ESUCCESS]

    async def attach(self, hv: DeviceHost, vm: GuestVm) -> None:
        self.loop = asyncio.get_running_loop()
        digest = getattr(vm, "digest", "")
        rewritten = self._rewritten.get(digest)
        if rewritten is None:  # once per image (a digest names one module for good), not at every create
            try:
                img = self.images.resolve(digest)
            except Exception:  # noqa: BLE001 - no image, no part: the create fails on its own
                return
            prefix = f"{HOST_MODULE}."
            rewritten = self._rewritten[digest] = any(i.startswith(prefix) for i in img.imports)
        if rewritten:
            part = WasiState(stdin_open=bool(getattr(vm.spec, "stdin", False)))
            data = getattr(vm.spec, "stdin_data", None)
            if data is not None:  # all of the input at once, then end of file (a function's request body)
                part.stdin.replace(data, True)
            vm.devices.add(part)

    # ---- poll_oneoff ----
    def _poll(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        vm = wt.current_vm()
        in_ptr, out_ptr, nsubs, nevents_ptr = args
        if nsubs <= 0 or nsubs > MAX_SUBSCRIPTIONS:
            return [EINVAL]
        try:
            raw = mem.read(in_ptr, nsubs * SUB_SIZE)
            mem.check(out_ptr, nsubs * EVENT_SIZE) or _fault()
            mem.check(nevents_ptr, 4) or _fault()
        except wt.MemoryFault:
            return [EFAULT]
        state = self._state(vm)
        base = state.mono_base_ns if state is not None else 0
        now = time.monotonic_ns()
        subs = []
        deadline: int | None = None
        wants_stdin = False
        for i in range(nsubs):
            userdata, tag, which, timeout, _precision, flags = _SUB.unpack_from(raw, i * SUB_SIZE)
            due: int | None = None
            if tag == TAG_CLOCK:
                if not flags & ABSTIME:
                    due = now + timeout
                elif which == CLOCK_REALTIME:
                    due = now + (timeout - time.time_ns())
                else:  # monotonic (and the CPU-time clocks): WASI counts from the context's creation
                    due = base + timeout
                deadline = due if deadline is None else min(deadline, due)
            elif tag == TAG_FD_READ and which == 0:
                wants_stdin = True
            elif tag not in (TAG_FD_READ, TAG_FD_WRITE):
                return [EINVAL]
            subs.append((userdata, tag, which, due))
        stdin = state.stdin if state is not None else None

        def answer(m: wt.GuestMemory, final: bool = True) -> list[int] | None:
            t = time.monotonic_ns()
            events = []
            for userdata, tag, which, due in subs:
                if tag == TAG_CLOCK:
                    if due is not None and t >= due:
                        events.append(_EVENT.pack(userdata, 0, TAG_CLOCK, 0, 0))
                elif tag == TAG_FD_READ and which == 0:
                    if stdin is None:
                        events.append(_EVENT.pack(userdata, 0, tag, 0, HANGUP))
                    elif stdin.ready():
                        n = stdin.buffered()
                        events.append(_EVENT.pack(userdata, 0, tag, n, HANGUP if not n and stdin.eof else 0))
                else:
                    events.append(_EVENT.pack(userdata, 0, tag, 0, 0))
            if not events:
                if not final:
                    return None
                # woken a hair before the deadline (timer rounding): the earliest clock has fired
                first = min((s for s in subs if s[3] is not None), key=lambda s: s[3] or 0, default=None)
                if first is not None:
                    events.append(_EVENT.pack(first[0], 0, TAG_CLOCK, 0, 0))
            m.write(out_ptr, b"".join(events))
            m.write(nevents_ptr, struct.pack("<I", len(events)))
            return [ESUCCESS]

        done = answer(mem, final=False)
        if done is not None:
            return done
        assert self.loop is not None
        op = WaitOp(self.loop, deadline, stdin if wants_stdin else None, lambda m: answer(m) or [ESUCCESS],
                    "poll_oneoff")
        vm.block_on(op)
        return op

    # ---- fd_read ----
    def _fd_read(self, mem: wt.GuestMemory, args: Sequence[int]) -> Any:
        vm = wt.current_vm()
        fd, iovs, iovs_len, nread_ptr = args
        machine = vm.machine
        if fd != 0:
            real = machine.wasi_call("fd_read", mem) if machine is not None else None
            if real is None:
                return [EBADF]
            return mem.call(real, list(args))
        state = self._state(vm)
        if state is None:
            return [EBADF]
        try:
            mem.check(nread_ptr, 4) or _fault()
            vecs = [struct.unpack_from("<II", mem.read(iovs + 8 * i, 8)) for i in range(min(iovs_len, 1024))]
            for ptr, length in vecs:
                mem.check(ptr, length) or _fault()
        except wt.MemoryFault:
            return [EFAULT]
        total = sum(length for _, length in vecs)

        def answer(m: wt.GuestMemory) -> list[int]:
            data = state.stdin.take(total) or b""
            pos = 0
            for ptr, length in vecs:
                if pos >= len(data):
                    break
                chunk = data[pos:pos + length]
                m.write(ptr, chunk)
                pos += len(chunk)
            m.write(nread_ptr, struct.pack("<I", len(data)))
            return [ESUCCESS]

        if state.stdin.ready() or total == 0:
            return answer(mem)
        assert self.loop is not None
        op = WaitOp(self.loop, None, state.stdin, answer, "fd_read")
        vm.block_on(op)
        return op

    @staticmethod
    def _state(vm: Any) -> WasiState | None:
        return vm.devices.get(WasiState) if vm is not None else None


def _fault() -> bool:
    raise wt.MemoryFault("bad pointer")
