"""The loop-lag monitor must notice a blocked loop (the daemon relies on it to prove it never blocks)."""
from __future__ import annotations

import asyncio
import time

from microvmd.looplag import LoopLagMonitor


async def test_monitor_counts_a_blocked_loop() -> None:
    mon = LoopLagMonitor(interval=0.01, threshold=0.1)
    mon.start()
    await asyncio.sleep(0.05)
    assert mon.stalls == 0
    time.sleep(0.25)  # block the loop on purpose
    await asyncio.sleep(0.05)
    await mon.stop()
    assert mon.stalls == 1
    assert mon.max_lag >= 0.2


async def test_monitor_quiet_on_an_idle_loop() -> None:
    mon = LoopLagMonitor(interval=0.01, threshold=0.1)
    mon.start()
    await asyncio.sleep(0.2)
    await mon.stop()
    assert mon.stalls == 0
    stalls = {f.name: f for f in mon.metrics()}["microvmd_event_loop_stalls"]
    assert stalls.type == "counter" and [s.value for s in stalls.samples] == [0]
