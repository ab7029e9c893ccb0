"""The in-memory console of ephemeral VMs: offsets count every byte written, only the last `cap` are kept."""
from __future__ import annotations

import threading

from microvmd.devices.console import MemoryConsole


def test_reads_follow_offsets_across_writes() -> None:
    c = MemoryConsole(cap=1024)
    out = c.writer("stdout")
    out(b"hello ")
    data, off = c.read("stdout", 0)
    assert data == b"hello " and off == 6
    out(b"world\n")
    assert c.read("stdout", off) == (b"world\n", 12)
    assert c.read("stderr", 0) == (b"", 0)
    assert c.size("stdout") == 12 and c.output("stdout") == b"hello world\n"


def test_only_the_last_cap_bytes_are_kept_and_offsets_stay_valid() -> None:
    c = MemoryConsole(cap=100)
    out = c.writer("stderr")
    for i in range(50):
        out(b"%09d\n" % i)  # 10 bytes each: 500 written
    assert c.size("stderr") == 500
    kept = c.output("stderr")
    assert len(kept) == 100 and kept.endswith(b"000000049\n")
    data, off = c.read("stderr", 0)  # a reader that starts at 0 is moved past what was dropped
    assert off == 500 and data == kept
    assert c.read("stderr", 480) == (kept[-20:], 500)
    assert c.read("stderr", 500) == (b"", 500)


def test_writes_from_many_threads_lose_nothing_under_the_cap() -> None:
    c = MemoryConsole(cap=1 << 20)
    out = c.writer("stdout")

    def burst() -> None:
        for _ in range(1000):
            out(b"x" * 10)

    threads = [threading.Thread(target=burst) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.size("stdout") == 40000 and c.output("stdout") == b"x" * 40000
