"""Exit reasons and control requests are enums whose wire strings stay those of docs/api.md."""
from __future__ import annotations

from microvmd.vmm.state import Control, ExitReason


def test_exit_reasons_keep_their_wire_strings() -> None:
    assert ExitReason.EXIT.wire() == "exit"
    assert ExitReason.KILLED.wire() == "killed" and ExitReason.STOPPED.wire() == "stopped"
    assert ExitReason.TRAP.wire("unreachable") == "trap: unreachable"
    assert ExitReason("daemon_restart") is ExitReason.DAEMON_RESTART


def test_a_stronger_control_request_replaces_a_weaker_one() -> None:
    assert Control.PAUSE < Control.STOP < Control.TIMEOUT < Control.KILL
    assert Control.STOP.reason is ExitReason.STOPPED
    assert Control.TIMEOUT.reason is ExitReason.TIMEOUT
    assert Control.KILL.reason is ExitReason.KILLED
