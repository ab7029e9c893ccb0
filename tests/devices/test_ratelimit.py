"""The disk rate limiter, driven by a fake clock so every figure is exact."""
from __future__ import annotations

import pytest

from microvmd.devices.ratelimit import (
    BucketConfig,
    LimiterConfig,
    RateLimiter,
    RateLimitError,
    TokenBucket,
)

MS = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += int(ms * MS)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def bucket(clock: FakeClock, size: int, refill_ms: int, burst: int = 0) -> TokenBucket:
    return TokenBucket(BucketConfig(size, refill_ms, burst), clock)


def test_bucket_starts_full_and_then_waits_for_the_refill(clock: FakeClock) -> None:
    b = bucket(clock, 1000, 100)  # 10 tokens per ms
    assert b.reserve(1000) == 0
    assert b.reserve(100) == 10 * MS  # 100 tokens take 10 ms
    # that request was promised the next 100 tokens: the one after it waits behind it
    assert b.reserve(100) == 20 * MS


def test_bucket_refills_linearly_and_caps_at_size(clock: FakeClock) -> None:
    b = bucket(clock, 1000, 100)
    b.reserve(1000)
    clock.advance_ms(50)
    assert b.reserve(500) == 0
    assert b.reserve(1) > 0
    clock.advance_ms(10_000)  # long idle: full again, never more than size
    assert b.reserve(1000) == 0
    assert b.reserve(10) == 1 * MS


def test_fractions_of_a_token_carry_over(clock: FakeClock) -> None:
    b = bucket(clock, 3, 10)  # one token per 3.33 ms
    b.reserve(3)
    got = 0
    for _ in range(31):  # 1 ms steps each earn 0.3 tokens: without carrying fractions, nothing would come
        clock.advance_ms(1)
        if b.reserve(1) == 0:
            got += 1
        else:
            b.budget += 1  # undo the reservation: only count what was there
    assert got == 9  # 31 ms earn 9.3 tokens


def test_one_time_burst_is_spent_first_and_never_refilled(clock: FakeClock) -> None:
    b = bucket(clock, 100, 1000, burst=500)
    assert b.reserve(500) == 0  # burst only
    assert b.budget == 100
    assert b.reserve(100) == 0  # then the bucket
    assert b.reserve(100) == 1000 * MS
    clock.advance_ms(100_000)
    assert b.burst == 0
    assert b.reserve(100) == 0
    assert b.reserve(1) > 0


def test_burst_covers_part_of_a_request(clock: FakeClock) -> None:
    b = bucket(clock, 100, 1000, burst=30)
    assert b.reserve(130) == 0  # 30 from the burst, 100 from the bucket
    assert b.burst == 0 and b.budget == 0


def test_overconsumption_goes_through_and_delays_the_next_request(clock: FakeClock) -> None:
    # Firecracker: a request bigger than the bucket empties it and blocks for ratio * refill_time.
    b = bucket(clock, 100, 1000)
    assert b.reserve(350) == 0
    # 250 tokens of debt = 2.5 refill times before anything else may run
    assert b.reserve(1) == 2510 * MS


def test_overconsumption_after_debt_waits_only_for_the_debt(clock: FakeClock) -> None:
    b = bucket(clock, 100, 1000)
    b.reserve(100)
    b.reserve(50)  # 50 in debt
    assert b.reserve(1000) == 500 * MS  # waits until the debt is paid, then over-consumes


def test_disabled_buckets() -> None:
    assert not BucketConfig(0, 100).enabled
    assert not BucketConfig(100, 0).enabled
    with pytest.raises(ValueError):
        TokenBucket(BucketConfig(0, 100))


def test_limiter_takes_the_longer_of_both_waits(clock: FakeClock) -> None:
    rl = RateLimiter(LimiterConfig(BucketConfig(1000, 1000), BucketConfig(10, 1000)), clock)
    assert rl.reserve(100) == 0
    # 11 ops in a bucket of 10 per second: the 11th waits 100 ms although bytes are plentiful
    for _ in range(9):
        assert rl.reserve(1) == 0
    assert rl.reserve(1) == pytest.approx(0.1)
    # bytes: 890 left of 1000 (one op was 100 bytes, nine were 1, the last 1): 2000 more is an overdraft
    clock.advance_ms(1000)
    assert rl.reserve(2000) == 0  # over-consumption of the byte bucket is let through
    assert rl.reserve(1) == pytest.approx(1.0 + 0.001)  # 1000 bytes of debt + 1


def test_limiter_without_buckets_never_waits(clock: FakeClock) -> None:
    rl = RateLimiter(None, clock)
    assert not rl.enabled
    assert all(rl.reserve(1 << 30) == 0 for _ in range(100))


def test_reconfigure_starts_full(clock: FakeClock) -> None:
    rl = RateLimiter(LimiterConfig(ops=BucketConfig(1, 10_000)), clock)
    assert rl.reserve(0) == 0
    assert rl.reserve(0) == pytest.approx(10.0)
    rl.configure(LimiterConfig(ops=BucketConfig(5, 1000)))
    assert rl.reserve(0) == 0
    rl.configure(LimiterConfig())
    assert not rl.enabled


def test_sustained_rate_matches_the_configuration(clock: FakeClock) -> None:
    # 64 KiB per 100 ms = 640 KiB/s; 100 requests of 16 KiB after the initial bucket take 2.5 s in total.
    rl = RateLimiter(LimiterConfig(bandwidth=BucketConfig(64 << 10, 100)), clock)
    waited = 0.0
    for _ in range(100):
        w = rl.reserve(16 << 10)
        waited += w
        clock.advance_ms(w * 1000)
    total = 100 * (16 << 10)
    assert waited == pytest.approx((total - (64 << 10)) / (640 << 10), rel=1e-3)


def test_config_parsing_and_patch_semantics() -> None:
    cfg = LimiterConfig.from_dict({"bandwidth": {"size": 1000, "refill_time": 100},
                                   "ops": {"size": 10, "refill_time": 1000, "one_time_burst": 5}})
    assert cfg.bandwidth == BucketConfig(1000, 100, 0)
    assert cfg.ops == BucketConfig(10, 1000, 5)
    assert LimiterConfig.from_dict(cfg.to_api()) == cfg
    assert LimiterConfig.from_dict(None).to_api() is None
    # PATCH: a bucket left out is kept, null removes it, null for the whole limiter removes both
    only_ops = cfg.updated({"bandwidth": None})
    assert only_ops.bandwidth is None and only_ops.ops == cfg.ops
    assert cfg.updated({"ops": {"size": 1, "refill_time": 1}}).bandwidth == cfg.bandwidth
    assert cfg.updated(None) == LimiterConfig()


@pytest.mark.parametrize("bad", [
    "fast", {"bw": {}}, {"bandwidth": {"size": 10}}, {"bandwidth": {"size": -1, "refill_time": 10}},
    {"ops": {"size": 1, "refill_time": 1.5}}, {"ops": {"size": True, "refill_time": 1}},
    {"ops": {"size": 1, "refill_time": 1, "extra": 2}}, {"ops": []},
])
def test_config_rejects_nonsense(bad: object) -> None:
    with pytest.raises(RateLimitError):
        LimiterConfig.from_dict(bad)
