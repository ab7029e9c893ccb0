#!/usr/bin/env python3
"""Block device: guest disk throughput (images/diskbench in a microvmd VM) against plain Python
os.pwrite/os.pread on a host file of the same size on the same file system, measured in the same run.

Peers:
  guest  images/diskbench/diskbench.wasm in a private daemon (`python -m microvmd.daemon --socket ...
         --state-dir ... --import-images images`), one VM per run, `--disk bench` (rw, no rate limiter)
         on a disk made with POST /v1/disks. Each call is mv_blk_write/mv_blk_read of BS bytes from one
         malloc'd guest buffer; the host side (microvmd/devices/blk.py) moves the bytes with
         pwritev/preadv straight between the image file and guest memory.
  host   this process, a Python loop on a file next to the daemon's disk images (same file system,
         checked with st_dev): os.pwrite from one buffer for writes; for reads both os.pread (a new bytes
         object per call) and os.preadv into one preallocated buffer (what the guest does) are measured
         and the FASTER one is the baseline, so the ratio is never flattered by a slow host loop.

Same work on both sides: the same block size, byte count, offsets (diskbench's xorshift64* from SEED is
replayed here, so random runs hit exactly the same blocks), the same data (diskbench's pattern with each
block's offset stamped in its first 8 bytes), and every write run ends with an fsync inside the timing
(mv_blk_flush -> os.fsync of the image; os.fsync of the host file). Nothing uses O_DIRECT.

Page cache, equalised: before anything is timed, both files are written end to end with the same data and
fsync'ed, so every block is allocated on disk (no sparse holes, which read as zeros without touching the
cache) and resident in the page cache (the machine's RAM is far larger than both files; it is printed).
Reads therefore measure copies out of the page cache on both sides, and writes measure page-cache copies
plus the fsync writeback of what the run dirtied, on both sides. At the end the two files must be
byte-identical (sha256), and every guest read's checksum must equal the same reads replayed on the host
file: a mismatch fails the run instead of printing numbers.

Timing: the guest times itself (clock_gettime(CLOCK_MONOTONIC) around its I/O loop, buffer setup
excluded); the host loop is timed with time.perf_counter around the same loop (offset list and buffer
built before). Also reported: the VM's whole life as the daemon saw it (wall_time_s: instantiate, run,
exit), to show what a VM costs around the guest's own measurement. MB = 10^6 bytes. Each cell is the
median of R repetitions (default 5), guest and host runs interleaved (alternating which goes first).

Target (block device issue): guest throughput >= 50% of the host's for 1 MiB blocks, every mode. 4 KiB
blocks are reported without a target (they measure the cost of one guest->host call).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

MiB = 1 << 20
MODES = ("seqwrite", "seqread", "randwrite", "randread")
M64 = (1 << 64) - 1
DISK = "bench"


# ------------------------------------------------------------------------------------------ diskbench, replayed
class Rng:
    """diskbench.c's xorshift64*."""

    def __init__(self, seed: int) -> None:
        self.s = (seed * 0x9E3779B97F4A7C15 + 1) & M64

    def next(self) -> int:
        s = self.s
        s ^= s >> 12
        s ^= (s << 25) & M64
        s ^= s >> 27
        self.s = s
        return (s * 2685821657736338717) & M64


def pattern(bs: int, seed: int) -> bytearray:
    r = Rng(seed)
    out = bytearray()
    for i in range(0, bs, 8):
        out += r.next().to_bytes(8, "little")[:bs - i]
    return out


def plan(mode: str, bs: int, total: int, size: int, seed: int) -> list[tuple[int, int]]:
    """(offset, length) of every call diskbench makes."""
    ops: list[tuple[int, int]] = []
    rnd = mode.startswith("rand")
    r = Rng(seed)
    nblocks = size // bs
    done = pos = 0
    while done < total:
        length = bs
        if rnd:
            off = (r.next() % nblocks) * bs
        else:
            if pos >= size:
                pos = 0
            off = pos
            length = min(length, size - off)
        length = min(length, total - done)
        ops.append((off, length))
        done += length
        pos = off + length
    return ops


