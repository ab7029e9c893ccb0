#!/usr/bin/env python3
"""Host-call micro-benchmark: the cost of one guest -> host call, per import, in ns.

A WAT guest calls one import N times in a loop (one exported function per case); the host polls that call
on this thread exactly as a vCPU worker does (``wt.GuestCall``), with a stand-in VM as ``current_vm()``
whose ``devices`` hold a real ``NetState`` (sockets with a stand-in transport on a uvloop loop that is not
running) and a real ``BlkState`` (a 64 MiB raw disk file in /tmp). Nothing crosses threads: this measures
the CPU cost of the call path itself (trampoline, argument and result marshalling, guest memory access,
device code), not wake-ups.

Cases:
  wasi_clock       clock_time_get, a native WASI import (the floor: no Python at all)
  nop              a Python import that returns [0] (the trampoline alone)
  nop_suspends     the same, defined as a suspension point with a suspension hook installed
  mem_read8        reads 8 bytes of guest memory
  ready_pending    returns a Pending that is already ready (the suspend/continuation path)
  net_close_badfd  net_close(999): -EBADF
  net_poll_idle    net_poll(1 connection, timeout 0), nothing to report
  net_poll_ready   net_poll(1 connection, timeout -1), data buffered: returns at once
  net_recv_16k     a "feed" import queues 16 KiB as the event loop's data_received does (the cost of a nop
                   call plus that append), then net_recv takes them: the per-message cost of receiving
  net_send_16k     net_send 16 KiB with buffer space (the loop's queue is run every 8 sends, untimed)
  net_recv_64k     the same with 64 KiB
  net_send_64k     net_send 64 KiB with buffer space
  net_poll_recv_16k  "feed" 16 KiB, then net_poll_recv: the poll and the receive of net_recv_16k in one call
                   (compare with net_poll_ready + net_recv_16k)
  blk_read_4k      blk_read 4 KiB (page cache)
  blk_write_4k     blk_write 4 KiB (page cache, no flush)

--contend adds a thread that imitates a busy event loop (short Python bursts, then a GIL-releasing sleep(0)),
so that every GIL release on the call path can cost a hand-over.

Each case: a warm-up, then R rounds of N calls; reported as the median and best ns per call of this thread's CPU
time (time.thread_time: the guest runs on this thread too), so that a busy machine preempting the benchmark does
not inflate it; with --contend, waiting for the GIL is not CPU time either, so that mode also prints wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

# the microvmd under test: a clean export of $MICROVMD_BENCH_REF (run_all.py --ref, or --ref below), else this tree
if "--ref" in sys.argv[1:-1]:
    c.set_ref(sys.argv[sys.argv.index("--ref") + 1])
ROOT = c.code_root()
sys.path.insert(0, str(ROOT))

import wasmtime  # noqa: E402

from microvmd.devices import DeviceSet  # noqa: E402
from microvmd.devices import blk as blkmod  # noqa: E402
from microvmd.devices import net as netmod  # noqa: E402
from microvmd.devices.disks import RawBackend  # noqa: E402
from microvmd.devices.ratelimit import LimiterConfig  # noqa: E402
from microvmd.engine import wt  # noqa: E402

BUF = 4096          # guest address of the I/O buffer (64 KiB + a bit)
POLLFD = 1024       # guest address of one mv_pollfd
OUT = 2048          # guest address of net_poll_recv's {index, result}
DISK_SIZE = 64 << 20
SEND_BATCH = 8      # net_send calls between two runs of the loop's queue


def _loop_body(call: str) -> str:
    return f"""(param $n i32)
    (block $done
      (loop $next
        (br_if $done (i32.eqz (local.get $n)))
        {call}
        drop
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $next)))"""


CASES: dict[str, str] = {
    "wasi_clock": "(call $clock (i32.const 1) (i64.const 0) (i32.const 64))",
    "nop": "(call $nop (i32.const 7))",
    "nop_suspends": "(call $nop_s (i32.const 7))",
    "mem_read8": "(call $read8 (i32.const 64))",
    "ready_pending": "(call $pending (i32.const 7))",
    "net_close_badfd": "(call $net_close (i32.const 999))",
    "net_poll_idle": f"(call $net_poll (i32.const {POLLFD}) (i32.const 1) (i32.const 0))",
    "net_poll_ready": f"(call $net_poll (i32.const {POLLFD + 8}) (i32.const 1) (i32.const -1))",
    "net_recv_16k": f"(call $feed (i32.const 16384)) drop "
                    f"(call $net_recv (i32.const 4) (i32.const {BUF}) (i32.const 16384) (i32.const 1))",
    "net_send_16k": f"(call $net_send (i32.const 4) (i32.const {BUF}) (i32.const 16384) (i32.const 1))",
    "net_recv_64k": f"(call $feed (i32.const 65536)) drop "
                    f"(call $net_recv (i32.const 4) (i32.const {BUF}) (i32.const 65536) (i32.const 1))",
    "net_send_64k": f"(call $net_send (i32.const 4) (i32.const {BUF}) (i32.const 65536) (i32.const 1))",
    "net_poll_recv_16k": f"(call $feed (i32.const 16384)) drop "
                         f"(call $net_poll_recv (i32.const {POLLFD + 8}) (i32.const 1) (i32.const -1) "
                         f"(i32.const {BUF}) (i32.const 16384) (i32.const {OUT}))",
    "blk_read_4k": f"(call $blk_read (i32.const 0) (i64.const 8192) (i32.const {BUF}) (i32.const 4096))",
    "blk_write_4k": f"(call $blk_write (i32.const 0) (i64.const 8192) (i32.const {BUF}) (i32.const 4096))",
}

_FUNCS = "\n".join(f'  (func (export "{name}") {_loop_body(call)})' for name, call in CASES.items())
WAT = f"""(module
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "bench" "nop" (func $nop (param i32) (result i32)))
  (import "bench" "nop_s" (func $nop_s (param i32) (result i32)))
  (import "bench" "read8" (func $read8 (param i32) (result i32)))
  (import "bench" "pending" (func $pending (param i32) (result i32)))
  (import "bench" "feed" (func $feed (param i32) (result i32)))
  (import "microvm_net" "net_close" (func $net_close (param i32) (result i32)))
  (import "microvm_net" "net_poll" (func $net_poll (param i32 i32 i32) (result i32)))
  (import "microvm_net" "net_poll_recv" (func $net_poll_recv (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "microvm_net" "net_recv" (func $net_recv (param i32 i32 i32 i32) (result i32)))
  (import "microvm_net" "net_send" (func $net_send (param i32 i32 i32 i32) (result i32)))
  (import "microvm_blk" "blk_read" (func $blk_read (param i32 i64 i32 i32) (result i32)))
  (import "microvm_blk" "blk_write" (func $blk_write (param i32 i64 i32 i32) (result i32)))
  (memory (export "memory") 4)
  ;; mv_pollfd at POLLFD: sd=3 (idle), POLLIN; at POLLFD+8: sd=4 (has data), POLLIN
  (data (i32.const {POLLFD}) "\\03\\00\\00\\00\\01\\00\\00\\00\\04\\00\\00\\00\\01\\00\\00\\00")
{_FUNCS})"""


class _Ready:
    def ready(self) -> bool:
        return True

    def complete(self, mem: wt.GuestMemory) -> Sequence[int]:
        return [0]


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, chunks: Any) -> None:
        for ch in chunks:
            self.written += len(ch)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Bench:
    def __init__(self, tmp: Path) -> None:
        try:
            import uvloop
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            self.loop = asyncio.new_event_loop()
        self.engine = wt.make_engine(wt.EngineOptions())
        linker = wasmtime.Linker(self.engine)
        linker.allow_shadowing = True
        linker.define_wasi()
        wt.define_host_func(linker, "bench", "nop", ["i32"], ["i32"], lambda mem, a: [0])
        wt.define_host_func(linker, "bench", "nop_s", ["i32"], ["i32"], lambda mem, a: [0], suspends=True)
        wt.define_host_func(linker, "bench", "read8", ["i32"], ["i32"], lambda mem, a: [len(mem.read(a[0], 8))])
        wt.define_host_func(linker, "bench", "pending", ["i32"], ["i32"], lambda mem, a: _Ready())
        payload = {n: bytes(n) for n in (16384, 65536)}

        def feed(mem: wt.GuestMemory, a: Sequence[int]) -> list[int]:
            sock = self.net.socks[4]
            with self.net.lock:  # as _Conn.data_received
                if isinstance(sock.rbuf, bytearray):
                    sock.rbuf += payload[a[0]]
                else:
                    sock.rbuf.append(payload[a[0]])
            return [0]
        wt.define_host_func(linker, "bench", "feed", ["i32"], ["i32"], feed)

        hv = SimpleNamespace(cfg=SimpleNamespace(state_dir=tmp, listen=None, gateway=None), vms={})
        self.netdev = netmod.NetDevice(hv, netmod.NetLimits(buffer_bytes=1 << 40))
        self.netdev.define(linker)
        self.blkdev = blkmod.BlockDevice(hv)
        self.blkdev.loop = self.loop
        self.blkdev.define(linker)

        self.vm = SimpleNamespace(id="bench0000000000", waiting=None, machine=None, snapshot_wanted=False,
                                  spec=SimpleNamespace(net_rate_limiter=None), devices=DeviceSet())
        self.vm.block_on = lambda op: setattr(self.vm, "waiting", op)  # as Vm.block_on
        st = netmod.NetState(self.vm, self.netdev, self.loop, self.netdev.limits, [])
        self.netdev.states.add(st)
        self.transport = FakeTransport()
        for sd in (3, 4):
            s = netmod.GSock(sd, "conn")
            s.transport = self.transport  # type: ignore[assignment]
            st.socks[sd] = s
        st.next_sd = 5
        self.net = st
        img = tmp / "bench.img"
        with open(img, "wb") as f:
            f.truncate(DISK_SIZE)
            f.write(b"\1" * DISK_SIZE)
        disk = SimpleNamespace(name="bench", size=DISK_SIZE)
        att = blkmod.Attachment(0, disk, "rw", RawBackend(img, DISK_SIZE, True),  # type: ignore[arg-type]
                                LimiterConfig.from_dict(None))
        self.blk = blkmod.BlkState(self.blkdev, self.vm.id, [att])
        self.vm.devices.add(st)
        self.vm.devices.add(self.blk)

        self.store = wasmtime.Store(self.engine)
        self.store.set_wasi(wasmtime.WasiConfig())
        self.store.set_fuel(1 << 62)
        wt.yield_on_every_epoch(self.store)
        self.instance = wt.instantiate(self.store, linker, wasmtime.Module(self.engine, WAT))
        self.exports = self.instance.exports(self.store)

    def _prepare(self, case: str, n: int) -> None:
        rbuf = self.net.socks[4].rbuf
        if case == "net_poll_ready" and not rbuf:
            if isinstance(rbuf, bytearray):
                rbuf += b"x"
            else:
                rbuf.append(b"x")

    def _drain(self) -> None:
        """Run what the calls scheduled on the (not running) loop: the transport writes."""
        self.loop.run_until_complete(asyncio.sleep(0))

    def run(self, case: str, n: int) -> tuple[float, float]:
        """Seconds per call: (CPU time of this thread, wall time)."""
        if case.startswith("net_send"):
            # what a send queues for the loop is handed to the transport between batches, as the running
            # loop would, so that memory use (and page faults) stay what they are in the daemon
            cpu = wall = 0.0
            for k in range(0, n, SEND_BATCH):
                c, w = self._run(case, min(SEND_BATCH, n - k))
                cpu += c * min(SEND_BATCH, n - k)
                wall += w * min(SEND_BATCH, n - k)
            return cpu / n, wall / n
        return self._run(case, n)

    def _run(self, case: str, n: int) -> tuple[float, float]:
        self._prepare(case, n)
        func = self.exports[case]
        assert isinstance(func, wasmtime.Func)
        wt.set_current_vm(self.vm)
        try:
            call = wt.GuestCall(self.store, func, [n])
            w0, t0 = time.perf_counter(), time.thread_time()
            try:
                while not call.poll():
                    pass
                t1, w1 = time.thread_time(), time.perf_counter()
                out = call.outcome()
            finally:
                call.close()
        finally:
            wt.set_current_vm(None)
            self.vm.waiting = None
        if not isinstance(out, wt.Returned):
            raise RuntimeError(f"{case}: {out}")
        self._drain()
        return (t1 - t0) / n, (w1 - w0) / n


def _contender(stop: threading.Event) -> None:
    """A stand-in busy event loop: Python work in short bursts with a GIL-releasing call in between."""
    while not stop.is_set():
        x = 0
        for i in range(200):
            x += i
        time.sleep(0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=2000, help="calls per round (default 2000)")
    ap.add_argument("-r", "--rounds", type=int, default=7, help="rounds per case (default 7)")
    ap.add_argument("--contend", action="store_true", help="a busy thread competes for the GIL")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (n=200, 2 rounds)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ "
                    "(default: $MICROVMD_BENCH_REF or the working tree)")
    ap.add_argument("cases", nargs="*", help=f"subset of: {' '.join(CASES)}")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.rounds = 200, 2
    cases = a.cases or list(CASES)
    stop = threading.Event()
    contender = threading.Thread(target=_contender, args=(stop,), daemon=True) if a.contend else None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-hostcall-") as tmp:
        b = Bench(Path(tmp))
        if contender is not None:
            contender.start()
        try:
            print(f"# bench_hostcall: microvmd from {ROOT}, wasmtime {wt.WASMTIME_VERSION}, n={a.n}, "
                  f"rounds={a.rounds}{', contended' if a.contend else ''}, {os.cpu_count()} CPUs")
            print(f"{'case':<18}{'CPU ns median':>14}{'CPU ns best':>12}{'wall ns median':>16}")
            for case in cases:
                b.run(case, min(a.n, 200))  # warm-up
                xs = [b.run(case, a.n) for _ in range(a.rounds)]
                cpu = [x[0] for x in xs]
                med, best = statistics.median(cpu) * 1e9, min(cpu) * 1e9
                wall = statistics.median(x[1] for x in xs) * 1e9
                results[case] = {"cpu_median_ns": med, "cpu_best_ns": best, "wall_median_ns": wall}
                print(f"{case:<18}{med:>14.0f}{best:>12.0f}{wall:>16.0f}", flush=True)
        finally:
            stop.set()
            if contender is not None:
                contender.join()
            b.blk.close_backends()
    c.write_json(a.json, {"bench": "hostcall", "results": results, "targets": []})
    return results


if __name__ == "__main__":
    main()
