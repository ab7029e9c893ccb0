"""The device model every device shares (devices/wasi.py, devices/base.py): how a failed call answers the guest."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest
import wasmtime

from microvmd.devices import wasi
from microvmd.devices.base import DeviceSet, DeviceStateError, DeviceTable
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
    assert isinstance(out, wt.Returned) and out.results == [-wasi.EIO]
    (rec,) = caplog.records
    assert rec.getMessage() == "t.call failed" and rec.exc_info is not None and rec.exc_info[0] is KeyError
    out = guest(3)
    assert isinstance(out, (wt.Trapped, wt.Failed)) and "asked to trap" in out.message


def _net_vm(dev: Any, loop: asyncio.AbstractEventLoop, vm_id: str) -> tuple[Any, Any]:
    from microvmd.devices.net import NetState

    vm = SimpleNamespace(id=vm_id, spec=SimpleNamespace(net_rate_limiter=None), devices=DeviceSet())
    st = NetState(vm, dev, loop, dev.limits, [])
    vm.devices.add(st)
    return vm, st


def test_a_part_saves_its_typed_state_in_the_manifest_format_and_restores_it() -> None:
    """Net's save/restore pair through DeviceSet, as the snapshot controller and the manager use it: the
    encoded state is what manifests have always held, so old snapshots restore."""
    from microvmd.devices.blk import BlkState
    from microvmd.devices.net import GSock, NetDevice, NetSaved, NetState

    loop = asyncio.new_event_loop()
    dev = NetDevice(SimpleNamespace(cfg=SimpleNamespace(listen=None, gateway=None), vms={}))
    vm, st = _net_vm(dev, loop, "vm-a")
    lst, conn = GSock(3, "listener"), GSock(4, "conn")
    lst.port = 8080
    st.socks.update({3: lst, 4: conn})
    st.listeners[8080] = lst
    st.next_sd = 5
    assert isinstance(st.save(), NetSaved)
    saved = vm.devices.save()
    assert saved == {"net": {"next_sd": 5, "sockets": [{"sd": 3, "kind": "listener", "port": 8080},
                                                       {"sd": 4, "kind": "conn", "port": 0}]}}
    assert vm.devices.get(NetState) is st and vm.devices.get(BlkState) is None

    vm2, st2 = _net_vm(dev, loop, "vm-b")
    # a state for a device this daemon lacks is left alone
    vm2.devices.restore({**json.loads(json.dumps(saved)), "gpu": {"x": 1}})
    assert st2.next_sd == 5 and st2.listeners[8080].sd == 3 and st2.socks[3].kind == "listener"
    assert st2.socks[4].error == wasi.ECONNRESET and st2.socks[4].eof  # a connection comes back reset
    for bad in ({"sockets": [{"sd": "3", "kind": "listener"}]}, {"next_sd": "x"}, ["not", "a", "map"],
                {"sockets": [{"sd": 9, "kind": "pipe"}]}):
        with pytest.raises(DeviceStateError) as exc:
            vm2.devices.restore({"net": bad})
        assert exc.value.part == "net"
    st.close()
    st2.close()
    loop.close()


def test_devices_are_found_by_type() -> None:
    from microvmd.devices.clock import ClockDevice

    table = DeviceTable()
    clock = ClockDevice()
    table.add(clock)
    assert table.get(ClockDevice) is clock and list(table) == [clock]
    with pytest.raises(ValueError):
        table.add(ClockDevice())  # one device per name


def test_a_poll_completed_before_the_guest_parks_leaves_its_sockets_to_the_vcpu() -> None:
    """The race behind a 50-client echo failure under load: a socket woke the op on the loop before the
    scheduler parked the guest on it, on data still in the kernel. Parking then must not hand the socket to
    the loop's reader, and a receive from a socket the loop reads that has delivered nothing yet is not the
    end of the stream (it was answered 0, and the echo guest closed a live client)."""
    import socket

    from microvmd.devices.net import GSock, NetDevice, NetOp

    loop = asyncio.new_event_loop()
    dev = NetDevice(SimpleNamespace(cfg=SimpleNamespace(listen=None, gateway=None), vms={}))
    _vm, st = _net_vm(dev, loop, "vm-race")
    a, b = socket.socketpair()
    resumed: list[int] = []
    try:
        conn = GSock(4, "conn")
        conn.fd = a.fileno()
        conn.transport = SimpleNamespace(  # type: ignore[assignment]
            resume_reading=lambda: resumed.append(1), close=lambda: None)
        st.socks[4] = conn
        b.sendall(b"hello")
        op = NetOp("net_recv", st, [conn], lambda: True, lambda m: [0])
        op.set_result(None)  # the wake-up came first
        assert op.on_ready(lambda: None) is True
        assert not conn.armed and not resumed
        # the other order: parked first, so the loop reads it; nothing delivered yet
        op2 = NetOp("net_recv", st, [conn], lambda: False, lambda m: [0])
        assert op2.on_ready(lambda: None) is False
        assert conn.armed and resumed == [1]
        assert dev._recv_now(st, conn, None, 0, 16) == [-wasi.EAGAIN]  # type: ignore[arg-type]
        conn.eof = True
        assert dev._recv_now(st, conn, None, 0, 16) == [0]  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
        st.close()
        loop.close()
