"""The dirty-page tracker against the real kernel: userfaultfd async write-protect + PAGEMAP_SCAN."""
from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator

import pytest

from microvmd.snapshot import dirty

PAGE = dirty.PAGE
CHUNK = 65536

tracker = dirty.tracker()
pytestmark = pytest.mark.skipif(tracker is None, reason=f"dirty-page tracking: {dirty.status()}")


@pytest.fixture
def region() -> Iterator[tuple[mmap.mmap, int]]:
    m = mmap.mmap(-1, 4 << 20)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    m[:] = b"\x01" * len(m)
    yield m, addr
    m.close()


def test_reports_exactly_the_written_pages_then_nothing(region: tuple[mmap.mmap, int]) -> None:
    assert tracker is not None
    m, addr = region
    tracker.arm(addr, len(m))
    assert tracker.collect_pages(addr, len(m)) == []
    for page in (0, 1, 7, 300, 1023):
        m[page * PAGE + 5] = 9
    assert tracker.collect_pages(addr, len(m)) == [(0, 2 * PAGE), (7 * PAGE, 8 * PAGE), (300 * PAGE, 301 * PAGE),
                                                   (1023 * PAGE, 1024 * PAGE)]
    # the scan re-protected them: only new writes show up next time
    assert tracker.collect_pages(addr, len(m)) == []
    m[300 * PAGE] = 3
    assert tracker.collect_chunks(addr, len(m), CHUNK) == [300 * PAGE // CHUNK]


def test_writes_by_the_kernel_and_rewrites_of_the_same_bytes_count(region: tuple[mmap.mmap, int]) -> None:
    assert tracker is not None
    m, addr = region
    tracker.arm(addr, len(m))
    r, w = os.pipe()
    try:
        os.write(w, b"x" * 100)
        os.readv(r, [memoryview(m)[20 * PAGE:20 * PAGE + 100]])  # a read() into guest memory
    finally:
        os.close(r)
        os.close(w)
    m[40 * PAGE] = m[40 * PAGE]  # same value: a superset of the changes is allowed, never a subset
    assert tracker.collect_pages(addr, len(m)) == [(20 * PAGE, 21 * PAGE), (40 * PAGE, 41 * PAGE)]


def test_chunks_cover_every_written_page_once(region: tuple[mmap.mmap, int]) -> None:
    assert tracker is not None
    m, addr = region
    tracker.arm(addr, len(m))
    m[CHUNK - PAGE: CHUNK + PAGE] = b"\x05" * (2 * PAGE)  # the last page of chunk 0 and first of chunk 1
    m[3 * CHUNK + 100] = 4
    m[3 * CHUNK + 2 * PAGE] = 4
    assert tracker.collect_chunks(addr, len(m), CHUNK) == [0, 1, 3]


def test_every_page_written_is_every_chunk(region: tuple[mmap.mmap, int]) -> None:
    assert tracker is not None
    m, addr = region
    tracker.arm(addr, len(m))
    m[:] = b"\x02" * len(m)  # more regions than one scan vector holds when they are not merged
    assert tracker.collect_chunks(addr, len(m), CHUNK) == list(range(len(m) // CHUNK))


def test_an_untracked_or_remapped_range_is_an_error_not_an_empty_answer(region: tuple[mmap.mmap, int]) -> None:
    assert tracker is not None
    m, addr = region
    other = mmap.mmap(-1, 1 << 20)
    oaddr = ctypes.addressof(ctypes.c_char.from_buffer(other))
    try:
        with pytest.raises(dirty.TrackingError):
            tracker.collect_pages(oaddr, len(other))  # never armed
    finally:
        other.close()
    tracker.arm(addr, len(m))
    # replace part of the tracked memory with a fresh mapping, as a restore does with MAP_FIXED
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    got = libc.mmap(addr + 64 * PAGE, 16 * PAGE, 3, 0x22 | 0x10, -1, 0)
    assert got == addr + 64 * PAGE
    with pytest.raises(dirty.TrackingError):
        tracker.collect_pages(addr, len(m))
    tracker.arm(addr, len(m))  # arming again covers the new mapping
    assert tracker.collect_pages(addr, len(m)) == []


def test_scattered_writes_beyond_one_scan_vector() -> None:
    assert tracker is not None
    m = mmap.mmap(-1, 16 << 20)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        tracker.arm(addr, len(m))
        pages = range(0, len(m) // PAGE, 2)  # 2048 separate regions: four scan vectors' worth
        assert len(pages) > 2 * tracker.VEC
        for p in pages:
            m[p * PAGE] = 7
        got = tracker.collect_pages(addr, len(m))
        assert got == [(p * PAGE, (p + 1) * PAGE) for p in pages]
        assert tracker.collect_pages(addr, len(m)) == []
    finally:
        m.close()
