"""Restart policies, with docker's meanings (``docker run --restart``).

- ``no``: never restarted.
- ``on-failure[:N]``: restarted when it ends with a non-zero exit code or is stopped by the host (trap,
  timeout, memory limit, ...), at most N times in a row (no N: without limit).
- ``always``: restarted whenever it ends. A VM the user stopped or killed is not, until the daemon starts
  again (or the user starts it).
- ``unless-stopped``: as ``always``, except that a VM the user stopped stays stopped across daemon restarts.

Between restarts the VM waits a back-off: 100 ms, doubled after each restart that follows a short run, up to
``MAX_DELAY``; a run that lasted ``RESET_AFTER`` or more starts the back-off again from 100 ms.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

FIRST_DELAY = 0.1
MAX_DELAY = 10.0
RESET_AFTER = 10.0  # seconds of running after which a VM's back-off starts again from FIRST_DELAY

PATTERN = r"^(no|always|unless-stopped|on-failure(:[0-9]{1,9})?)(?![\s\S])"
_RE = re.compile(PATTERN)


@dataclass(frozen=True)
class RestartPolicy:
    name: str = "no"               # no | on-failure | always | unless-stopped
    max_retries: int | None = None  # on-failure:N

    @classmethod
    def parse(cls, text: str | None) -> RestartPolicy:
        if not text:
            return cls()
        if not _RE.match(text):
            raise ValueError(f"invalid restart policy {text!r}: expected no, on-failure[:N], always or "
                             f"unless-stopped")
        name, _, n = text.partition(":")
        return cls(name, int(n) if n else None)

    def __str__(self) -> str:
        return self.name if self.max_retries is None else f"{self.name}:{self.max_retries}"

    @property
    def keeps_running(self) -> bool:
        """A policy that wants the VM running across a daemon restart (suspend on stop keeps these)."""
        return self.name in ("always", "unless-stopped")

    def after_exit(self, failed: bool, user_stopped: bool, restart_count: int) -> bool:
        """Whether a VM that just ended is restarted (while the daemon runs)."""
        if user_stopped or self.name == "no":
            return False
        if self.name == "on-failure":
            return failed and (self.max_retries is None or restart_count < self.max_retries)
        return True

    def at_daemon_start(self, was_live: bool, user_stopped: bool, restart_count: int) -> bool:
        """Whether the daemon starts the VM again when it starts (docker's rules for a daemon restart)."""
        if self.name == "always":
            return True
        if self.name == "unless-stopped":
            return not user_stopped
        if self.name == "on-failure":  # ended by the daemon going away: a failure it did not choose
            return was_live and (self.max_retries is None or restart_count < self.max_retries)
        return False


def delay(streak: int) -> float:
    """The back-off before the restart that follows ``streak`` short runs in a row."""
    return min(MAX_DELAY, FIRST_DELAY * (2 ** min(streak, 16)))
