"""Token-bucket rate limiting for a virtual disk: one bucket for bytes, one for operations.

The configuration follows Firecracker's: a bucket has a ``size`` (tokens), a ``refill_time`` (ms to go
from empty to full) and a ``one_time_burst`` (extra tokens spent first, never refilled). A bucket with size
or refill_time 0 is disabled. Buckets start full.

Where Firecracker fails a request and retries it from a timer, a guest here is single-threaded and
suspended while it waits, so the limiter *reserves* instead: ``reserve()`` always takes the tokens (the
budget may go negative, a debt the refill pays back) and returns how long the caller must wait before
doing the I/O. The average rate is the same, the waiting guest is woken exactly once, and a request
larger than the bucket (Firecracker's "over-consumption") runs after the debt it inherits, then leaves
the next request waiting ``ratio * refill_time``, as Firecracker's timer would.

Time is integer nanoseconds from an injectable clock, so tests are exact.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Clock = Callable[[], int]  # monotonic nanoseconds
NS_PER_MS = 1_000_000
_MAX = 1 << 62


class RateLimitError(ValueError):
    """A rate limiter configuration that does not make sense; the message names the field."""


@dataclass(frozen=True)
class BucketConfig:
    size: int
    refill_time: int  # milliseconds
    one_time_burst: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.refill_time > 0

    @classmethod
    def from_dict(cls, d: Any, what: str) -> BucketConfig:
        if not isinstance(d, dict):
            raise RateLimitError(f"{what} must be an object with size and refill_time")
        unknown = set(d) - {"size", "refill_time", "one_time_burst"}
        if unknown:
            raise RateLimitError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
        vals = {}
        for key, default in (("size", None), ("refill_time", None), ("one_time_burst", 0)):
            v = d.get(key, default)
            if v is None or isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _MAX:
                raise RateLimitError(f"{what}.{key} must be a non-negative integer")
            vals[key] = v
        return cls(**vals)

    def to_api(self) -> dict[str, int]:
        return {"size": self.size, "refill_time": self.refill_time, "one_time_burst": self.one_time_burst}


@dataclass(frozen=True)
class LimiterConfig:
    bandwidth: BucketConfig | None = None
    ops: BucketConfig | None = None

    @classmethod
    def from_dict(cls, d: Any) -> LimiterConfig:
        """``{"bandwidth": {...}|null, "ops": {...}|null}``; a missing or null bucket is unlimited."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise RateLimitError("rate_limiter must be an object with 'bandwidth' and/or 'ops'")
        unknown = set(d) - {"bandwidth", "ops"}
        if unknown:
            raise RateLimitError(f"rate_limiter: unknown field(s) {', '.join(sorted(unknown))}")
        bw = d.get("bandwidth")
        ops = d.get("ops")
        return cls(None if bw is None else BucketConfig.from_dict(bw, "rate_limiter.bandwidth"),
                   None if ops is None else BucketConfig.from_dict(ops, "rate_limiter.ops"))

    def updated(self, d: Any) -> LimiterConfig:
        """A PATCH: a bucket left out keeps its setting, ``null`` removes it, an object replaces it."""
        if d is None:
            return LimiterConfig()
        new = LimiterConfig.from_dict(d)
        return LimiterConfig(new.bandwidth if "bandwidth" in d else self.bandwidth,
                             new.ops if "ops" in d else self.ops)

    def to_api(self) -> dict[str, Any] | None:
        if self.bandwidth is None and self.ops is None:
            return None
        return {"bandwidth": self.bandwidth.to_api() if self.bandwidth else None,
                "ops": self.ops.to_api() if self.ops else None}


def monotonic_ns() -> int:
    return time.monotonic_ns()


class TokenBucket:
    """``size`` tokens refilled linearly over ``refill_time`` ms, plus a one-time burst spent first."""

    def __init__(self, cfg: BucketConfig, clock: Clock = monotonic_ns) -> None:
        if not cfg.enabled:
            raise ValueError("a bucket needs a positive size and refill_time")
        self.cfg = cfg
        self.size = cfg.size
        self.refill_ns = cfg.refill_time * NS_PER_MS
        self.burst = cfg.one_time_burst
        self.budget = cfg.size  # may be negative: tokens already promised to a waiting request
        self._clock = clock
        self._last = clock()

    def _replenish(self, now: int) -> None:
        elapsed = now - self._last
        if elapsed <= 0:
            return
        tokens = elapsed * self.size // self.refill_ns
        if self.budget + tokens >= self.size:
            self.budget = self.size
            self._last = now
            return
        if tokens == 0:
            return
        self.budget += tokens
        # advance only by the time those whole tokens took, so fractions carry over to the next call
        self._last += -(-tokens * self.refill_ns // self.size)

    def reserve(self, tokens: int) -> int:
        """Take ``tokens``; returns the nanoseconds to wait before the work they pay for may start."""
        if tokens <= 0:
            return 0
        if self.burst > 0:
            used = min(self.burst, tokens)
            self.burst -= used
            tokens -= used
            if tokens == 0:
                return 0
        now = self._clock()
        self._replenish(now)
        # A request bigger than the whole bucket only waits for earlier debt to be paid, then goes
        # through and leaves its own excess as debt for the next one (Firecracker's over-consumption).
        target = tokens if tokens <= self.size else 0
        missing = target - self.budget
        self.budget -= tokens
        if missing <= 0:
            return 0
        return max(0, self._last + -(-missing * self.refill_ns // self.size) - now)


class RateLimiter:
    """The two buckets of one disk attachment. Thread-safe: the vCPU uses it, the API may replace it."""

    def __init__(self, cfg: LimiterConfig | None = None, clock: Clock = monotonic_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.cfg = LimiterConfig()
        self._bw: TokenBucket | None = None
        self._ops: TokenBucket | None = None
        self.enabled = False  # any bucket: a plain attribute, read on every device call
        self.configure(cfg or LimiterConfig())

    def configure(self, cfg: LimiterConfig) -> None:
        """New buckets start full, as Firecracker's do after an update."""
        with self._lock:
            self.cfg = cfg
            self._bw = TokenBucket(cfg.bandwidth, self._clock) if cfg.bandwidth and cfg.bandwidth.enabled else None
            self._ops = TokenBucket(cfg.ops, self._clock) if cfg.ops and cfg.ops.enabled else None
            self.enabled = self._bw is not None or self._ops is not None

    def reserve(self, nbytes: int, ops: int = 1) -> float:
        """Account one request; returns the seconds to wait before performing it (0.0: go ahead)."""
        with self._lock:
            if self._bw is None and self._ops is None:
                return 0.0
            wait = 0
            if self._ops is not None:
                wait = self._ops.reserve(ops)
            if self._bw is not None:
                wait = max(wait, self._bw.reserve(nbytes))
            return wait / 1e9
