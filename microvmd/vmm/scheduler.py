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
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import wasmtime

from ..engine import wt
from .machine import SliceEnd

log = logging.getLogger("microvmd.scheduler")
VCPU_NICE = 5


class _VcpuPool:
    """The vCPU worker threads: a plain queue of jobs, no futures (a slice reports back through one
    ``call_soon_threadsafe``; ``run_in_executor`` would add two futures and their callbacks per slice)."""

    def __init__(self, workers: int) -> None:
        self.queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"vcpu_{i}", daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        _lower_priority()
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                job()
            except RuntimeError:  # the event loop closed under a last job (shutdown): nothing to report to
                log.debug("vCPU job finished after the event loop closed")

    def idle(self) -> bool:
        """No job is waiting for a worker (an approximate, lock-free reading)."""
        return self.queue.qsize() == 0

    def shutdown(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(timeout=5)


class Scheduler:
    def __init__(self, engine: wasmtime.Engine, workers: int, epoch_interval: float, fuel_slice: int,
                 quantum: float = 0.02, spin_wait: float = 0.0003) -> None:
        self.engine = engine
        self.engines = [engine]  # every engine whose epoch this clock advances (functions/direct.py adds its own)
        self.workers = workers
        self.epoch_interval = epoch_interval
        self.fuel_slice = fuel_slice
        self.quantum = quantum
        self.spin_wait = spin_wait
        self.cpu = _VcpuPool(workers)
        self.io = ThreadPoolExecutor(4, thread_name_prefix="io")
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="epoch", daemon=True)
        self._ticker.start()
        self.slices = 0

    def _tick(self) -> None:
        while not self._stop.wait(self.epoch_interval):
            for engine in self.engines:
                wt.increment_epoch(engine)

    def dispatch(self, vm: Any, on_end: Callable[[Any, SliceEnd | BaseException], None]) -> None:
        """Queue one slice of ``vm`` on a vCPU worker; ``on_end`` runs on the event loop afterwards."""
        loop = asyncio.get_running_loop()
        vm.rt.enter_cpu()

        def done(end: SliceEnd | BaseException) -> None:
            vm.rt.leave_cpu()
            on_end(vm, end)

        def job() -> None:
            end: SliceEnd | BaseException
            try:
                # a worker waits for a blocked guest's answer only if no other VM waits for a worker
                end = self._run(vm, self.spin_wait if self.cpu.idle() else 0.0)
            except BaseException as exc:  # reported to the loop, which stops the VM
                end = exc
            loop.call_soon_threadsafe(done, end)

        self.cpu.queue.put(job)

    def run_slice(self, vm: Any) -> SliceEnd:
        """One slice on the calling (vCPU) thread."""
        return self._run(vm)

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
        """Run ``fn`` on a vCPU worker (a VM's build and first slice)."""
        return await self.submit_cpu(fn, *args)[0]

    def submit_cpu(self, fn: Callable[..., Any], *args: Any) -> tuple[asyncio.Future[Any], asyncio.Future[None]]:
        """Queue ``fn`` on a vCPU worker: (its result, ``ended``), both settled on the loop when it has run.
        Cancelling the result does not stop the job; ``ended`` is never cancelled by whoever awaits the
        result, so a canceller waits for the job on it. (Awaiting the result directly, not through
        ``asyncio.shield``, saves a loop turn per VM start: a shield's outer future settles one turn after
        the inner one.)"""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        ended: asyncio.Future[None] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                fut.set_result(value) if ok else fut.set_exception(value)
            ended.set_result(None)

        def job() -> None:
            try:
                result = fn(*args)
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        self.cpu.queue.put(job)
        return fut, ended

    def close(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=1)
        self.cpu.shutdown()
        self.io.shutdown(wait=True, cancel_futures=True)


def _lower_priority() -> None:
    """Guests yield the CPU to the control plane: vCPU threads run at a higher nice value than the event
    loop, so on a machine whose cores are all busy with guests the API still answers at once."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), VCPU_NICE)
    except (OSError, AttributeError):
        pass
