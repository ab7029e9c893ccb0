"""Daemon-wide budgets: what all guests together may hold (issue 13, item 1).

``MemoryBudget`` counts the linear memory of every live guest (``limits.total_memory``). Each machine
reports its memory as it samples it, and before each poll caps its store's memory limit at what it holds
plus what the budget has left, so a guest that would pass the budget sees ``memory.grow`` fail exactly as
at its own limit. Two guests on two vCPU workers may both see the same headroom in the same instant, so
the total can pass the budget by at most one headroom per extra worker, never more; it cannot creep.
"""
from __future__ import annotations

import threading


class MemoryBudget:
    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def change(self, delta: int) -> None:
        if delta:
            with self._lock:
                self.used += delta

    def headroom(self) -> int:
        return max(0, self.total - self.used)
