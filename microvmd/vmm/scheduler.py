"""vCPU workers and the one epoch clock.

Guests run on a small pool of worker threads (wasmtime releases the GIL while Wasm runs, so workers use
every core). A VM is on a worker only while it has work to do: a paused, blocked or out-of-fuel VM is a
suspended call future that nobody polls, so 10,000 idle VMs cost no threads. One ticker thread advances
the engine epoch; at every tick a running guest yields to its worker, which is where pause, stop and
timeouts take effect.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import wasmtime

from . import wt
from .machine import SliceEnd

log = logging.getLogger("microvmd.scheduler")
VCPU_NICE = 5


class Scheduler:
    def __init__(self, engine: wasmtime.Engine, workers: int, epoch_interval: float, fuel_slice: int,
                 quantum: float = 0.02, spin_wait: float = 0.0003) -> None:
        self.engine = engine
        self.workers = workers
        self.epoch_interval = epoch_interval
        self.fuel_slice = fuel_slice
        self.quantum = quantum
        self.spin_wait = spin_wait
        self._queued = 0  # slices submitted but not started: a worker never spin-waits while others queue
        self.cpu = ThreadPoolExecutor(workers, thread_name_prefix="vcpu", initializer=_lower_priority)
        self.io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="epoch", daemon=True)
        self._ticker.start()
        self.slices = 0

    def _tick(self) -> None:
        while not self._stop.wait(self.epoch_interval):
            wt.increment_epoch(self.engine)

    def dispatch(self, vm: Any, on_end: Callable[[Any, SliceEnd | BaseException], None]) -> None:
        """Queue one slice of ``vm`` on a vCPU worker; ``on_end`` runs on the event loop afterwards."""
        loop = asyncio.get_running_loop()
        vm.on_cpu = True
        self._queued += 1
        fut = loop.run_in_executor(self.cpu, self._run_queued, vm)

        def done(f: asyncio.Future[SliceEnd]) -> None:
            vm.on_cpu = False
            exc = f.exception()
            on_end(vm, exc if exc is not None else f.result())

        fut.add_done_callback(done)

    def run_slice(self, vm: Any) -> SliceEnd:
        """One slice on the calling (vCPU) thread."""
        return self._run(vm)

    def _run_queued(self, vm: Any) -> SliceEnd:
        self._queued -= 1
        return self._run(vm, self.spin_wait if self._queued <= 0 else 0.0)

    def _run(self, vm: Any, spin: float = 0.0) -> SliceEnd:
        wt.set_current_vm(vm)
        try:
            self.slices += 1
            return vm.machine.run_slice(self.quantum, vm.fuel_budget, self.fuel_slice, vm, spin)  # type: ignore[no-any-return]
        finally:
            wt.set_current_vm(None)
            vm.console.release()

    async def on_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work (instantiation, file I/O, hashing) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    async def on_cpu_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.cpu, fn, *args)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=1)
        self.cpu.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=True, cancel_futures=True)


def _lower_priority() -> None:
    """Guests yield the CPU to the control plane: vCPU threads run at a higher nice value than the event
    loop, so on a machine whose cores are all busy with guests the API still answers at once."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VCPU_NICE)
    except (OSError, AttributeError):
        pass
