#!/usr/bin/env python3
"""What dirty-page tracking (microvmd/snapshot/dirty.py) costs and saves, on 64 MiB of touched memory.

In one run, on one 64 MiB private anonymous mapping (guest linear memory is one), median of --runs:

  memcmp against a parent copy     what a --diff without tracking does: compare all chunks (1 thread)
  arm                              UFFDIO_REGISTER + UFFDIO_WRITEPROTECT of the whole range (a full snapshot
                                   pays this while the VM is frozen)
  scan, 1% of pages written        PAGEMAP_SCAN with re-protect, after writing 1 byte in every 100th page
                                   (what a --diff pays instead of the memcmp)
  scan, nothing written            the floor of a scan
  rewrite 64 MiB, untracked        memset of the whole range, pages already writable
  rewrite 64 MiB, tracked          the same right after arming: every page takes one write-protect fault
                                   (the guest's price after each snapshot; per page below)

No target of its own: it explains the diff row of bench_snapshot.py.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15, help="repetitions (default 15)")
    p.add_argument("--mb", type=int, default=64, help="MiB of memory (default 64)")
    p.add_argument("--ref", metavar="GIT-REV", help="measure a clean export of this revision's microvmd/")
    p.add_argument("--quick", action="store_true", help="a short smoke run (run_all.py --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.mb = 2, 8
    c.set_ref(a.ref)
    sys.path.insert(0, str(c.code_root()))
    from microvmd.snapshot import dirty
    from microvmd.snapshot.store import CHUNK, memcmp
    c.emit(f"# bench_dirty: {a.mb} MiB, {a.runs} runs\n")
    c.emit(c.machine_table())
    tr = dirty.tracker()
    c.emit(f"\ndirty tracking: {dirty.status()}\n")
    if tr is None:
        return 1
    size = a.mb * MiB
    m = mmap.mmap(-1, size)
    parent = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    paddr = ctypes.addressof(ctypes.c_char.from_buffer(parent))
    ctypes.memset(addr, 1, size)
    ctypes.memset(paddr, 1, size)
    pages = size // dirty.PAGE
    rows: dict[str, list[float]] = {k: [] for k in (
        "memcmp", "arm", "scan1", "scan0", "rewrite_plain", "rewrite_tracked")}
    written: list[int] = []
    for _ in range(a.runs):
        t = time.perf_counter()
        n = sum(1 for off in range(0, size, CHUNK) if memcmp(addr + off, paddr + off, CHUNK))
        rows["memcmp"].append(time.perf_counter() - t)
        assert n == 0
        t = time.perf_counter()
        tr.arm(addr, size)
        rows["arm"].append(time.perf_counter() - t)
        for pg in range(0, pages, 100):
            ctypes.memset(addr + pg * dirty.PAGE, 2, 1)
        t = time.perf_counter()
        got = tr.collect_chunks(addr, size, CHUNK)
        rows["scan1"].append(time.perf_counter() - t)
        written.append(len(got))
        t = time.perf_counter()
        assert tr.collect_chunks(addr, size, CHUNK) == []
        rows["scan0"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ctypes.memset(addr, 3, size)  # every page faults once: they are all protected again
        rows["rewrite_tracked"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ctypes.memset(addr, 1, size)
        rows["rewrite_plain"].append(time.perf_counter() - t)
        tr.collect_pages(addr, size)
    med = {k: c.median(v) * 1000 for k, v in rows.items()}
    base = med["memcmp"]
    labels = [
        ("memcmp", "memcmp of all chunks against a parent copy (a diff without tracking)", ""),
        ("arm", "arm: register + write-protect the whole range", ""),
        ("scan1", "scan + re-protect, 1% of pages written", f"{int(c.median(written))} chunks reported"),
        ("scan0", "scan + re-protect, nothing written", ""),
        ("rewrite_plain", "rewrite all pages, untracked", ""),
        ("rewrite_tracked", "rewrite all pages right after arming", ""),
    ]
    c.emit(c.table(["operation", "median ms", "x memcmp", "notes"],
                   [[label, f"{med[k]:.3f}", f"{med[k] / base:.2f}x", note] for k, label, note in labels]))
    per_page = (med["rewrite_tracked"] - med["rewrite_plain"]) / pages * 1000
    c.emit(f"\nwrite-protect fault, first write to a page after a snapshot: {per_page:.2f} µs per "
           f"{dirty.PAGE // 1024} KiB page ({pages} pages)")
    c.emit(f"a 1% diff's page lookup: {med['scan1']:.3f} ms instead of {base:.3f} ms of memcmp "
           f"({base / med['scan1']:.0f}x less)")
    c.emit(f"\nload average at end: {c.loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
