"""VM lifecycle: an explicit state enum and the one table of allowed transitions."""
from __future__ import annotations

from enum import IntEnum, StrEnum

from ..errors import InvalidState


class VmState(StrEnum):
    CREATED = "created"          # instantiated, not yet started
    RUNNING = "running"          # on a vCPU, queued for one, or blocked in a device call
    PAUSED = "paused"            # parked by the user; holds no thread
    OUT_OF_FUEL = "out_of_fuel"  # parked at its fuel budget; `fuel add` lets it continue
    EXITED = "exited"            # the guest ended by itself (exit code)
    STOPPED = "stopped"          # the host ended it (reason in the exit record)

    @property
    def terminal(self) -> bool:
        return self in (VmState.EXITED, VmState.STOPPED)

    @property
    def live(self) -> bool:
        return not self.terminal


S = VmState
TRANSITIONS: dict[VmState, frozenset[VmState]] = {
    S.CREATED: frozenset({S.RUNNING, S.STOPPED}),
    S.RUNNING: frozenset({S.PAUSED, S.OUT_OF_FUEL, S.EXITED, S.STOPPED}),
    S.PAUSED: frozenset({S.RUNNING, S.STOPPED}),
    S.OUT_OF_FUEL: frozenset({S.RUNNING, S.STOPPED}),
    # an ended VM runs again from its image (start, a restart policy) or from its own snapshot (resume
    # after a daemon restart): a new machine in the same record
    S.EXITED: frozenset({S.RUNNING}),
    S.STOPPED: frozenset({S.RUNNING}),
}


def check_transition(vm_id: str, current: VmState, target: VmState, action: str) -> None:
    if target not in TRANSITIONS[current]:
        raise InvalidState(f"cannot {action} VM {vm_id}: it is {current.value}")


class ExitReason(StrEnum):
    """Why a VM ended: ``exit`` when the guest ended itself, anything else when the host ended it.

    The values are the wire strings of ``exit.reason`` (docs/api.md); a trap carries its message after
    ``trap: `` (``ExitReason.TRAP.wire("unreachable")``)."""
    EXIT = "exit"
    STOPPED = "stopped"
    KILLED = "killed"
    TIMEOUT = "timeout"
    OUT_OF_FUEL = "out_of_fuel"
    STACK_OVERFLOW = "stack_overflow"
    TRAP = "trap"
    MIGRATED = "migrated"
    SUSPENDED = "suspended"  # snapshotted at a clean daemon stop; the next daemon resumes it from there
    DAEMON_RESTART = "daemon_restart"

    def wire(self, detail: str | None = None) -> str:
        return f"{self.value}: {detail}" if detail is not None else self.value


class Control(IntEnum):
    """A request applied at a running VM's next yield. A stronger one (higher) replaces a weaker one."""
    PAUSE = 0
    STOP = 1
    TIMEOUT = 2
    KILL = 3

    @property
    def reason(self) -> ExitReason:
        """How the VM ends when this request is applied (PAUSE does not end it)."""
        return {Control.STOP: ExitReason.STOPPED, Control.TIMEOUT: ExitReason.TIMEOUT,
                Control.KILL: ExitReason.KILLED}[self]
