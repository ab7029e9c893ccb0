"""Sizes, durations, counts and default paths, shared by the daemon and the client.

Stdlib only and cheap to import: the client imports this module on most invocations.

    parse_size("64MiB")      -> 67108864      (KiB/MiB/GiB/TiB and K/M/G/T are 1024-based,
    parse_size("64MB")       -> 64000000       KB/MB/GB/TB are 1000-based, bare integers are bytes)
    parse_duration("250ms")  -> 0.25          (ns/us/ms/s/m/h/d, compounds like "1h30m",
    parse_duration("10")     -> 10.0           a bare number is seconds)
    parse_count("1M")        -> 1000000       (fuel amounts: k/M/G/T are 1000-based)
    format_size(65536)       -> "64KiB"
    format_duration(90)      -> "1m30s"
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

__all__ = [
    "parse_size",
    "parse_duration",
    "parse_count",
    "format_size",
    "format_duration",
    "default_socket_path",
    "default_state_dir",
]

_KI = 1024
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": _KI, "ki": _KI, "kib": _KI, "kb": 1000,
    "m": _KI**2, "mi": _KI**2, "mib": _KI**2, "mb": 1000**2,
    "g": _KI**3, "gi": _KI**3, "gib": _KI**3, "gb": 1000**3,
    "t": _KI**4, "ti": _KI**4, "tib": _KI**4, "tb": 1000**4,
    "p": _KI**5, "pi": _KI**5, "pib": _KI**5, "pb": 1000**5,
}

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_SIZE_RE = re.compile(r"\s*" + _NUMBER + r"\s*([A-Za-z]*)\s*")
_DURATION_PART_RE = re.compile(_NUMBER + r"\s*(ns|us|µs|ms|s|m|h|d)\s*")
_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}
_COUNT_RE = re.compile(r"\s*" + _NUMBER + r"\s*([kKmMgGtT]?)\s*")
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def _scaled_int(number: str, multiplier: int) -> int:
    """number (decimal text, no sign) * multiplier, computed exactly and rounded down."""
    whole, _, frac = number.partition(".")
    value = int(whole or "0") * multiplier
    if frac:
        value += int(frac) * multiplier // 10 ** len(frac)
    return value


def parse_size(text: str | int) -> int:
    """Parse a byte size ("65536", "64KiB", "64MiB", "1GiB", "64k", "10MB") into bytes.

    KiB/MiB/GiB/TiB and the short forms K/M/G/T are powers of 1024; KB/MB/GB/TB are powers of
    1000; a bare integer (or a "B" suffix) is bytes. Units are case-insensitive. Negative
    numbers and anything else raise ValueError naming the input.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size {text!r}")
    m = _SIZE_RE.fullmatch(text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        hint = " (must not be negative)" if text.strip().startswith("-") else ""
        raise ValueError(
            f"invalid size {text!r}{hint}: expected bytes or a number with a unit "
            "like 64KiB, 64MiB, 1GiB (or 64MB for powers of 1000)"
        )
    return _scaled_int(m.group(1), _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """Parse a duration ("250ms", "10s", "2m", "1h", "1.5s", "1h30m", bare number = seconds)."""
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"invalid duration {text!r}: must be a non-negative finite number")
        return value
    if not isinstance(text, str):
        raise ValueError(f"invalid duration {text!r}")
    s = text.strip()
    if re.fullmatch(_NUMBER, s):
        return float(s)
    total = 0.0
    pos = 0
    for m in _DURATION_PART_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(s):
        hint = " (must not be negative)" if s.startswith("-") else ""
        raise ValueError(
            f"invalid duration {text!r}{hint}: expected a number of seconds or a number with a unit "
            "like 250ms, 10s, 2m, 1h (or a combination like 1m30s)"
        )
    return total


def parse_count(text: str | int) -> int:
    """Parse a count such as a fuel amount: "1000000", "1_000_000", "500k", "10M", "2G" (powers of 1000)."""
    if isinstance(text, bool):
        raise ValueError(f"invalid number {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid number {text!r}: must not be negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid number {text!r}")
    m = _COUNT_RE.fullmatch(text.replace("_", ""))
    if not m:
        hint = " (must not be negative)" if text.strip().startswith("-") else ""
        raise ValueError(f"invalid number {text!r}{hint}: expected an integer, optionally with k, M, G or T")
    number, unit = m.group(1), m.group(2).lower()
    if "." in number and not unit:
        raise ValueError(f"invalid number {text!r}: expected an integer")
    return _scaled_int(number, _COUNT_UNITS[unit])


def format_size(n: int | float | None) -> str:
    """Human size with binary units: 512 -> "512B", 65536 -> "64KiB", 1572864 -> "1.5MiB"."""
    if n is None:
        return "-"
    n = int(n)
    if abs(n) < _KI:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= _KI
        if abs(value) < _KI or unit == "PiB":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return text + unit


def format_duration(seconds: int | float | None) -> str:
    """Compact human duration: 0.25 -> "250ms", 1.5 -> "1.5s", 90 -> "1m30s", 3700 -> "1h1m", 2 days -> "2d"."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 0:
        return "-" + format_duration(-s)
    if s < 1:
        return f"{round(s * 1000)}ms"
    if s < 10:
        text = f"{s:.1f}"
        return (text[:-2] if text.endswith(".0") else text) + "s"
    total = int(s)
    if total < 60:
        return f"{total}s"
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m{secs}s" if secs else f"{minutes}m"


def _uid(uid: int | None) -> int:
    if uid is not None:
        return uid
    return os.getuid() if hasattr(os, "getuid") else 1000


def default_socket_path(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The API socket: root -> /run/microvmd/microvmd.sock; others ->
    $XDG_RUNTIME_DIR/microvmd/microvmd.sock, or /tmp/microvmd-$UID/microvmd.sock without it."""
    env = os.environ if environ is None else environ
    uid = _uid(uid)
    if uid == 0:
        return "/run/microvmd/microvmd.sock"
    runtime = env.get("XDG_RUNTIME_DIR") or ""
    if runtime and os.path.isabs(runtime):
        return os.path.join(runtime, "microvmd", "microvmd.sock")
    return f"/tmp/microvmd-{uid}/microvmd.sock"


def default_state_dir(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The state dir: root -> /var/lib/microvmd; others -> $XDG_DATA_HOME/microvmd
    (~/.local/share/microvmd without it)."""
    env = os.environ if environ is None else environ
    uid = _uid(uid)
    if uid == 0:
        return "/var/lib/microvmd"
    data = env.get("XDG_DATA_HOME") or ""
    if data and os.path.isabs(data):
        return os.path.join(data, "microvmd")
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "share", "microvmd")