def fnv_first64(chunks: list[bytes]) -> int:
    h = 2166136261
    for ch in chunks:
        for b in ch[:64]:
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


# ------------------------------------------------------------------------------------------ host side
def host_run(fd: int, mode: str, bs: int, ops: list[tuple[int, int]], seed: int,
             read_variant: str = "preadv") -> float:
    """The same calls as diskbench on a host file; returns seconds (fsync included for writes)."""
    if mode.endswith("write"):
        buf = pattern(bs, seed)
        mv = memoryview(buf)
        stamped = bs >= 8
        stamps = [off.to_bytes(8, "little", signed=True) for off, _ in ops] if stamped else []
        full = mv[:bs]
        t0 = time.perf_counter()
        for i, (off, ln) in enumerate(ops):
            if stamped and ln >= 8:
                mv[0:8] = stamps[i]
            if os.pwrite(fd, full if ln == bs else mv[:ln], off) != ln:
                raise RuntimeError(f"short host write at {off}")
        os.fsync(fd)
        return time.perf_counter() - t0
    if read_variant == "pread":
        pread = os.pread
        t0 = time.perf_counter()
        for off, ln in ops:
            data = pread(fd, ln, off)
            if len(data) != ln:
                raise RuntimeError(f"short host read at {off}")
        return time.perf_counter() - t0
    buf = bytearray(bs)
    mv = memoryview(buf)
    whole: list[memoryview] = [mv[:bs]]
    preadv = os.preadv
    t0 = time.perf_counter()
    for off, ln in ops:
        if preadv(fd, whole if ln == bs else [mv[:ln]], off) != ln:
            raise RuntimeError(f"short host read at {off}")
    return time.perf_counter() - t0


def host_checksum(fd: int, ops: list[tuple[int, int]]) -> int:
    return fnv_first64([os.pread(fd, min(64, ln), off) for off, ln in ops])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ guest side
def guest_run(cl: c.UnixHttp, mode: str, bs: int, total: int, seed: int) -> dict[str, Any]:
    vm = cl.call("POST", "/v1/vms", {
        "image": "diskbench", "start": True,
        "env": {"MODE": mode, "BS": str(bs), "TOTAL": str(total), "SEED": str(seed)},
        "disks": [{"name": DISK, "mode": "rw"}],
    })
    try:
        ex = cl.call("POST", f"/v1/vms/{vm['id']}/wait?timeout=600")
        out = cl.call("GET", f"/v1/vms/{vm['id']}/logs?stream=all")
        out = out.decode(errors="replace") if isinstance(out, bytes) else str(out)
    finally:
        cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    if ex.get("code") != 0 or ex.get("reason") != "exit":
        raise RuntimeError(f"diskbench {mode} bs={bs} failed: {ex}\n{out}")
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("result ")), None)
    if line is None:
        raise RuntimeError(f"diskbench printed no result line:\n{out}")
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    if kv["mode"] != mode or int(kv["bs"]) != bs or int(kv["bytes"]) != total:
        raise RuntimeError(f"diskbench did other work than asked: {line}")
    return {"seconds": float(kv["seconds"]), "checksum": int(kv["checksum"], 16), "ops": int(kv["ops"]),
            "vm_wall_s": float(ex.get("wall_time_s") or 0.0)}


