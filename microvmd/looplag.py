"""Event-loop lag monitor: the loop must never be blocked (guest code, big I/O, hashing run in threads).

A ticker sleeps ``interval`` and measures how late it wakes. Lateness above ``threshold`` is a stall:
counted, logged with its size, and exported in /metrics and /v1/info, so a test (or an operator) sees at
once when some code path blocks the loop.
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("microvmd.loop")


class LoopLagMonitor:
    def __init__(self, interval: float = 0.02, threshold: float = 0.1) -> None:
        self.interval = interval
        self.threshold = threshold
        self.max_lag = 0.0
        self.stalls = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            lag = loop.time() - start - self.interval
            self.observe(lag)

    def observe(self, lag: float) -> None:
        if lag > self.max_lag:
            self.max_lag = lag
        if lag > self.threshold:
            self.stalls += 1
            log.warning("event loop was blocked for %.0f ms", lag * 1000)

    def to_api(self) -> dict[str, float | int]:
        return {"max_lag_ms": round(self.max_lag * 1000, 3), "stalls": self.stalls,
                "threshold_ms": self.threshold * 1000}

    def metrics(self) -> list[Metric]:
        return [
            GaugeMetricFamily("microvmd_event_loop_lag_seconds_max", "Largest event-loop wake-up delay seen",
                              value=self.max_lag),
            CounterMetricFamily("microvmd_event_loop_stalls_total",
                                "Times the event loop was blocked above the threshold", value=self.stalls),
        ]
