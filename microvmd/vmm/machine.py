"""A VM's native side: its wasmtime Store, instance and the suspendable guest call.

A ``Machine`` is owned by one ``Vm`` and only ever touched from one thread at a time (a vCPU worker while
the VM is scheduled, an I/O worker while it is built or torn down). It knows nothing of HTTP or asyncio.
"""
from __future__ import annotations

import ctypes
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import wasmtime

from ..devices.wasip1 import wasi_helper
from ..engine import wt
from ..engine.hostop import HostOp
from ..images.asyncify import GROWN_BUFFER_PAGES, STATE_NORMAL, STATE_REWINDING, STATE_UNWINDING, AsyncifyCtl
from ..images.rewrite import HOST_MODULE, WASI
from .budget import MemoryBudget

log = logging.getLogger("microvmd.vmm")

FUEL_TANK = 1 << 62  # fuel given to every store; the budget is enforced by yields, not by trapping


class NotSnapshottable(Exception):
    """The guest's state holds something a snapshot cannot describe."""


class SliceEnd(Enum):
    DONE = "done"              # the guest's entry returned, exited or trapped
    YIELDED = "yielded"        # quantum used up; queue it again
    BLOCKED = "blocked"        # waiting in a device call; wake it when the call can complete
    OUT_OF_FUEL = "out_of_fuel"
    CONTROL = "control"        # a pause/stop/kill/timeout request was seen at a yield point
    UNWOUND = "unwound"        # the guest unwound at a suspension point: its whole state is in memory


@dataclass
class MachineSpec:
    args: list[str]
    env: dict[str, str]
    dirs: list[tuple[str, str, bool]]  # host, guest, readonly
    memory_limit: int
    table_elements: int
    instances: int
    tables: int
    memories: int
    stdout: Callable[[bytes], None]  # console writers (devices/console.py), unless log files are given:
    stderr: Callable[[bytes], None]
    entry: str = "_start"
    boot: list[str] = field(default_factory=list)  # exports to call before the entry (e.g. rewritten start)
    asyncify_globals: tuple[int, int] | None = None
    tables_fixed: bool = False  # the module has no instruction that changes a table (images/rewrite.py)
    stdout_file: str | None = None  # wasmtime writes the console to these files itself (truncating them)
    stderr_file: str | None = None
    budget: MemoryBudget | None = None  # the daemon's memory for all guests (limits.total_memory)
    # whether the module imports the daemon's fd_read (rewritten at import); None: read from the module. The
    # builder passes the image's recorded imports: Module.imports costs ~28 µs per instantiation (FFI)


_facts: weakref.WeakKeyDictionary[wasmtime.Module, tuple[int, list[str]]] = weakref.WeakKeyDictionary()


def _module_facts(module: wasmtime.Module) -> tuple[int, list[str]]:
    """(helper instances it needs, export names) of a compiled module, read once per module: listing a
    module's imports and exports through the C API costs ~0.5 ms for CPython, at every instantiation."""
    facts = _facts.get(module)
    if facts is None:
        helper = int(any((i.module == HOST_MODULE and i.name == "fd_read")
                         or (i.module == WASI and i.name == "path_open") for i in module.imports))
        facts = _facts[module] = (helper, [e.name for e in module.exports])
    return facts