# ------------------------------------------------------------------------------------------ main
def parse_size(s: str) -> int:
    units = {"kib": 1 << 10, "mib": MiB, "gib": 1 << 30, "k": 1 << 10, "m": MiB, "g": 1 << 30}
    low = s.strip().lower()
    for u, mult in sorted(units.items(), key=lambda x: -len(x[0])):
        if low.endswith(u):
            return int(float(low[:-len(u)]) * mult)
    return int(low)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Method, page-cache handling and target: see the module docstring "
                                        "(head -45 bench/bench_disk.py).")
    ap.add_argument("--size", default="256MiB", help="disk and host file size (default 256MiB)")
    ap.add_argument("--total-1m", default=None, help="bytes per 1 MiB-block run (default: the whole disk)")
    ap.add_argument("--total-4k", default="64MiB", help="bytes per 4 KiB-block run (default 64MiB)")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions per cell, median reported (default 5)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="64MiB disk, 8MiB per 4 KiB run, 1 repetition")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's temporary directory")
    ns = ap.parse_args()
    if ns.quick:
        ns.size, ns.total_4k, ns.repeat = "64MiB", "8MiB", 1
    size = parse_size(ns.size)
    total_1m = parse_size(ns.total_1m) if ns.total_1m else size
    total_4k = parse_size(ns.total_4k)
    blocks = [(MiB, total_1m), (4096, total_4k)]
    seed = ns.seed

    c.emit("# microvmd disk benchmark: diskbench guest vs Python pwrite/pread on the host" +
           (" (QUICK MODE: small sizes, 1 repetition; not for the record)" if ns.quick else ""))
    c.emit()
    c.emit(c.machine_table())
    c.emit()
    watch = c.CpuWatch()
    d = c.Daemon(keep=ns.keep)
    d.start()
    results: list[dict[str, Any]] = []
    targets = c.Targets()
    try:
        cl = d.client()
        cl.call("POST", "/v1/disks", {"name": DISK, "size": size})
        image = d.state / "disks" / f"{DISK}.img"
        host_path = d.state / "disks" / "host-baseline.raw"  # same directory: same file system
        fd = os.open(host_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            same_fs = os.stat(image).st_dev == os.stat(host_path).st_dev
            c.emit(f"disk image: {image} ({size} bytes, created with POST /v1/disks)")
            c.emit(f"host file:  {host_path} ({size} bytes); same file system as the image: {same_fs} "
                   f"({c.fs_type(host_path)})")
            if not same_fs:
                raise RuntimeError("the host file is not on the image's file system")
            c.emit(f"per cell: 1 MiB blocks move {total_1m} bytes, 4 KiB blocks move {total_4k} bytes; "
                   f"median of {ns.repeat}; SEED={seed}")
            c.emit()

            # prefill both files end to end, same data, fsync'ed: allocated and in the page cache
            t0 = time.perf_counter()
            g = guest_run(cl, "seqwrite", MiB, size, seed)
            hs = host_run(fd, "seqwrite", MiB, plan("seqwrite", MiB, size, size, seed), seed)
            c.emit(f"prefill (untimed for the table; also warms the module cache): guest {g['seconds']:.3f} s, "
                   f"host {hs:.3f} s, {time.perf_counter() - t0:.1f} s in all")
            if sha256_file(image) != sha256_file(host_path):
                raise RuntimeError("after the prefill the disk image and the host file differ")
            c.emit()

            for mode in MODES:
                for bs, total in blocks:
                    ops = plan(mode, bs, total, size, seed)
                    gs: list[float] = []
                    walls: list[float] = []
                    hs_list: list[float] = []
                    hs_pread: list[float] = []
                    checksum: int | None = None
                    for rep in range(ns.repeat):
                        for side in (("guest", "host") if rep % 2 == 0 else ("host", "guest")):
                            if side == "host":
                                hs_list.append(host_run(fd, mode, bs, ops, seed, "preadv"))
                                if mode.endswith("read"):
                                    hs_pread.append(host_run(fd, mode, bs, ops, seed, "pread"))
                                continue
                            r = guest_run(cl, mode, bs, total, seed)
                            if r["ops"] != len(ops):
                                raise RuntimeError(f"diskbench made {r['ops']} calls, the replay {len(ops)}")
                            gs.append(r["seconds"])
                            walls.append(r["vm_wall_s"])
                            checksum = r["checksum"]
                    if mode.endswith("read"):
                        want = host_checksum(fd, ops)
                        if checksum != want:
                            raise RuntimeError(f"{mode} bs={bs}: guest read checksum {checksum:08x}, "
                                               f"the same reads of the host file give {want:08x}")
                    g_s = c.median(gs)
                    if mode.endswith("read") and c.median(hs_pread) < c.median(hs_list):
                        h_s, variant = c.median(hs_pread), "pread"
                    else:
                        h_s, variant = c.median(hs_list), ("pwrite" if mode.endswith("write") else "preadv")
                    res: dict[str, Any] = {
                        "mode": mode, "bs": bs, "bytes": total, "calls": len(ops),
                        "guest_s": g_s, "guest_mbps": mbps(total, g_s), "vm_wall_s": c.median(walls),
                        "host_s": h_s, "host_mbps": mbps(total, h_s), "host_variant": variant,
                        "host_preadv_s": c.median(hs_list) if mode.endswith("read") else None,
                        "host_pread_s": c.median(hs_pread) if hs_pread else None,
                        "guest_runs_s": gs, "host_runs_s": hs_list, "host_pread_runs_s": hs_pread,
                    }
                    res["ratio"] = res["guest_mbps"] / res["host_mbps"]
                    results.append(res)
                    c.emit(f"  {mode:9} bs={bs:>7}: guest {res['guest_mbps']:9.1f} MB/s  "
                           f"host {res['host_mbps']:9.1f} MB/s ({variant})  ratio {res['ratio']:.2f}")
            c.emit()
            identical = sha256_file(image) == sha256_file(host_path)
            c.emit(f"content check: disk image and host file byte-identical after all runs: {identical}; "
                   "every guest read checksum matched the same reads of the host file: True")
            if not identical:
                raise RuntimeError("the disk image and the host file differ after the runs")
        finally:
            os.close(fd)
            host_path.unlink(missing_ok=True)
        cl.close()
    finally:
        d.stop()

    def bsz(b: int) -> str:
        return "1 MiB" if b == MiB else f"{b // 1024} KiB"

    rows = []
    for r in results:
        rows.append((r["mode"], bsz(r["bs"]), r["calls"], f"{r['guest_s']:.4f}", f"{r['vm_wall_s']:.4f}",
                     f"{r['guest_mbps']:.1f}", f"{r['host_s']:.4f}", f"{r['host_mbps']:.1f}", r["host_variant"],
                     f"{r['ratio']:.2f}", f"{r['guest_s'] / r['calls'] * 1e6:.1f}",
                     f"{r['host_s'] / r['calls'] * 1e6:.1f}"))
    c.emit()
    c.emit(c.table(["mode", "block", "calls", "guest s", "VM wall s", "guest MB/s", "host s", "host MB/s",
                    "host loop", "ratio", "guest us/call", "host us/call"], rows,
                   title=f"## Results (median of {ns.repeat}; guest s = diskbench's own clock, "
                         "VM wall s = the VM's life as the daemon saw it, host s = the Python loop; "
                         "ratio = guest MB/s / host MB/s)"))
    reads = [r for r in results if r["host_pread_s"] is not None]
    c.emit()
    c.emit(c.table(["mode", "block", "host preadv MB/s", "host pread MB/s"],
                   [(r["mode"], bsz(r["bs"]), f"{mbps(r['bytes'], r['host_preadv_s']):.1f}",
                     f"{mbps(r['bytes'], r['host_pread_s']):.1f}") for r in reads],
                   title="## Host read loops (the faster one is the baseline above)"))
    for r in results:
        if r["bs"] == MiB:
            targets.check(f"{r['mode']} 1 MiB: guest >= 50% of host", r["ratio"] >= 0.5,
                          f"{r['guest_mbps']:.0f} vs {r['host_mbps']:.0f} MB/s = {r['ratio'] * 100:.0f}%")
    c.emit()
    c.emit("## Targets")
    c.emit()
    c.emit(targets.render())
    c.emit()
    c.emit("4 KiB blocks have no target. There the copy is cheap and the fixed cost of one call dominates: "
           "guest us/call - host us/call is roughly what one mv_blk_read/mv_blk_write costs on top of the "
           "system call (wasm -> wasmtime async host call -> Python blk.py -> preadv/pwritev). At 1 MiB the "
           "same fixed cost is spread over 256x more bytes.")
    watch.emit()
    c.emit("OVERALL: " + ("PASS" if targets.all_pass else "MISS"))
    c.write_json(ns.json, {"results": results, "targets": targets.to_json(), "machine": c.machine_info(),
                           "size": size, "repeat": ns.repeat, "quick": ns.quick})
    return 0


if __name__ == "__main__":
    sys.exit(main())
