#!/usr/bin/env python3
"""Rate of `hello` VMs run to completion through the API, 16 concurrent connections: ephemeral vs persistent.

Each connection loops `POST /v1/vms?wait=true` (create, start, run to exit, answer with the exit record):
  ephemeral   {"ephemeral": true}: no record, no console files, the VM is gone when it ends
  persistent  {"auto_remove": true}: a record and console files are written, then removed when it ends
The two modes run in alternating blocks against one private daemon (--blocks of each, --seconds each), so
both see the same machine and the same daemon; the figure per mode is the median block rate.
Target (core issue): ephemeral runs at least as fast as persistent (ratio >= 1.0).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

MODES = {"ephemeral": {"ephemeral": True}, "persistent": {"auto_remove": True}}


async def block(sock: Path, mode: str, conns: int, seconds: float) -> tuple[int, list[float]]:
    body = {"image": "hello", "start": True, **MODES[mode]}
    end = time.monotonic() + seconds
    lat: list[float] = []

    async def one() -> int:
        cl = await c.AsyncUnixHttp.connect(sock)
        n = 0
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                vm = await cl.call("POST", "/v1/vms?wait=true", body)
                lat.append(time.perf_counter() - t0)
                if vm["exit"]["code"] != 0:
                    raise RuntimeError(f"hello exited {vm['exit']}")
                n += 1
        finally:
            await cl.close()
        return n

    t0 = time.monotonic()
    counts = await asyncio.gather(*(one() for _ in range(conns)))
    return int(sum(counts) / (time.monotonic() - t0)), lat


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1 block of 1 s per mode)")
    ap.add_argument("--conns", type=int, default=16, help="concurrent API connections (default 16)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks per mode (default 4)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per block (default 4)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    blocks = a.blocks or (1 if a.quick else 4)
    seconds = a.seconds or (1.0 if a.quick else 4.0)
    c.emit(f"## bench_ephemeral: `hello` runs to completion per second, {a.conns} connections, "
           f"{blocks} alternating blocks of {seconds:g} s per mode\n")
    watch = c.CpuWatch()
    rates: dict[str, list[int]] = {m: [] for m in MODES}
    lats: dict[str, list[float]] = {m: [] for m in MODES}
    with c.Daemon() as d:
        asyncio.run(block(d.socket, "ephemeral", a.conns, 0.5))  # warm-up: compiled code, ready directories
        for i in range(blocks):
            for mode in (MODES if i % 2 == 0 else reversed(list(MODES))):
                rate, lat = asyncio.run(block(d.socket, mode, a.conns, seconds))
                rates[mode].append(rate)
                lats[mode].extend(lat)
    rows = [[m, " ".join(str(r) for r in rates[m]), str(int(c.median(rates[m]))), c.ms(c.median(lats[m])),
             c.ms(c.pct(lats[m], 99))] for m in MODES]
    c.emit(c.table(["mode", "runs/s per block", "median runs/s", "p50 ms", "p99 ms"], rows))
    ratio = c.median(rates["ephemeral"]) / max(1.0, c.median(rates["persistent"]))
    c.emit(f"\nephemeral / persistent: {ratio:.2f}x")
    warning = watch.emit()
    c.emit("")
    t = c.Targets()
    t.check("ephemeral hello rate >= persistent (16 connections)", ratio >= 1.0, f"{ratio:.2f}x")
    c.emit(t.render())
    res = {"bench": "ephemeral", "rows": rows, "ratio": ratio, "targets": t.to_json(), "load_warning": warning}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
