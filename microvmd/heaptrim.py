"""Giving freed heap memory back to the system.

glibc's malloc keeps memory a process freed for its own reuse: what falls free in the middle of a heap, and
in the per-thread arenas the vCPU workers, I/O threads and hashing pool allocate from, stays in the
process's RSS until malloc happens to reuse it. A daemon that creates and frees machines, snapshot copies
and HTTP buffers all day therefore shows a slowly rising RSS that is not a leak (bench/bench_soak.py: about
+1.2 MiB/min of churn, all of it returned by one ``malloc_trim(0)``; docs/benchmarks.md). Every
``interval`` seconds, if the daemon freed a machine since the last time, ``malloc_trim(0)`` returns those
pages (on an I/O thread: it walks every arena under its lock, a few milliseconds).

Without glibc (musl, other platforms) it does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric

log = logging.getLogger("microvmd.heap")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Any = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


class HeapTrimmer:
    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._trim = _malloc_trim()
        self.freed = 0  # machines released (bumped on the loop by the hypervisor)
        self._seen = 0
        self.trims = 0
        self.seconds = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def note_freed(self) -> None:
        self.freed += 1

    def start(self, on_io: Callable[[Callable[[], float]], Awaitable[float]]) -> None:
        if self._trim is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(on_io), name="heap-trim")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self, on_io: Callable[[Callable[[], float]], Awaitable[float]]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.freed == self._seen:
                continue  # (an idle daemon has nothing new to give back)
            self._seen = self.freed
            took = await on_io(self.trim_now)
            log.debug("malloc_trim: %.1f ms", took * 1000)

    def trim_now(self) -> float:
        """On an I/O thread: ``malloc_trim(0)``; returns the seconds it took."""
        assert self._trim is not None
        t0 = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - t0
        self.trims += 1
        self.seconds += took
        return took

    def metrics(self) -> list[Metric]:
        trims = CounterMetricFamily("microvmd_heap_trims", "malloc_trim(0) calls that gave freed heap memory "
                                    "back to the system")
        trims.add_metric([], self.trims)
        secs = CounterMetricFamily("microvmd_heap_trim_seconds", "Time spent in malloc_trim(0)")
        secs.add_metric([], self.seconds)
        return [trims, secs]
