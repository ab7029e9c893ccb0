"""A device call that cannot answer at once: the guest is suspended on it and woken when it completes.

Completion happens on the event loop (a socket became readable, a timer fired); the guest resumes on a
vCPU worker. The lock makes the hand-over between the two safe without either side waiting.

Two hooks for the scheduler: ``wait(timeout)`` lets a vCPU worker block briefly on an op that is likely to
complete soon (ping-pong traffic) instead of ending the slice (``wait_in_call`` does it inside the device
call itself, before the guest is suspended), and ``loop_waker`` builds a waker that does
not go through ``call_soon_threadsafe`` when the op completes on the event loop itself.
"""
from __future__ import annotations

import asyncio
import threading
import time
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
        self._gate: threading.Lock | None = None  # held while a worker may be blocked in ``wait``
        self.result: Any = None
        self.cancelled = False
        self.spun = False  # a worker already waited for it inside the call (wait_in_call)

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
            gate = self._gate
        if gate is not None:
            gate.release()
        if waker is not None:
            waker()

    def wait(self, timeout: float) -> bool:
        """Block the calling thread (a vCPU worker, never the event loop) until the op is ready or
        ``timeout`` seconds passed; True if it is ready. The GIL is released while waiting."""
        if self._ready:
            return True
        with self._lock:
            if self._ready:
                return True
            gate = self._gate
            if gate is None:
                gate = self._gate = threading.Lock()
                gate.acquire()  # released by set_result
        if gate.acquire(timeout=timeout):
            gate.release()  # let any other waiter through too
            return True
        return self._ready

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

    def interrupt(self, answer: Callable[[GuestMemory], Sequence[int] | None]) -> None:
        """Wake the guest now and answer the call with ``answer`` instead (used to unwind for a snapshot).

        The op is cancelled first, so its own work is not done: the guest repeats the call later.
        """
        self.cancel()
        self._answer = answer
        self.set_result(None)

    @property
    def consumed(self) -> bool:
        """The guest has taken the op's answer (it is past this suspension point)."""
        return getattr(self, "_consumed", False)

    def complete(self, mem: GuestMemory) -> Sequence[int]:
        self._consumed = True
        answer = getattr(self, "_answer", None)
        if answer is not None:
            out = answer(mem)
            if out is not None:  # (None: the interruption could not happen; the op answers for itself)
                return out  # type: ignore[no-any-return]
        return self.finish(mem)

    def finish(self, mem: GuestMemory) -> Sequence[int]:
        return [int(self.result or 0)]

    def answer_in_call(self, deadline: float, mem: GuestMemory) -> Sequence[int] | None:
        """Block (GIL released) until the op completes or ``time.monotonic()`` reaches ``deadline``; its
        answer, or None. Subclasses that can watch their sources themselves override it."""
        left = deadline - time.monotonic()
        if left > 0 and self.wait(left):
            return self.complete(mem)
        return None


def wait_in_call(vm: Any, op: HostOp, mem: GuestMemory) -> Sequence[int] | None:
    """Inside a device call on a vCPU worker: wait for ``op`` there, up to the slice's spin window, and
    return its answer if it completed (else None: the guest is suspended on it as usual). The guest then
    gets the answer from the call itself: no return to the scheduler, no continuation, no second look at
    the op's condition. Only once per op, only while the scheduler lets this worker spin (no other VM is
    queued) and no control request (pause, stop) or snapshot is pending; the scheduler does not spin on an
    op again after this. A snapshot asked for during the wait unwinds the guest from the op once it is
    parked (the manager's BLOCKED handling)."""
    spin = vm.spin
    if spin <= 0 or vm.control is not None or vm.snapshot_wanted or op.spun:
        return None
    op.spun = True
    deadline = min(time.monotonic() + spin, vm.slice_end)
    return op.answer_in_call(deadline, mem)


def loop_waker(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """A waker for ``on_ready`` that schedules ``fn(*args)`` on ``loop``: with ``call_soon`` when the op
    completes on the loop's own thread (the usual case: a socket event or a timer), which costs no
    self-pipe write and no lock, else with ``call_soon_threadsafe``. Build it on the loop's thread."""
    loop_thread = threading.get_ident()

    def wake() -> None:
        if threading.get_ident() == loop_thread:
            loop.call_soon(fn, *args)
        else:
            loop.call_soon_threadsafe(fn, *args)
    return wake
