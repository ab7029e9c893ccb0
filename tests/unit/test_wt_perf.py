"""The fast host-call path of engine/wt.py (raw argument/result marshalling, lazily resolved guest memory, the
native "ready" continuation) and the hand-over helpers of engine/hostop.py: same answers as before, only cheaper.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import wasmtime

from microvmd.devices.net import RecvBuffer
from microvmd.engine import wt
from microvmd.engine.hostop import HostOp, loop_waker, wait_in_call

WAT = """(module
  (import "t" "i32" (func $i32 (param i32 i32) (result i32)))
  (import "t" "i64" (func $i64 (param i64 i32) (result i64)))
  (import "t" "two" (func $two (param i32) (result i32 i64)))
  (import "t" "mem" (func $mem (param i32 i32) (result i32)))
  (import "t" "pend" (func $pend (param i32) (result i32)))
  (import "t" "none" (func $none))
  (memory (export "memory") 1)
  (global $r64 (export "r64") (mut i64) (i64.const 0))
  (func (export "call_i32") (param i32 i32) (result i32) (call $i32 (local.get 0) (local.get 1)))
  (func (export "call_i64") (param i64 i32) (result i64) (call $i64 (local.get 0) (local.get 1)))
  (func (export "call_two") (param i32) (result i32)
    (call $two (local.get 0)) (global.set $r64))
  (func (export "call_mem") (param i32 i32) (result i32) (call $mem (local.get 0) (local.get 1)))
  (func (export "call_pend") (param i32) (result i32) (call $pend (local.get 0)))
  (func (export "call_none") (call $none))
  (func (export "grow_then_mem") (param i32) (result i32)
    (drop (memory.grow (i32.const 1)))
    (call $mem (local.get 0) (i32.const 8)))
  (func (export "loop_i32") (param $n i32)
    (block $done (loop $next
      (br_if $done (i32.eqz (local.get $n)))
      (drop (call $i32 (local.get $n) (i32.const 1)))
      (local.set $n (i32.sub (local.get $n) (i32.const 1)))
      (br $next))))
)"""

NOMEM_WAT = """(module
  (import "t" "mem" (func $mem (param i32 i32) (result i32)))
  (func (export "call_mem") (param i32 i32) (result i32) (call $mem (local.get 0) (local.get 1))))"""


class Ready:
    def __init__(self, value: int, ready: Callable[[], bool] = lambda: True) -> None:
        self.value, self._ready = value, ready

    def ready(self) -> bool:
        return self._ready()

    def complete(self, mem: wt.GuestMemory) -> Sequence[int]:
        mem.write(0, b"done")
        return [self.value]


class Env:
    """A linker with the test imports; ``seen`` records what the host functions received."""

    def __init__(self) -> None:
        self.engine = wt.make_engine(wt.EngineOptions())
        self.linker = wasmtime.Linker(self.engine)
        self.seen: list[Any] = []
        self.mem_op: Callable[[wt.GuestMemory, Sequence[int]], Any] = lambda mem, a: [0]
        self.pend_ready = True
        d = wt.define_host_func
        d(self.linker, "t", "i32", ["i32", "i32"], ["i32"], self._i32)
        d(self.linker, "t", "i64", ["i64", "i32"], ["i64"], self._i64)
        d(self.linker, "t", "two", ["i32"], ["i32", "i64"], lambda mem, a: [a[0] + 1, -(a[0] << 40)])
        d(self.linker, "t", "mem", ["i32", "i32"], ["i32"], lambda mem, a: self.mem_op(mem, a))
        d(self.linker, "t", "pend", ["i32"], ["i32"],
          lambda mem, a: Ready(a[0] * 2, lambda: self.pend_ready))
        d(self.linker, "t", "none", [], [], lambda mem, a: self.seen.append(tuple(a)) or [])

    def _i32(self, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        self.seen.append(tuple(a))
        if a[1] == 99:
            raise wt.HostTrap("asked to trap")
        if a[1] == 98:
            raise ValueError("a device bug")
        return [a[0] - a[1]]

    def _i64(self, mem: wt.GuestMemory, a: Sequence[int]) -> Any:
        self.seen.append(tuple(a))
        return (a[0] * 2,)

    def instance(self, wat: str = WAT) -> tuple[wasmtime.Store, Any]:
        store = wasmtime.Store(self.engine)
        store.set_fuel(1 << 62)
        wt.yield_on_every_epoch(store)
        inst = wt.instantiate(store, self.linker, wasmtime.Module(self.engine, wat))
        return store, inst.exports(store)


def run(store: wasmtime.Store, func: Any, args: Sequence[int] = (), kinds: Sequence[int] | None = None,
        nresults: int = 1, max_polls: int = 1000) -> wt.Outcome:
    call = wt.GuestCall(store, func, args, kinds=kinds, nresults=nresults)
    try:
        for _ in range(max_polls):
            if call.poll():
                return call.outcome()
        raise AssertionError("the call did not finish")
    finally:
        call.close()


@pytest.fixture(scope="module")
def env() -> Env:
    return Env()


@pytest.fixture(autouse=True)
def in_a_slice() -> Any:
    wt.set_current_vm(object())  # as the scheduler does around every slice
    yield
    wt.set_current_vm(None)


def test_i32_arguments_and_results_keep_their_sign(env: Env) -> None:
    store, ex = env.instance()
    out = run(store, ex["call_i32"], [-5, 7])
    assert isinstance(out, wt.Returned) and out.results == [-12]
    assert env.seen[-1] == (-5, 7)
    out = run(store, ex["call_i32"], [0x7FFFFFFF, -1])
    assert out.results == [-0x80000000]  # wraps as i32 arithmetic would


def test_i64_arguments_and_results(env: Env) -> None:
    store, ex = env.instance()
    out = run(store, ex["call_i64"], [-(1 << 40), 3], kinds=[wt.I64, wt.I32])
    assert isinstance(out, wt.Returned) and out.results == [-(1 << 41)]
    assert env.seen[-1] == (-(1 << 40), 3)


def test_several_results_of_mixed_kinds(env: Env) -> None:
    store, ex = env.instance()
    out = run(store, ex["call_two"], [5])
    assert isinstance(out, wt.Returned) and out.results == [6]
    r64 = ex["r64"]
    assert r64.value(store) == -(5 << 40)


def test_no_arguments_no_results(env: Env) -> None:
    store, ex = env.instance()
    out = run(store, ex["call_none"], nresults=0)
    assert isinstance(out, wt.Returned) and out.results == [] and env.seen[-1] == ()


def test_host_trap_and_device_bug_stop_the_guest(env: Env) -> None:
    for code in (99, 98):  # HostTrap, and an unexpected exception in a device
        store, ex = env.instance()
        out = run(store, ex["call_i32"], [1, code])
        assert isinstance(out, (wt.Trapped, wt.Failed))
        assert env.seen[-1] == (1, code)
        # the store is still usable afterwards
        assert run(store, ex["call_i32"], [5, 2]).results == [3]


def test_memory_read_write_view_and_bounds(env: Env) -> None:
    store, ex = env.instance()
    got: dict[str, Any] = {}

    def op(mem: wt.GuestMemory, a: Sequence[int]) -> list[int]:
        ptr, n = a
        got["size"] = mem.size()
        got["ok"] = mem.check(ptr, n)
        got["neg"] = mem.check(-1, 1), mem.check(0, -1)
        if not got["ok"]:
            with pytest.raises(wt.MemoryFault):
                mem.read(ptr, n)
            with pytest.raises(wt.MemoryFault):
                mem.view(ptr, n)
            return [-21]
        mem.write(ptr, b"abcd")
        mem.write(ptr + 4, bytearray(b"ef"))
        mem.write(ptr + 6, memoryview(b"xxgh")[2:])
        v = mem.view(ptr, 8)
        v[0:1] = b"A"
        got["data"] = mem.read(ptr, 8)
        got["empty"] = mem.read(ptr, 0)
        return [len(got["data"])]

    env.mem_op = op
    out = run(store, ex["call_mem"], [100, 8])
    assert out.results == [8] and got["data"] == b"Abcdefgh" and got["empty"] == b""
    assert got["size"] == 65536 and got["neg"] == (False, False)
    assert ex["memory"].read(store, 100, 108) == b"Abcdefgh"
    out = run(store, ex["call_mem"], [65536 - 4, 8])  # crosses the end
    assert out.results == [-21] and got["ok"] is False

    def at_end(mem: wt.GuestMemory, a: Sequence[int]) -> list[int]:  # an empty range at the very end is fine
        assert mem.check(65536, 0) and mem.read(65536, 0) == b"" and len(mem.view(65536, 0)) == 0
        mem.write(65536, b"")
        return [1]

    env.mem_op = at_end
    assert run(store, ex["call_mem"], [65536, 0]).results == [1]


def test_memory_size_is_read_again_after_the_guest_grew_it(env: Env) -> None:
    store, ex = env.instance()
    sizes: list[int] = []

    def op(mem: wt.GuestMemory, a: Sequence[int]) -> list[int]:
        sizes.append(mem.size())
        mem.write(a[0], b"12345678")
        return [mem.size()]

    env.mem_op = op
    assert run(store, ex["call_mem"], [0, 8]).results == [65536]
    out = run(store, ex["grow_then_mem"], [65536 + 10])  # writes into the page grown just before
    assert isinstance(out, wt.Returned) and out.results == [131072], out
    assert ex["memory"].read(store, 65546, 65554) == b"12345678"


def test_two_stores_in_one_slice_each_see_their_own_memory(env: Env) -> None:
    a_store, a = env.instance()
    b_store, b = env.instance()

    def op(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
        mem.write(0, bytes([args[0]]))
        return [0]

    env.mem_op = op
    for i in range(4):
        run(a_store, a["call_mem"], [10 + i, 1])
        run(b_store, b["call_mem"], [20 + i, 1])
        assert a["memory"].read(a_store, 0, 1) == bytes([10 + i])
        assert b["memory"].read(b_store, 0, 1) == bytes([20 + i])


def test_a_store_freed_and_replaced_is_never_confused_with_the_old_one(env: Env) -> None:
    def op(mem: wt.GuestMemory, args: Sequence[int]) -> list[int]:
        mem.write(0, b"z")
        return [mem.size()]

    env.mem_op = op
    for _ in range(20):  # new stores may land at a freed store's address; the slice boundary forgets it
        wt.set_current_vm(object())
        store, ex = env.instance()
        assert run(store, ex["call_mem"], [0, 1]).results == [65536]
        assert ex["memory"].read(store, 0, 1) == b"z"
        del ex
        store.close()
        wt.set_current_vm(None)


def test_guest_without_memory_gets_faults_not_crashes(env: Env) -> None:
    store, ex = env.instance(NOMEM_WAT)
    seen: list[Any] = []

    def op(mem: wt.GuestMemory, a: Sequence[int]) -> list[int]:
        seen.append((mem.size(), mem.check(0, 0), mem.check(0, 1)))
        try:
            mem.read(0, 1)
        except wt.MemoryFault as exc:
            seen.append(str(exc))
        return [0]

    env.mem_op = op
    assert isinstance(run(store, ex["call_mem"], [0, 1]), wt.Returned)
    assert seen == [(0, True, False), "guest exports no memory"]


def test_pending_result_suspends_until_ready_then_completes(env: Env) -> None:
    store, ex = env.instance()
    env.pend_ready = False
    call = wt.GuestCall(store, ex["call_pend"], [21], nresults=1)
    try:
        assert not call.poll() and not call.poll()  # suspended: every poll asks the op again
        env.pend_ready = True
        assert call.poll()
        out = call.outcome()
    finally:
        call.close()
    assert out.results == [42] and ex["memory"].read(store, 0, 4) == b"done"
    assert not wt._suspended  # the continuation's finalizer cleaned up


def test_abandoned_suspended_call_is_cleaned_up(env: Env) -> None:
    store, ex = env.instance()
    env.pend_ready = False
    call = wt.GuestCall(store, ex["call_pend"], [1], nresults=1)
    assert not call.poll()
    assert len(wt._suspended) == 1
    call.close()  # the VM was killed while blocked
    assert not wt._suspended
    env.pend_ready = True


def test_a_host_call_costs_microseconds_not_milliseconds(env: Env) -> None:
    """A loose guard against regressions such as a GIL hand-over per call (a busy thread competes)."""
    store, ex = env.instance()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(100))
            time.sleep(0)

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    try:
        n = 2000
        t0 = time.perf_counter()
        assert isinstance(run(store, ex["loop_i32"], [n], nresults=0, max_polls=10**6), wt.Returned)
        per_call = (time.perf_counter() - t0) / n
    finally:
        stop.set()
        t.join()
    assert per_call < 1e-3, f"{per_call * 1e6:.0f} us per host call"


# ------------------------------------------------------------------ net receive buffer
def test_recv_buffer_takes_across_chunks_in_order() -> None:
    rb = RecvBuffer()
    assert not rb and len(rb) == 0
    rb.append(b"hello ")
    rb.append(bytearray(b"wor"))
    rb.append(memoryview(b"ld!"))
    rb.append(b"")
    assert rb and len(rb) == 12
    out = bytearray(4)
    assert rb.take_into(memoryview(out)) == 4 and out == b"hell"
    out = bytearray(5)
    assert rb.take_into(memoryview(out)) == 5 and out == b"o wor"
    out = bytearray(10)
    assert rb.take_into(memoryview(out)) == 3 and out[:3] == b"ld!"
    assert not rb and rb.take_into(memoryview(bytearray(3))) == 0


# ------------------------------------------------------------------ hostop hooks
def test_hostop_wait_returns_when_completed_from_another_thread() -> None:
    op = HostOp()
    assert not op.wait(0.01)
    threading.Timer(0.02, op.set_result, (7,)).start()
    t0 = time.monotonic()
    assert op.wait(5.0)
    assert time.monotonic() - t0 < 4.0 and op.result == 7
    assert op.wait(0)  # already ready


def test_hostop_wait_and_waker_both_fire() -> None:
    op = HostOp()
    woken: list[bool] = []
    assert not op.on_ready(lambda: woken.append(True))
    threading.Timer(0.01, op.set_result).start()
    assert op.wait(5.0)
    assert woken == [True]


def test_loop_waker_uses_call_soon_on_the_loop_and_threadsafe_elsewhere() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        wake = loop_waker(loop, calls.append, "x")
        wake()  # on the loop's thread
        assert calls == []  # scheduled, not run inline
        await asyncio.sleep(0)
        th = threading.Thread(target=wake)
        th.start()
        th.join()
        for _ in range(100):
            if len(calls) == 2:
                break
            await asyncio.sleep(0.01)
        return calls

    assert asyncio.run(main()) == ["x", "x"]


class _SliceVm:
    """What wait_in_call reads of a VM: the slice's spin window and end, control and snapshot requests."""

    def __init__(self, spin: float, slice_left: float = 5.0) -> None:
        self.spin, self.slice_end = spin, time.monotonic() + slice_left
        self.control: str | None = None
        self.snapshot_wanted = False


