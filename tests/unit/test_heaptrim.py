"""Freed heap memory goes back to the system: what glibc keeps after a burst of frees (the soak's RSS drift,
docs/benchmarks.md) is returned by the daemon's periodic malloc_trim, and only after something was freed."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from microvmd.heaptrim import HeapTrimmer

pytestmark = pytest.mark.skipif(not HeapTrimmer().available, reason="needs glibc's malloc_trim")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_trim_returns_what_a_pinned_heap_keeps() -> None:
    blocks = [bytearray(1000) for _ in range(100_000)]  # ~100 MiB from malloc's heap (not mmap)
    pin = bytearray(1000)  # allocated after them: the heap's top stays in use, so free() returns nothing
    del blocks
    kept = rss_mib()
    HeapTrimmer().trim_now()
    assert kept - rss_mib() > 50, (kept, rss_mib())
    del pin


async def test_the_periodic_trim_runs_only_after_something_was_freed() -> None:
    trimmer = HeapTrimmer(interval=0.01)
    loop = asyncio.get_running_loop()

    def on_io(fn: Callable[[], float]) -> asyncio.Future[float]:
        return loop.run_in_executor(None, fn)

    trimmer.start(on_io)
    await asyncio.sleep(0.1)
    assert trimmer.trims == 0  # idle: nothing to give back
    trimmer.note_freed()
    while trimmer.trims == 0:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    await trimmer.stop()
    assert trimmer.trims == 1  # once per batch of frees, not every interval
    counts = {f.name: [s.value for s in f.samples] for f in trimmer.metrics()}
    assert counts["microvmd_heap_trims"] == [1]
