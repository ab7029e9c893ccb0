"""A VM's runtime state changes only through ``VmRuntime.apply``, on the event loop (issue 10, item 3).

The guard is on for the whole suite (tests/conftest.py); these tests show that it bites, and run real
guests through the real hypervisor under it: a slice that blocks in a device call reports it through the
machine's mailbox, never by writing the runtime from the vCPU thread."""
from __future__ import annotations

import ast
import asyncio
import logging
import threading
from pathlib import Path

import pytest

from microvmd.errors import InvalidState
from microvmd.vmm import runtime
from microvmd.vmm.runtime import Changes, RuntimeRuleBroken, VmRuntime
from microvmd.vmm.state import VmState

REPO = Path(__file__).resolve().parents[2]


def _rt() -> VmRuntime:
    return VmRuntime("f" * 32, logging.LoggerAdapter(logging.getLogger("test"), {}))


def test_the_guard_is_on_for_the_suite() -> None:
    assert runtime.enforced()


def test_a_field_set_directly_raises() -> None:
    rt = _rt()
    with pytest.raises(RuntimeRuleBroken, match="state set directly"):
        rt.state = VmState.RUNNING
    assert rt.state == VmState.CREATED


def test_apply_off_the_event_loop_raises() -> None:
    rt = _rt()
    caught: list[BaseException] = []

    def worker() -> None:  # as a vCPU thread would
        try:
            rt.apply("slice", on_cpu=True)
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], RuntimeRuleBroken)
    assert rt.on_cpu is False


async def test_apply_checks_the_transition_table_and_wakes_waiters() -> None:
    rt = _rt()
    ev = rt.changed
    with pytest.raises(InvalidState, match="it is created"):
        rt.apply("pause", state=VmState.PAUSED)
    assert rt.state == VmState.CREATED and not ev.is_set()
    rt.apply("start", state=VmState.RUNNING, started=1.0)
    assert rt.state == VmState.RUNNING and rt.started == 1.0
    assert ev.is_set() and rt.changed is not ev  # waiters woke; later ones wait for the next change
    ev = rt.changed
    rt.apply("slice", on_cpu=True)
    assert not ev.is_set()  # (bookkeeping that is no change of state wakes nobody)


async def test_off_cpu_waits_for_the_slice_to_come_back() -> None:
    rt = _rt()
    rt.enter_cpu()
    waiter = asyncio.ensure_future(rt.off_cpu())
    await asyncio.sleep(0)
    assert not waiter.done()
    rt.leave_cpu()
    await waiter
    assert not rt.on_cpu and rt.off_cpu_waiters == ()


def test_no_code_assigns_a_runtime_field_or_a_read_only_vm_field() -> None:
    """A static look at microvmd/: no assignment to ``<x>.rt.<field>``, to ``rt.<field>``, or to the Vm's
    read-only lifecycle properties (which would raise at run time anyway)."""
    fields = set(Changes.__annotations__) | {"changed"}
    bad = []
    for path in (REPO / "microvmd").rglob("*.py"):
        if path.name == "runtime.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in t.elts if isinstance(t, ast.Tuple) else [t]:  # (not attributes read in a subscript)
                    if not isinstance(sub, ast.Attribute) or sub.attr not in fields:
                        continue
                    owner = sub.value
                    if (isinstance(owner, ast.Attribute) and owner.attr == "rt") or \
                            (isinstance(owner, ast.Name) and owner.id in ("rt", "vm")):
                        bad.append(f"{path.relative_to(REPO)}:{sub.lineno}: {ast.unparse(sub)}")
    assert bad == []


async def test_real_guests_run_block_pause_and_stop_under_the_guard(tmp_path: Path) -> None:
    from microvmd.config import load
    from microvmd.daemon import parse_args
    from microvmd.devices import install_devices
    from microvmd.vmm.manager import Hypervisor
    from microvmd.vmm.vm import VmSpec

    cfg = load(parse_args(["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state")]))
    hv = Hypervisor(cfg)
    try:
        install_devices(hv)
        await hv.load()
        images = REPO / "images"
        await hv.import_image((images / "hello/hello.wasm").read_bytes(), "hello", asyncify=False)
        await hv.import_image((images / "counter/counter.wasm").read_bytes(), "counter")
        vm = await hv.create(VmSpec(image="hello", args=["3"]), start=True)
        assert (await hv.wait(vm))["code"] == 3
        # counter sleeps between lines: each sleep is a device call the slice ends blocked in
        vm = await hv.create(VmSpec(image="counter", env={"COUNT": "3", "INTERVAL_MS": "1"}), start=True)
        done = await hv.wait(vm)
        assert done["code"] == 0 and done["state"] == "exited"
        vm = await hv.create(VmSpec(image="counter", env={"INTERVAL_MS": "5"}), start=True)
        await hv.pause(vm)
        assert vm.state == VmState.PAUSED
        await hv.resume(vm)
        await hv.stop(vm)
        assert vm.state == VmState.STOPPED and vm.exit is not None and vm.exit.reason == "stopped"
        await hv.remove(vm, force=True)
    finally:
        await hv.shutdown()


async def test_a_guest_that_blocks_pokes_its_log_followers(tmp_path: Path) -> None:
    """A device call that suspends the guest wakes the VM's log followers (on the loop, from the vCPU thread)
    at once: what the guest wrote before it waits is there, and they need not wait for the slice to end."""
    from microvmd.engine.hostop import HostOp
    from microvmd.vmm.vm import Vm, VmSpec

    vm = Vm("e" * 32, VmSpec(image="hello"), "sha256:" + "0" * 64, "hello", tmp_path, 1 << 20, 1 << 24)

    async def block_on_a_worker() -> asyncio.Event:
        ev = vm.changed
        t = threading.Thread(target=vm.block_on, args=(HostOp(),))
        t.start()
        t.join()
        await asyncio.sleep(0)  # the callbacks the worker scheduled run
        await asyncio.sleep(0)
        return ev

    assert not (await block_on_a_worker()).is_set()  # nobody follows: no wake-up
    vm.followers, vm.follow_loop = 1, asyncio.get_running_loop()
    assert (await block_on_a_worker()).is_set()
    assert vm.state == VmState.CREATED  # a poke changes nothing
    done = HostOp()
    done.set_result(0)
    ev = vm.changed
    threading.Thread(target=vm.block_on, args=(done,)).start()
    await asyncio.sleep(0.05)
    assert not ev.is_set()  # an op that is already answered does not suspend the guest
