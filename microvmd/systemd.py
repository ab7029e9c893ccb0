"""Minimal, dependency-free systemd integration.

Implements the three protocols a service manager offers a daemon, following the
C reference in libsystemd:

* ``sd_notify(3)``: readiness / status / watchdog messages sent as one datagram
  to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET`` (a path, or an abstract
  socket when it starts with ``@``);
* ``sd_listen_fds(3)``: socket activation, sockets passed from fd 3 onwards and
  described by ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES``;
* ``sd_watchdog_enabled(3)``: ``$WATCHDOG_USEC`` / ``$WATCHDOG_PID``.

Everything is a no-op when the daemon does not run under systemd, so the daemon
can call these functions unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Iterable

__all__ = [
    "SD_LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "listen_fds_with_names",
    "notify",
    "notify_address",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

#: The first file descriptor systemd passes (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_WATCHDOG_VARS = ("WATCHDOG_USEC", "WATCHDOG_PID")


# --------------------------------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------------------------------
def notify_address(value: str | None = None) -> str | None:
    """Translate ``$NOTIFY_SOCKET`` (or *value*) into an address for ``socket.sendto``.

    Returns ``None`` when the variable is unset, empty or not a form we support
    (only absolute paths and ``@abstract`` names are valid for ``AF_UNIX``).
    """
    if value is None:
        value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the leading '@' stands for a NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.debug("ignoring unsupported NOTIFY_SOCKET address %r", value)
    return None


def _send(address: str, state: str) -> bool:
    data = state.encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sent = sock.send(data)
    except OSError as exc:
        log.warning("sd_notify(%r) failed: %s", state.replace("\n", " "), exc)
        return False
    return sent == len(data)


def notify(state: str) -> bool:
    """Send *state* (e.g. ``"READY=1"``, newline-separated assignments) to the service manager.

    Returns ``True`` when the datagram was delivered, ``False`` when ``$NOTIFY_SOCKET``
    is unset (not running under ``Type=notify``) or sending failed. Never raises.
    """
    address = notify_address()
    if address is None:
        return False
    return _send(address, state)


def _one_line(text: str) -> str:
    # A notification is a list of VAR=value lines; a newline in a value would start a new one.
    return " ".join(text.splitlines()).strip()


class Notifier:
    """What the daemon uses to talk to systemd.

    It captures ``$NOTIFY_SOCKET`` when constructed (optionally removing it from the
    environment so processes the daemon starts do not inherit it) and turns every call
    into a no-op when the daemon is not supervised. ``enabled`` tells which.
    """

    def __init__(self, *, unset_env: bool = False) -> None:
        self._address = notify_address()
        self._watchdog = watchdog_interval()
        if unset_env:
            os.environ.pop("NOTIFY_SOCKET", None)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or ``None``."""
        return self._watchdog

    def send(self, *assignments: str) -> bool:
        if self._address is None:
            return False
        return _send(self._address, "\n".join(assignments))

    def ready(self, status: str | None = None) -> bool:
        parts = ["READY=1"]
        if status:
            parts.append("STATUS=" + _one_line(status))
        parts.append(f"MAINPID={os.getpid()}")
        return self.send(*parts)

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self, status: str | None = None) -> bool:
        parts = ["STOPPING=1"]
        if status:
            parts.append("STATUS=" + _one_line(status))
        return self.send(*parts)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send("STATUS=" + _one_line(text))

    # -- asyncio helpers ---------------------------------------------------------------------------
    async def _watchdog_loop(self, interval: float) -> None:
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """Start pinging the watchdog from the running event loop (a stalled loop stops the pings,
        which is the point). Returns the task, or ``None`` when no watchdog is configured."""
        if self._watchdog is None or self._address is None:
            return None
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._watchdog_loop(self._watchdog), name="systemd-watchdog"
            )
        return self._task

    async def stop_watchdog(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


# --------------------------------------------------------------------------------------------------
# sd_listen_fds
# --------------------------------------------------------------------------------------------------
def _unset(names: Iterable[str]) -> None:
    for name in names:
        os.environ.pop(name, None)


def listen_fds_with_names(unset_env: bool = True) -> list[tuple[str, socket.socket]]:
    """Sockets passed by socket activation, each with its ``FileDescriptorName=``.

    Returns an empty list when ``$LISTEN_PID`` is not this process (the variables were
    inherited from an ancestor) or nothing was passed. The descriptors are marked
    close-on-exec. Descriptors that are not sockets are skipped (and left open).
    """
    try:
        pid_text = os.environ.get("LISTEN_PID")
        fds_text = os.environ.get("LISTEN_FDS")
        names_text = os.environ.get("LISTEN_FDNAMES")
        if not pid_text or not fds_text:
            return []
        try:
            pid = int(pid_text)
            count = int(fds_text)
        except ValueError:
            log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid_text, fds_text)
            return []
        if pid != os.getpid() or count <= 0:
            return []
        names = names_text.split(":") if names_text else []
        result: list[tuple[str, socket.socket]] = []
        for index, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)):
            name = names[index] if index < len(names) and names[index] else "unknown"
            try:
                os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds() does
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                log.warning("ignoring passed fd %d (%s): %s", fd, name, exc)
                continue
            result.append((name, sock))
        return result
    finally:
        if unset_env:
            _unset(_LISTEN_VARS)


def listen_fds(unset_env: bool = True) -> list[socket.socket]:
    """The sockets passed by systemd socket activation (``sd_listen_fds(3)``), fd 3 first."""
    return [sock for _name, sock in listen_fds_with_names(unset_env)]


# --------------------------------------------------------------------------------------------------
# watchdog
# --------------------------------------------------------------------------------------------------
def watchdog_interval(unset_env: bool = False) -> float | None:
    """How often to send ``WATCHDOG=1``, in seconds: half of ``$WATCHDOG_USEC``.

    ``None`` when no watchdog is configured for this process (unset, malformed, zero,
    or ``$WATCHDOG_PID`` names another process).
    """
    try:
        usec_text = os.environ.get("WATCHDOG_USEC")
        pid_text = os.environ.get("WATCHDOG_PID")
        if not usec_text:
            return None
        try:
            usec = int(usec_text)
            if pid_text and int(pid_text) != os.getpid():
                return None
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000
    finally:
        if unset_env:
            _unset(_WATCHDOG_VARS)
