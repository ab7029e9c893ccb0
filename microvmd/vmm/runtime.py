"""A VM's runtime state: where it is in its lifecycle and what the scheduler knows of it, in one object.

Every field changes through one method, ``VmRuntime.apply``, on the event loop. ``apply`` checks a change of
``state`` against the transition table (``state.TRANSITIONS``), logs it and wakes whoever waits for the VM to
change (``changed``). A vCPU worker never writes here: a slice reports how it ended, and the device call a
guest is suspended in stays in the machine's own mailbox (``Machine.blocked_on``, an op with its own lock)
until the loop copies it in at the end of the slice.

The rule is enforced, not only written: with ``MICROVMD_STRICT_RUNTIME=1`` in the environment (the test suite
sets it, for its in-process hypervisors and the daemons it starts) any other assignment to a field raises,
and so does ``apply`` off the event loop. Production runs without the guard: it would cost a Python call on
every field write of the create/run path.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

from ..engine.hostop import HostOp
from .state import Control, VmState, check_transition

STRICT_ENV = "MICROVMD_STRICT_RUNTIME"


@dataclass
class ExitRecord:
    code: int | None
    reason: str  # "exit" or why the host stopped it
    fuel_consumed: int = 0
    peak_memory: int = 0
    wall_time_s: float = 0.0

    @property
    def host_stopped(self) -> bool:
        return self.reason != "exit"


class Changes(TypedDict, total=False):
    """The fields of ``VmRuntime``, as ``apply`` takes them."""
    state: VmState
    exit: ExitRecord | None
    started: float | None
    finished: float | None
    on_cpu: bool
    control: Control | None
    waiting: HostOp | None
    frozen: bool
    snapshot_wanted: bool
    run_since: float | None
    run_seconds: float
    deadline: asyncio.TimerHandle | None
    restart: asyncio.TimerHandle | None
    log_hold: asyncio.TimerHandle | None
    backoff_streak: int
    unwound_waiters: tuple[asyncio.Future[None], ...]
    off_cpu_waiters: tuple[asyncio.Future[None], ...]
    machine_closed: asyncio.Future[None] | None


_set = object.__setattr__


class VmRuntime:
    """Read its fields anywhere; change them only with ``apply`` (on the event loop)."""

    __slots__ = ("vm_id", "log", "changed", *Changes.__annotations__)

    vm_id: str
    log: logging.LoggerAdapter[logging.Logger]
    state: VmState
    exit: ExitRecord | None             # how it ended (None while it is live)
    started: float | None               # wall clock of its last start
    finished: float | None              # wall clock of its end
    on_cpu: bool                        # a slice of it is on a vCPU worker (queued or running)
    control: Control | None             # a request the worker sees at its next yield
    waiting: HostOp | None              # the device call it was last suspended in (copied at a slice end)
    frozen: bool                        # being captured for a snapshot: do not run it
    snapshot_wanted: bool               # unwind at the next suspension point
    run_since: float | None             # monotonic time it last became running
    run_seconds: float                  # time spent running before run_since (the wall-clock limit)
    deadline: asyncio.TimerHandle | None  # its wall-clock limit's timer
    restart: asyncio.TimerHandle | None   # a restart by its policy, waiting for its back-off
    log_hold: asyncio.TimerHandle | None  # held off its vCPU for its console output rate, until this fires
    backoff_streak: int                 # restarts in a row after short runs (restart.delay)
    unwound_waiters: tuple[asyncio.Future[None], ...]  # quiesce() calls waiting for the unwind
    off_cpu_waiters: tuple[asyncio.Future[None], ...]  # off_cpu() calls waiting for the slice to end
    machine_closed: asyncio.Future[None] | None  # the old store's close, awaited before a re-run
    changed: asyncio.Event              # set and replaced at every change of state or waiting

    def __init__(self, vm_id: str, log: logging.LoggerAdapter[logging.Logger], state: VmState = VmState.CREATED,
                 exit: ExitRecord | None = None, started: float | None = None,
                 finished: float | None = None) -> None:
        # (the fields' first values: a VM under construction is not shared yet, on any thread)
        for name, value in (("vm_id", vm_id), ("log", log), ("state", state), ("exit", exit),
                            ("started", started), ("finished", finished), ("on_cpu", False), ("control", None),
                            ("waiting", None), ("frozen", False), ("snapshot_wanted", False),
                            ("run_since", None), ("run_seconds", 0.0), ("deadline", None), ("restart", None),
                            ("log_hold", None),
                            ("backoff_streak", 0), ("unwound_waiters", ()), ("off_cpu_waiters", ()),
                            ("machine_closed", None), ("changed", asyncio.Event())):
            _set(self, name, value)

    def apply(self, why: str, /, **changes: Unpack[Changes]) -> None:
        """The one way a field changes (event loop only). A new ``state`` must be allowed from the current
        one (InvalidState otherwise, nothing changed); it is logged with ``why``. A change of ``state`` or
        ``waiting`` wakes whoever waits on ``changed``."""
        target = changes.get("state")
        if target is not None:
            check_transition(self.vm_id, self.state, target, why)
            self.log.debug("%s -> %s (%s)", self.state.value, target.value, why)
        for name, value in changes.items():
            _set(self, name, value)
        if target is not None or "waiting" in changes:
            self.poke()

    def poke(self) -> None:
        """Wake whoever waits on ``changed`` without a change (event loop only): the guest blocked in a device
        call with log followers, who then read what it wrote (the waiters all look again at what they wait
        for)."""
        changed = self.changed
        _set(self, "changed", asyncio.Event())
        changed.set()

    # ---------------------------------------------------------------- on and off a vCPU
    def enter_cpu(self) -> None:
        self.apply("slice", on_cpu=True)

    def leave_cpu(self) -> None:
        """The slice has returned to the event loop: whoever waits for the machine to be free may go on."""
        waiters = self.off_cpu_waiters
        if not waiters:
            self.apply("slice end", on_cpu=False)
            return
        self.apply("slice end", on_cpu=False, off_cpu_waiters=())
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def off_cpu(self) -> None:
        """Until no slice of this VM runs. A slice ends within one quantum (epoch interruption), so this
        needs no timeout; the store is never closed under a running slice."""
        if self.on_cpu:
            fut = asyncio.get_running_loop().create_future()
            self.apply("wait off cpu", off_cpu_waiters=(*self.off_cpu_waiters, fut))
            await fut

    def __repr__(self) -> str:
        return f"<VmRuntime {self.vm_id[:12]} {self.state.value}>"


# ------------------------------------------------------------------ the guard (tests, MICROVMD_STRICT_RUNTIME)
class RuntimeRuleBroken(AssertionError):
    """A runtime field was set other than by ``VmRuntime.apply`` on the event loop."""


_unchecked_apply = VmRuntime.apply


def _refuse(self: VmRuntime, name: str, value: Any) -> None:
    raise RuntimeRuleBroken(f"VmRuntime.{name} set directly; change it with VmRuntime.apply on the event loop")


def _checked_apply(self: VmRuntime, why: str, /, **changes: Unpack[Changes]) -> None:
    if asyncio._get_running_loop() is None:
        raise RuntimeRuleBroken(f"VmRuntime.apply({why!r}) called off the event loop")
    _unchecked_apply(self, why, **changes)


def enforce(on: bool = True) -> None:
    """Turn the guard on (or off again): a direct assignment to a field, or ``apply`` off the event loop,
    raises RuntimeRuleBroken."""
    if on:
        VmRuntime.__setattr__ = _refuse  # type: ignore[method-assign,assignment]
        VmRuntime.apply = _checked_apply  # type: ignore[method-assign]
    else:
        if "__setattr__" in VmRuntime.__dict__:
            del VmRuntime.__setattr__
        VmRuntime.apply = _unchecked_apply  # type: ignore[method-assign]


def enforced() -> bool:
    return VmRuntime.apply is _checked_apply  # type: ignore[comparison-overlap]


if os.environ.get(STRICT_ENV) == "1":
    enforce()
