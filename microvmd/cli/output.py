"""Rendering for the client: JSON, tables, timestamps."""
from __future__ import annotations

import sys
import time
from datetime import UTC

from microvmd.units import format_duration, format_size

__all__ = ["print_json", "table", "to_epoch", "ago", "short_digest", "short_id", "format_size"]


def print_json(obj, file=None) -> None:
    import json

    out = file or sys.stdout
    out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    out.flush()


def table(headers: list[str], rows: list[list], file=None) -> None:
    """Left-aligned columns separated by three spaces (like `docker ps`)."""
    out = file or sys.stdout
    cells = [[("-" if c is None or c == "" else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = []
    for row in [headers] + cells:
        line = "   ".join(c.ljust(widths[i]) for i, c in enumerate(row))
        lines.append(line.rstrip())
    out.write("\n".join(lines) + "\n")
    out.flush()


def to_epoch(value) -> float | None:
    """A timestamp from the API (epoch seconds, or an ISO 8601 string) -> epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        from datetime import datetime

        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    return None


def ago(value, now: float | None = None) -> str:
    t = to_epoch(value)
    if t is None:
        return "-"
    delta = (time.time() if now is None else now) - t
    if delta < 1:
        return "just now"
    return format_duration(delta) + " ago"


def span(start, end=None, now: float | None = None) -> str:
    t0 = to_epoch(start)
    if t0 is None:
        return "-"
    t1 = to_epoch(end)
    if t1 is None:
        t1 = time.time() if now is None else now
    return format_duration(max(0.0, t1 - t0))


def short_digest(digest: str | None, n: int = 12) -> str:
    """sha256:0123456789abcdef... -> sha256:0123456789ab"""
    if not digest:
        return "-"
    algo, sep, hexpart = digest.partition(":")
    if not sep:
        return digest[:n]
    return f"{algo}:{hexpart[:n]}"


def short_id(vm_id: str | None, n: int = 12) -> str:
    return (vm_id or "-")[:n]


def short_image(image: str | None) -> str:
    if image and image.startswith("sha256:") and len(image) > 19:
        return short_digest(image)
    return image or "-"


def size(n) -> str:
    return format_size(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else "-"
