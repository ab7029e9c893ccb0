"""microvmd.units: sizes, durations, counts, human formatting and default paths."""
import pytest

from microvmd.units import (
    default_socket_path,
    default_state_dir,
    format_duration,
    format_size,
    parse_count,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("65536", 65536),
        ("0", 0),
        ("64KiB", 64 * 1024),
        ("64MiB", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("64k", 64 * 1024),
        ("64K", 64 * 1024),
        ("64M", 64 * 1024**2),
        ("1g", 1024**3),
        ("64KB", 64_000),
        ("10MB", 10_000_000),
        ("1GB", 1_000_000_000),
        ("512B", 512),
        ("64 MiB", 64 * 1024**2),
        (" 1GiB ", 1024**3),
        ("64mib", 64 * 1024**2),
        ("1.5KiB", 1536),
        ("0.5GiB", 512 * 1024**2),
        (4096, 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "-64MiB", "64XB", "64 M iB", "1..5K", "0x10", "KiB", "1e3", True, None, 1.5])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_size_rejects_negative_int():
    with pytest.raises(ValueError, match="negative"):
        parse_size(-5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        ("0.5", 0.5),
        ("1h30m", 5400.0),
        ("1m30s", 90.0),
        ("500us", 0.0005),
        ("100ns", 1e-7),
        ("0s", 0.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "s", "10x", "-1s", "-5", "1.5.2s", "ms10", "10 s x", "1h-30m", "inf", "nan", -1, True, None])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize(
    "text, expected",
    [("1000000", 1_000_000), ("1_000_000", 1_000_000), ("500k", 500_000), ("10M", 10_000_000),
     ("2G", 2_000_000_000), ("1.5M", 1_500_000), ("1T", 10**12), (7, 7)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "1.5", "ten", "1Mi", "1KiB", -3])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)


@pytest.mark.parametrize(
    "n, text",
    [(0, "0B"), (512, "512B"), (1023, "1023B"), (1024, "1KiB"), (65536, "64KiB"), (1536, "1.5KiB"),
     (64 * 1024**2, "64MiB"), (1024**3, "1GiB"), (1_000_000, "976.6KiB"), (None, "-")],
)
def test_format_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize("text", ["64KiB", "64MiB", "1GiB", "512B"])
def test_format_size_round_trips(text):
    assert format_size(parse_size(text)) == text


@pytest.mark.parametrize(
    "s, text",
    [(0.25, "250ms"), (0, "0ms"), (1.5, "1.5s"), (2, "2s"), (10, "10s"), (59.9, "59s"), (60, "1m"),
     (90, "1m30s"), (3600, "1h"), (3700, "1h1m"), (86400 * 2, "2d"), (86400 + 7200, "1d2h"), (None, "-")],
)
def test_format_duration(s, text):
    assert format_duration(s) == text


@pytest.mark.parametrize("text", ["250ms", "10s", "2m", "1h30m"])
def test_format_duration_round_trips(text):
    assert format_duration(parse_duration(text)) == text


def test_default_socket_path():
    assert default_socket_path(uid=0, environ={"XDG_RUNTIME_DIR": "/run/user/0"}) == "/run/microvmd/microvmd.sock"
    assert (
        default_socket_path(uid=1000, environ={"XDG_RUNTIME_DIR": "/run/user/1000"})
        == "/run/user/1000/microvmd/microvmd.sock"
    )
    assert default_socket_path(uid=1000, environ={}) == "/tmp/microvmd-1000/microvmd.sock"
    assert default_socket_path(uid=1000, environ={"XDG_RUNTIME_DIR": ""}) == "/tmp/microvmd-1000/microvmd.sock"
    assert default_socket_path(uid=1000, environ={"XDG_RUNTIME_DIR": "relative"}) == "/tmp/microvmd-1000/microvmd.sock"


def test_default_state_dir():
    assert default_state_dir(uid=0, environ={"XDG_DATA_HOME": "/x"}) == "/var/lib/microvmd"
    assert default_state_dir(uid=1000, environ={"XDG_DATA_HOME": "/home/u/.data"}) == "/home/u/.data/microvmd"
    assert default_state_dir(uid=1000, environ={"HOME": "/home/u"}) == "/home/u/.local/share/microvmd"