class _Answering(HostOp):
    def finish(self, mem: Any) -> Sequence[int]:
        return [int(self.result) + 1]


def test_wait_in_call_answers_from_the_call_when_the_op_completes_in_the_window() -> None:
    op = _Answering()
    threading.Timer(0.01, op.set_result, (41,)).start()
    assert wait_in_call(_SliceVm(spin=5.0), op, None) == [42]  # type: ignore[arg-type]
    assert op.consumed and op.spun


def test_wait_in_call_gives_up_at_the_window_or_the_slice_end_and_only_once() -> None:
    op = _Answering()
    t0 = time.monotonic()
    assert wait_in_call(_SliceVm(spin=0.02), op, None) is None  # type: ignore[arg-type]
    assert op.spun and not op.consumed and time.monotonic() - t0 < 4.0
    op2 = _Answering()
    assert wait_in_call(_SliceVm(spin=5.0, slice_left=0.01), op2, None) is None  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 4.0  # bounded by the slice, not the 5 s window
    op.set_result(1)  # already spun once: the scheduler's own wait takes over, not a second spin
    assert wait_in_call(_SliceVm(spin=5.0), op, None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("why", ["no_spin", "control", "snapshot"])
def test_wait_in_call_does_not_wait_when_the_worker_may_not(why: str) -> None:
    vm = _SliceVm(spin=0.0 if why == "no_spin" else 5.0)
    vm.control = "pause" if why == "control" else None
    vm.snapshot_wanted = why == "snapshot"
    op = _Answering()
    op.set_result(1)  # even a completed op is left to the normal path: the guest suspends on it
    assert wait_in_call(vm, op, None) is None  # type: ignore[arg-type]
    assert not op.spun and not op.consumed


def test_set_global_sets_numbers_and_wasmtime_still_checks_types() -> None:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, """(module
        (global (export "a") (mut i32) (i32.const 0)) (global (export "b") (mut i64) (i64.const 0))
        (global (export "c") (mut f32) (f32.const 0)) (global (export "d") (mut f64) (f64.const 0))
        (global (export "k") i32 (i32.const 7)))""")
    ex = wasmtime.Instance(store, module, []).exports(store)
    for name, ty, value in (("a", "i32", -5), ("b", "i64", 1 << 40), ("c", "f32", 1.5), ("d", "f64", 2.25)):
        wt.set_global(store, ex[name], ty, value)
        assert ex[name].value(store) == value
    with pytest.raises(wasmtime.WasmtimeError):
        wt.set_global(store, ex["a"], "i64", 1)  # the wrong type
    with pytest.raises(wasmtime.WasmtimeError):
        wt.set_global(store, ex["k"], "i32", 1)  # immutable
    assert ex["a"].value(store) == -5 and ex["k"].value(store) == 7
