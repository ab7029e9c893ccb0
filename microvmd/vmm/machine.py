"""A VM's native side: its wasmtime Store, instance and the suspendable guest call.

A ``Machine`` is owned by one ``Vm`` and only ever touched from one thread at a time (a vCPU worker while
the VM is scheduled, an I/O worker while it is built or torn down). It knows nothing of HTTP or asyncio.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import wasmtime

from . import wt

log = logging.getLogger("microvmd.vmm")

FUEL_TANK = 1 << 62  # fuel given to every store; the budget is enforced by yields, not by trapping


class SliceEnd(Enum):
    DONE = "done"              # the guest's entry returned, exited or trapped
    YIELDED = "yielded"        # quantum used up; queue it again
    BLOCKED = "blocked"        # waiting in a device call; wake it when the call can complete
    OUT_OF_FUEL = "out_of_fuel"
    CONTROL = "control"        # a pause/stop/kill/timeout request was seen at a yield point


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
    stdout: Path
    stderr: Path
    entry: str = "_start"
    boot: list[str] = field(default_factory=list)  # exports to call before the entry (e.g. rewritten start)


class Machine:
    def __init__(self, engine: wasmtime.Engine, linker: wasmtime.Linker, module: wasmtime.Module,
                 spec: MachineSpec) -> None:
        self.spec = spec
        self.store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = spec.args
        wasi.env = list(spec.env.items())
        wasi.stdout_file = str(spec.stdout)
        wasi.stderr_file = str(spec.stderr)
        for host, guest, readonly in spec.dirs:
            wasi.preopen_dir(host, guest, not readonly)
        self.store.set_wasi(wasi)
        self.store.set_limits(memory_size=spec.memory_limit, table_elements=spec.table_elements,
                              instances=spec.instances, tables=spec.tables, memories=spec.memories)
        self.store.set_fuel(FUEL_TANK)
        wt.yield_on_every_epoch(self.store)
        self._fuel_interval: int | None = None
        self.instance = wt.instantiate(self.store, linker, module)
        self.exports = self.instance.exports(self.store)
        mem = self.exports.get("memory")
        self.memory: wasmtime.Memory | None = mem if isinstance(mem, wasmtime.Memory) else None
        self._queue = [*spec.boot, spec.entry]
        self.call: wt.GuestCall | None = None
        self.outcome: wt.Outcome | None = None
        self.fuel_consumed = 0
        self.memory_bytes = self.memory.data_len(self.store) if self.memory else 0
        self.peak_memory = self.memory_bytes

    # ---- helpers the VM's devices and snapshots use (on the owning thread) ----
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
        if out.trap or out.error:
            raise RuntimeError(out.trap or out.error)
        return out.results

    # ---- running ----
    def run_slice(self, quantum: float, budget: int | None, fuel_slice: int, vm: Any) -> SliceEnd:
        """Poll the guest until it finishes, blocks, runs out of budget, or the quantum is used up."""
        end = time.monotonic() + quantum
        while True:
            if vm.control is not None:
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
            elif self._fuel_interval is not None:
                self._set_fuel_interval(None)
            assert self.call is not None
            done = self.call.poll()
            self.fuel_consumed = FUEL_TANK - self.store.get_fuel()
            if done:
                out = self.call.outcome()
                self.call.close()
                self.call = None
                self._sample_memory()
                if out.results is not None and out.trap is None and out.error is None and out.exit_code is None \
                        and self._queue:
                    continue  # a boot step finished; go on to the entry
                self.outcome = out
                self._queue.clear()
                return SliceEnd.DONE
            if vm.waiting is not None and not vm.waiting.ready():
                self._sample_memory()
                return SliceEnd.BLOCKED
            if time.monotonic() >= end:
                self._sample_memory()
                return SliceEnd.YIELDED

    def _begin(self, name: str) -> bool:
        func = self.exports.get(name)
        if not isinstance(func, wasmtime.Func):
            out = wt.Outcome()
            out.error = f"entry {name!r} is not an exported function"
            self.outcome = out
            self._queue.clear()
            return False
        self.call = wt.GuestCall(self.store, func, nresults=len(func.type(self.store).results))
        return True

    def _set_fuel_interval(self, interval: int | None) -> None:
        if interval != self._fuel_interval:
            wt.set_fuel_yield_interval(self.store, interval)
            self._fuel_interval = interval

    def _sample_memory(self) -> None:
        if self.memory is not None:
            self.memory_bytes = self.memory.data_len(self.store)
            self.peak_memory = max(self.peak_memory, self.memory_bytes)

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
