"""Daemon log lines that a guest or a client can neither forge nor flood.

Text a guest or a client chooses (a host name a guest connects to, a request path, a VM name) reaches log
lines as ``%s`` arguments. ``SafeFormatter`` escapes, in the whole message, every character that could end
a line or make one read differently from what it holds (C0 and C1 controls, DEL, bidi marks, overrides and
isolates, line and paragraph separators), so one record is always one line. ``Throttle`` bounds a repeated
event (a guest's refused connects) to a few lines per window and counts the rest, which ``/metrics``
exports (``microvmd_log_suppressed_total``); the event itself is counted where it happens.
"""
from __future__ import annotations

import logging
import threading
import time

_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r"})
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                             *range(0x2066, 0x206A))})

suppressed_total = 0  # log lines left out by every Throttle (read by /metrics)
_lock = threading.Lock()


def escape(text: str) -> str:
    """``text`` with every line-breaking or direction-changing character written as an escape."""
    if text.isascii() and text.isprintable():  # (most lines: nothing to escape, and no translate)
        return text
    return text.translate(_ESCAPES)


class SafeFormatter(logging.Formatter):
    """A formatter whose message part is always one line (a traceback, which is the daemon's own text,
    still follows on its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)


class Throttle:
    """At most ``burst`` log lines per ``window`` seconds for one repeated event; the next line after a
    quiet spell says how many were left out. Thread-safe (host calls run on vCPU workers)."""

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start = float("-inf")
        self._lines = 0
        self._left_out = 0
        self._lock = threading.Lock()

    def allow(self) -> tuple[bool, int]:
        """(whether to log this one, how many were left out since the last line logged)."""
        global suppressed_total
        now = time.monotonic()
        with self._lock:
            if now - self._start >= self.window:
                self._start, self._lines = now, 0
            if self._lines < self.burst:
                self._lines += 1
                left_out, self._left_out = self._left_out, 0
                return True, left_out
            self._left_out += 1
        with _lock:
            suppressed_total += 1
        return False, 0
