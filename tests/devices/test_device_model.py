"""The device model every device shares (devices/wasi.py, devices/base.py): how a failed call answers the guest."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import wasmtime

from microvmd.devices import wasi
from microvmd.engine import wt

GUARD_WAT = """(module
  (import "t" "call" (func $call (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "go") (param i32) (result i32) (call $call (local.get 0))))"""


def _device_call(mem: wt.GuestMemory, args: Sequence[int]) -> wt.HostResult:
    what = args[0]
    if what == 0:
        raise wasi.GuestError(wasi.EBADF)  # the guest's mistake: its own errno
    if what == 1:
        mem.view(1 << 30, 8)  # a pointer outside guest memory: -EFAULT
    if what == 2:
        raise KeyError("a device bug")  # -EIO, logged
    if what == 3:
        raise wt.HostTrap("asked to trap")  # the one deliberate way to trap the guest
    return [7]


@pytest.fixture
def guest() -> Iterator[Any]:
    engine = wt.make_engine(wt.EngineOptions())
    linker = wasmtime.Linker(engine)
    wt.define_host_func(linker, "t", "call", ["i32"], ["i32"],
                        wasi.guarded(_device_call, logging.getLogger("microvmd.test"), "t.call"))
    store = wasmtime.Store(engine)
    store.set_fuel(1 << 62)
    wt.yield_on_every_epoch(store)
    ex = wt.instantiate(store, linker, wasmtime.Module(engine, GUARD_WAT)).exports(store)
    wt.set_current_vm(object())

    def go(arg: int) -> wt.Outcome:
        call = wt.GuestCall(store, ex["go"], [arg], nresults=1)
        try:
            while not call.poll():
                pass
            return call.outcome()
        finally:
            call.close()
    yield go
    wt.set_current_vm(None)


def test_a_failed_call_answers_with_an_errno_and_a_bug_is_logged(guest: Any, caplog: Any) -> None:
    with caplog.at_level(logging.ERROR, "microvmd.test"):
        assert guest(4).results == [7]
        assert guest(0).results == [-wasi.EBADF]
        assert guest(1).results == [-wasi.EFAULT]
        assert not caplog.records  # the guest's mistakes are not the daemon's errors
        out = guest(2)
    assert out.trap is None and out.results == [-wasi.EIO]
    (rec,) = caplog.records
    assert rec.getMessage() == "t.call failed" and rec.exc_info is not None and rec.exc_info[0] is KeyError
    out = guest(3)
    assert out.results == [] and "asked to trap" in (out.trap or out.error or "")
