"""A device call that cannot answer at once: the guest is suspended on it and woken when it completes.

Completion happens on the event loop (a socket became readable, a timer fired); the guest resumes on a
vCPU worker. The lock makes the hand-over between the two safe without either side waiting.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from .wt import GuestMemory


class HostOp:
    """Base for suspending device calls. Subclasses override ``finish`` to produce the results."""

    name = "host_op"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._waker: Callable[[], None] | None = None
        self.result: Any = None
        self.cancelled = False

    def ready(self) -> bool:
        return self._ready

    def set_result(self, result: Any = None) -> None:
        """Called by whoever completes the op (usually the event loop)."""
        with self._lock:
            if self._ready:
                return
            self.result = result
            self._ready = True
            waker, self._waker = self._waker, None
        if waker is not None:
            waker()

    def on_ready(self, waker: Callable[[], None]) -> bool:
        """Register the scheduler's wake-up; returns True (and registers nothing) if already ready."""
        with self._lock:
            if self._ready:
                return True
            self._waker = waker
            return False

    def cancel(self) -> None:
        """The VM is going away or being parked for a snapshot; release what the op holds."""
        self.cancelled = True

    def interrupt(self, answer: Callable[[GuestMemory], Sequence[int]]) -> None:
        """Wake the guest now and answer the call with ``answer`` instead (used to unwind for a snapshot).

        The op is cancelled first, so its own work is not done: the guest repeats the call later.
        """
        self.cancel()
        self._answer = answer
        self.set_result(None)

    def complete(self, mem: GuestMemory) -> Sequence[int]:
        answer = getattr(self, "_answer", None)
        if answer is not None:
            return answer(mem)  # type: ignore[no-any-return]
        return self.finish(mem)

    def finish(self, mem: GuestMemory) -> Sequence[int]:
        return [int(self.result or 0)]