class Machine:
    def __init__(self, engine: wasmtime.Engine, linker: wasmtime.Linker, module: wasmtime.Module,
                 spec: MachineSpec, pre: wasmtime.InstancePre | None = None) -> None:
        self.spec = spec
        self.store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = spec.args
        wasi.env = list(spec.env.items())
        if spec.stdout_file is not None and spec.stderr_file is not None:
            wasi.stdout_file = spec.stdout_file
            wasi.stderr_file = spec.stderr_file
        else:
            wasi.stdout_custom = spec.stdout
            wasi.stderr_custom = spec.stderr
        for host, guest, readonly in spec.dirs:
            wasi.preopen_dir(host, guest, not readonly)
        self.store.set_wasi(wasi)
        # a module rewritten at import reads through the daemon's fd_read, and the daemon counts the WASI
        # calls that open and close files (devices/files.py): both go on to wasmtime's own functions through
        # a helper instance in the same store (devices/wasip1.py); only a module that imports path_open is
        # linked with the counting calls (store.OPENS_FILES)
        self._helper_instances, self.export_names = _module_facts(module)
        self._memory_cap = -1
        self.memory_bytes = 0
        self._cap_memory()  # (instantiation may not take more than the budget has left either)
        self.store.set_fuel(FUEL_TANK)
        wt.yield_on_every_epoch(self.store)
        self._fuel_interval: int | None = None
        self.instance = wt.instantiate(self.store, linker, module, pre)
        self.exports = wt.Exports(self.store, self.instance)  # (by name: instance.exports() is quadratic)
        mem = self.exports.get("memory")
        self.memory: wasmtime.Memory | None = mem if isinstance(mem, wasmtime.Memory) else None
        self._engine = engine
        self._wasi_calls: dict[str, wasmtime.Func] | None = None  # made by the first wasi_call
        self._queue = [*spec.boot, spec.entry]
        self._current = spec.entry
        self.call: wt.GuestCall | None = None
        # the guest's side of a slice, written only by the thread running it: the device call it was last
        # suspended in (Vm.block_on; the loop copies it into the VM's runtime at the slice end, and may
        # interrupt it meanwhile through the op's own lock), and this slice's spin window and end
        self.blocked_on: HostOp | None = None
        self.spin = 0.0
        self.slice_end = 0.0
        self.outcome: wt.Outcome | None = None
        self.fuel_consumed = 0
        self.fuel_base = 0  # fuel consumed before this store existed (restored VMs)
        self.peak_memory = 0
        self._sample_memory()
        self._initial_memory = self.memory_bytes
        self._grown_by_host = 0  # unwind buffers (ensure_unwind_buffer)
        # the tables as instantiated, by raw function pointer: the names a snapshot gives the functions in a
        # table the guest changed (only guests that can be snapshotted after they ran need them). Reading
        # them is two FFI calls per slot (15 ms for CPython's 5,902): skipped when the module cannot change
        # its tables, whose snapshots then hold none.
        self.tables_at_start: dict[str, list[int]] | None = None
        self._tables_fixed = spec.tables_fixed
        if spec.asyncify_globals is not None and not self._tables_fixed:
            self._record_tables_at_start()
        self.asyncify: AsyncifyCtl | None = None
        if spec.asyncify_globals is not None and self.memory is not None:
            if "microvm_asyncify_data" in self.export_names:  # an SDK guest: its own buffer
                data_ptr = self.call_sync("microvm_asyncify_data")[0]
                self.asyncify = AsyncifyCtl.setup(self.exports, self.store, spec.asyncify_globals, data_ptr,
                                                  self.memory)
            else:  # rewritten at import: the daemon grows the buffer (ensure_unwind_buffer)
                self.asyncify = AsyncifyCtl.lazy(self.exports, self.store, spec.asyncify_globals)

    # ---- helpers the VM's devices and snapshots use (on the owning thread) ----
    def wasi_call(self, name: str, mem: wt.GuestMemory) -> wasmtime.Func | None:
        """wasmtime's own WASI call ``name`` (one of wasip1.HELPER_CALLS) for this store, from inside the device
        call ``mem`` is for; None when the module needs none. The helper instance behind it is made by the first
        call that needs it (~0.3 ms, a linker and an instantiation): most guests never open a file or read
        anything but stdin after a restore, and a VM made for one request or one line should not pay for it."""
        calls = self._wasi_calls
        if calls is None:
            calls = self._wasi_calls = {}  # (made once: a helper that cannot be made is not tried at every call)
            if self.memory is None or not self._helper_instances:
                return None
            try:
                calls.update(wasi_helper(self._engine, mem.store_context(), self.memory))
            except (wasmtime.WasmtimeError, wt.InstantiationError) as exc:  # the guest's calls answer ENOSYS/EBADF
                log.error("cannot make the WASI helper instance of this VM (its file calls fail from now): %s",
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return calls.get(name)

    def export(self, name: str) -> Any:
        return self.exports.get(name)

    def call_sync(self, name: str, *args: int) -> list[int]:
        """Run a short export to completion (e.g. the ABI version probe)."""
        func = self.exports.get(name)
        if not isinstance(func, wasmtime.Func):
            raise KeyError(name)
        nres = len(func.type(self.store).results)
        call = wt.GuestCall(self.store, func, list(args), nresults=nres)
        try:
            deadline = time.monotonic() + 1.0
            while not call.poll():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} did not return within 1 s")
            out = call.outcome()
        finally:
            call.close()
        if not isinstance(out, wt.Returned):
            raise RuntimeError(out.message if isinstance(out, (wt.Trapped, wt.Failed)) else f"exit {out.code}")
        return out.results

    # ---- running ----
    def run_slice(self, quantum: float, budget: int | None, fuel_slice: int, vm: Any, spin: float = 0.0) -> SliceEnd:
        """Poll the guest until it finishes, blocks, runs out of budget, or the quantum is used up.

        ``spin``: when the guest blocks in a device call, wait up to that long for the answer before giving
        the thread back (ping-pong traffic then stays on this worker: no hand-off through the event loop).
        """
        end = time.monotonic() + quantum
        self.spin, self.slice_end = spin, end  # for device calls that wait in the call (hostop.wait_in_call)
        rt = vm.rt  # (read only: the loop decides what follows from the SliceEnd)
        while True:
            if rt.control is not None:
                return SliceEnd.CONTROL
            if self.call is None:
                if not self._queue:
                    return SliceEnd.DONE
                if not self._begin(self._queue.pop(0)):
                    return SliceEnd.DONE
            if budget is not None:
                left = budget - self.fuel_consumed
                if left <= 0:
                    return SliceEnd.OUT_OF_FUEL
                self._set_fuel_interval(min(left, fuel_slice))
            else:  # wasmtime writes the fuel counter back only at fuel yields: keep them, so it reads live
                self._set_fuel_interval(fuel_slice)
            if self.spec.budget is not None:
                self._cap_memory()
            assert self.call is not None
            done = self.call.poll()
            self.fuel_consumed = self.fuel_base + FUEL_TANK - self.store.get_fuel()
            if done:
                out = self.call.outcome()
                self.call.close()
                self.call = None
                self._sample_memory()
                a = self.asyncify
                if a is not None and a.unwinding and isinstance(out, wt.Returned):
                    a.unwinding = False
                    a.unwound = True
                    wt.set_global(self.store, a.state, "i32", STATE_NORMAL)  # asyncify_stop_unwind
                    self._queue.insert(0, self._current)
                    return SliceEnd.UNWOUND
                if isinstance(out, wt.Returned) and self._queue:
                    continue  # a boot step finished; go on to the entry
                self.outcome = out
                self._queue.clear()
                return SliceEnd.DONE
            op = self.blocked_on
            if op is not None and not op.ready():
                # (not again if the device already waited inside the call: hostop.wait_in_call)
                if spin > 0 and not op.spun and rt.control is None \
                        and op.wait(min(spin, max(0.0, end - time.monotonic()))):
                    continue  # answered while we waited: same slice
                self._sample_memory()
                return SliceEnd.BLOCKED
            if time.monotonic() >= end:
                self._sample_memory()
                return SliceEnd.YIELDED

    def _begin(self, name: str) -> bool:
        self._current = name
        a = self.asyncify
        if a is not None and a.unwound:  # asyncify_start_rewind, then re-enter the same export
            if a.grown and self.memory is not None:  # (how much of the buffer the saved stack fills)
                cur = int.from_bytes(self.memory.read(self.store, a.data_ptr, a.data_ptr + 4), "little")
                a.saved_end = min(max(cur, a.data_ptr + 8), a.data_end)
            wt.set_global(self.store, a.state, "i32", STATE_REWINDING)
            wt.set_global(self.store, a.data, "i32", a.data_ptr)
            a.unwound = False
            a.rewinding = True
        func = self.exports.get(name)
        if not isinstance(func, wasmtime.Func):
            self.outcome = wt.Failed(f"entry {name!r} is not an exported function")
            self._queue.clear()
            return False
        self.call = wt.GuestCall(self.store, func, nresults=len(func.type(self.store).results))
        return True

    # ---- snapshots (Asyncify guests) ----
    def at_suspension_point(self, mem: wt.GuestMemory, snapshot_wanted: bool) -> list[int] | None:
        """Runs first in every suspending import: finish a rewind, or start an unwind."""
        a = self.asyncify
        if a is None:
            return None
        if a.rewinding:  # asyncify_stop_rewind: the guest is back inside the call it was suspended in
            mem.set_global_i32(a.state, STATE_NORMAL)
            a.rewinding = False
            if a.grown:  # the saved stack is dead now: clear it, so the next unwind can tell nobody wrote there.
                # Only what it filled: the rest of the buffer is zero already (grown, then cleared like this
                # after every rewind; an unsettled one is checked before each unwind), and writing all of it
                # cost a restored guest 256 copy-on-write faults (~1 ms) for a saved stack of a few pages.
                end, a.saved_end = a.saved_end or a.data_end, 0
                mem.write(a.data_ptr, bytes(end - a.data_ptr))
        if snapshot_wanted:
            return self.start_unwind(mem)
        return None

    def ensure_unwind_buffer(self, mem: wt.GuestMemory) -> bool:
        """Where a guest rewritten at import unwinds: memory the daemon grows at its first snapshot (from
        inside the suspended call, so no Wasm runs), past everything the guest has. A guest's allocator
        hands out only memory it got from memory.grow or claimed at its first malloc; wasi-libc before 2023
        claims everything up to memory.size there, so a buffer placed before the guest's first malloc could
        be taken. The buffer is therefore *settled* (kept for good) when the guest had grown memory itself
        before it was placed (its allocator was running); an unsettled one is kept only while it is still
        as the last rewind left it (all zeros), else a new one is grown. False when the memory limit
        refuses the growth (the VM is then no longer snapshottable while it runs)."""
        a = self.asyncify
        if a is None:
            return False
        if a.has_buffer and (a.settled or not any(mem.view(a.data_ptr, a.data_end - a.data_ptr))):
            return True
        size = mem.size()
        initial = self._initial_memory + self._grown_by_host
        old = mem.grow(GROWN_BUFFER_PAGES)
        if old < 0:
            log.warning("cannot grow memory by %d KiB for the Asyncify unwind buffer (memory limit): this VM "
                        "cannot be snapshotted while it runs", GROWN_BUFFER_PAGES * 64)
            self.asyncify = None
            return False
        self._grown_by_host += GROWN_BUFFER_PAGES * 65536
        a.place_buffer(old * 65536, GROWN_BUFFER_PAGES * 65536, settled=size > initial)
        self.memory_bytes = mem.size()
        self.peak_memory = max(self.peak_memory, self.memory_bytes)
        return True

    def start_unwind(self, mem: wt.GuestMemory) -> list[int] | None:
        """asyncify_start_unwind from inside the suspended import; the import's answer is ignored. None when
        there is no buffer to unwind into (the call then runs as usual)."""
        a = self.asyncify
        if a is None or (a.grown or not a.has_buffer) and not self.ensure_unwind_buffer(mem):
            return None
        assert a is not None
        mem.write(a.data_ptr, a.header())
        mem.set_global_i32(a.data, a.data_ptr)
        mem.set_global_i32(a.state, STATE_UNWINDING)
        a.unwinding = True
        return [0]

    def memory_region(self) -> tuple[int, int]:
        """(address, size) of linear memory; valid while the guest is not running and does not grow."""
        if self.memory is None:
            return 0, 0
        size = self.memory.data_len(self.store)
        ptr = self.memory.data_ptr(self.store)
        return ctypes.cast(ptr, ctypes.c_void_p).value or 0, size

    def capture_globals(self) -> dict[str, tuple[str, int | float]]:
        """Every mutable exported global (the normaliser exported them all); only while not running."""
        assert self.call is None or (self.asyncify is not None and self.asyncify.unwound)
        out: dict[str, tuple[str, int | float]] = {}
        for name in self.export_names:
            item = self.exports.get(name)
            if isinstance(item, wasmtime.Global):
                ty = item.type(self.store)
                if ty.mutable:
                    out[name] = (str(ty.content), item.value(self.store))
        return out

    def _tables(self) -> dict[str, wasmtime.Table]:
        return {n: t for n in self.export_names if isinstance(t := self.exports.get(n), wasmtime.Table)}

    def _table_refs(self) -> dict[str, list[int]]:
        return {n: wt.table_refs(self.store, t) for n, t in self._tables().items()}

    def _record_tables_at_start(self) -> None:
        try:
            self.tables_at_start = self._table_refs()
        except ValueError:
            self.tables_at_start = None  # a non-function reference at start: snapshots will say so

    def capture_tables(self) -> dict[str, dict[str, Any]]:
        """The tables the guest changed since instantiation, each slot named as the (table, slot) that held
        its function at instantiation (None for null); only while not running. Raises NotSnapshottable for
        a function that was in no table at instantiation (``ref.func`` of a declared function), or a
        non-function reference: a snapshot could not name it."""
        if self.tables_at_start is None:
            if self._tables_fixed:
                return {}  # no instruction of the module changes a table: they are as instantiated
            if self.spec.asyncify_globals is not None and self._tables():
                raise NotSnapshottable("a table held a non-function reference at instantiation")
            return {}  # this guest is snapshotted only before it runs: its tables are as instantiated
        try:
            now = self._table_refs()
        except ValueError as exc:
            raise NotSnapshottable(f"a table holds something a snapshot cannot name ({exc})") from None
        changed = {n: refs for n, refs in now.items() if refs != self.tables_at_start.get(n)}
        if not changed:
            return {}
        where: dict[int, tuple[str, int]] = {}
        for n, refs in self.tables_at_start.items():
            for slot, r in enumerate(refs):
                if r:
                    where.setdefault(r, (n, slot))
        out: dict[str, dict[str, Any]] = {}
        for n, refs in changed.items():
            elems: list[list[Any] | None] = []
            for i, r in enumerate(refs):
                if not r:
                    elems.append(None)
                elif r in where:
                    elems.append(list(where[r]))
                else:
                    raise NotSnapshottable(f"table {n!r} slot {i} holds a function that was in no table when the "
                                           f"module was instantiated (set with ref.func at run time)")
            out[n] = {"size": len(refs), "elems": elems}
        return out

    def _restore_tables(self, tables: dict[str, dict[str, Any]]) -> None:
        """Rebuild changed tables from the functions the fresh instance's tables hold (read all first)."""
        have = self._tables()
        funcs: dict[tuple[str, int], Any] = {}
        for n, t in tables.items():
            if n not in have:
                raise ValueError(f"snapshot table {n!r} is not exported by the module")
            for e in t["elems"]:
                if e is not None and (e[0], e[1]) not in funcs:
                    src = have.get(e[0])
                    if src is None or not 0 <= e[1] < src.size(self.store):
                        raise ValueError(f"snapshot table {n!r} names slot {e[1]} of table {e[0]!r}, which the "
                                         f"module does not have")
                    f = src.get(self.store, e[1])
                    if not isinstance(f, wasmtime.Func):
                        raise ValueError(f"slot {e[1]} of table {e[0]!r} holds no function at instantiation")
                    funcs[(e[0], e[1])] = f
        for n, t in tables.items():
            tab = have[n]
            cur = tab.size(self.store)
            if t["size"] < cur:
                raise ValueError(f"snapshot table {n!r} is smaller than the module's ({t['size']} < {cur})")
            if t["size"] > cur:
                tab.grow(self.store, t["size"] - cur, None)
            for i, e in enumerate(t["elems"]):
                tab.set(self.store, i, None if e is None else funcs[(e[0], e[1])])

    def restore(self, size: int, load: Callable[[int, int], None], globals_: dict[str, tuple[str, int | float]],
                unwound: bool, fuel_consumed: int, clear: Callable[[int, int], None],
                tables: dict[str, dict[str, Any]] | None = None) -> None:
        """Load a captured state into this freshly instantiated machine (before it first runs).

        ``clear(address, initial_size)`` first zeroes what the snapshot has as zeros within the instance's
        initial memory (instantiation may have filled it with data segments); ``load(address, size)`` then
        fills linear memory in place.
        """
        if self.memory is None:
            if size:
                raise ValueError("snapshot has memory but the module exports none")
        else:
            have = self.memory.data_len(self.store)
            if size < have:
                raise ValueError(f"snapshot memory ({size} bytes) is smaller than the module's initial memory")
            if size > have:
                self.memory.grow(self.store, (size - have) // 65536)
            address, _ = self.memory_region()
            clear(address, have)
            load(address, size)
        for name, (ty, value) in globals_.items():
            item = self.exports.get(name)
            if not isinstance(item, wasmtime.Global):
                raise ValueError(f"snapshot global {name!r} is not exported by the module")
            wt.set_global(self.store, item, ty, value)
        if tables:  # (from a module that can change its tables: record them before they change here)
            if self._tables_fixed:
                self._tables_fixed = False
                self._record_tables_at_start()
            self._restore_tables(tables)
        self.fuel_base = fuel_consumed
        self.fuel_consumed = fuel_consumed
        if unwound:
            self._queue = [self.spec.entry]
            if self.asyncify is None:
                raise ValueError("snapshot was taken inside a call but the guest has no Asyncify support")
            if not self.asyncify.has_buffer and self.memory is not None:
                self.asyncify.adopt_buffer(self.store, self.memory)
            self.asyncify.unwound = True
        self._sample_memory()

    def _set_fuel_interval(self, interval: int | None) -> None:
        if interval != self._fuel_interval:
            wt.set_fuel_yield_interval(self.store, interval)
            self._fuel_interval = interval

    def _sample_memory(self) -> None:
        if self.memory is not None:
            now = self.memory.data_len(self.store)
            if self.spec.budget is not None:
                self.spec.budget.change(now - self.memory_bytes)
            self.memory_bytes = now
            self.peak_memory = max(self.peak_memory, self.memory_bytes)

    def _cap_memory(self) -> None:
        """The store's memory limit: the VM's own, or less when the daemon's budget has less left."""
        spec = self.spec
        cap = spec.memory_limit
        if spec.budget is not None:
            cap = min(cap, self.memory_bytes + spec.budget.headroom())
        if cap != self._memory_cap:
            self._memory_cap = cap
            self.store.set_limits(memory_size=cap, table_elements=spec.table_elements,
                                  instances=spec.instances + self._helper_instances, tables=spec.tables,
                                  memories=spec.memories)

    def close(self) -> None:
        """Drop the suspended call and the store (frees linear memory)."""
        if self.call is not None:
            self.call.close()
            self.call = None
        self.exports = None  # type: ignore[assignment]
        self.memory = None
        self.instance = None  # type: ignore[assignment]
        store, self.store = self.store, None  # type: ignore[assignment]
        if store is not None:
            store.close()
            if self.spec.budget is not None:
                self.spec.budget.change(-self.memory_bytes)
