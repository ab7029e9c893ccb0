#!/usr/bin/env python3
"""CPython 3.12 (WASI) in microvmd: what the Asyncify rewrite costs, and what a pre-initialised snapshot buys.

The guest is images/python/python.wasm (scripts/fetch-interpreters; git-ignored, read from the working tree
even with --ref). The daemon keeps ONE state directory across runs ($MICROVMD_BENCH_PYTHON_STATE, default
$TMPDIR/microvmd-bench-python/state) so that the ~4 min Asyncify rewrite of python.wasm happens once per host;
the first run pays it (reported as "first import", not as a target).

  1. compute    `python -c <pure-Python loop>` run to exit (POST /v1/vms?wait=true) with the rewritten image
                vs the original one (imported with ?no_asyncify=true); alternated, median; target <= 1.25x
  2. first answer  a REPL (`for line in sys.stdin: exec(line)`) created with stdin open, snapshotted once it
                waits in fd_read; per sample: restore {"start": true}, stream `print(json.dumps(1))` to its
                stdin (chunked, left open) and read `1` from GET logs?follow=true; vs a cold VM (create with
                stdin, start, same line). p50 each; targets: restored p50 <= 5 ms, >= 20x faster than cold
  3. idle snapshot  the waiting REPL: snapshot time (first, then repeated), size (memory, chunks, new bytes,
                bytes on disk), restore time ({"start": false})
  4. cache hit  a second import of python.wasm (its rewrite is cached by input digest); target <= 1 s
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

PY_WASM = c.ROOT / "images" / "python" / "python.wasm"
STATE_ENV = "MICROVMD_BENCH_PYTHON_STATE"
PREFIX = "pybench-"
REPL = "import sys, json\nfor line in sys.stdin: exec(line)"
LINE = b"print(json.dumps(1))\n"
ANSWER = b"1\n"
TARGETS = ["compute: rewritten / original <= 1.25x", "first answer: restored p50 <= 5 ms",
           "first answer: restored >= 20x faster than cold", "second import (cache hit) <= 1 s"]


def workload(n: int) -> str:
    """A pystone-style loop: function calls, integer arithmetic, a list and a dict."""
    return ("def f(n):\n"
            "    s, d, xs = 0, {}, []\n"
            "    for i in range(n):\n"
            "        s = (s + i * i) % 1000003\n"
            "        if i % 7 == 0:\n"
            "            xs.append(s)\n"
            "        d[i & 255] = s\n"
            "    return s + len(xs) + len(d)\n"
            f"print(f({n}))\n")


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path(tempfile.gettempdir()) / "microvmd-bench-python" / "state")


def du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
        except OSError:
            pass
    return total


# ------------------------------------------------------------------------------------------ raw streams
def connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(sock))
    return s


def read_until_answer(s: socket.socket) -> bytes:
    """Read a chunked logs?follow=true answer until ANSWER is in its decoded body; returns what was decoded."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise ConnectionError("logs: connection closed before the head")
        buf += d
    head, _, buf = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"logs: HTTP {status}: {head!r} {buf[:300]!r}")
    body = b""
    while True:
        while b"\r\n" in buf:
            size_s, _, rest = buf.partition(b"\r\n")
            size = int(size_s.split(b";")[0], 16)
            if len(rest) < size + 2:
                break
            body += rest[:size]
            buf = rest[size + 2:]
            if size == 0:
                raise RuntimeError(f"logs ended without the answer; console: {body[-500:]!r}")
        if ANSWER in body:
            return body
        d = s.recv(65536)
        if not d:
            raise ConnectionError(f"logs: connection closed; console so far: {body[-500:]!r}")
        buf += d


def first_answer(sock: Path, cl: c.UnixHttp, start: Any) -> tuple[float, float, str]:
    """start(): creates or restores a running REPL VM, returns its id. Returns (total s, start s, vm id):
    from the request to the answer read from its console."""
    t0 = time.perf_counter()
    vid = start()
    t1 = time.perf_counter()
    logs = connect(sock)
    inp = connect(sock)
    try:
        logs.sendall(f"GET /v1/vms/{vid}/logs?follow=true&stream=stdout HTTP/1.1\r\nHost: microvmd\r\n\r\n"
                     .encode())
        inp.sendall(f"POST /v1/vms/{vid}/stdin HTTP/1.1\r\nHost: microvmd\r\nContent-Type: "
                    f"application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                    + f"{len(LINE):x}\r\n".encode() + LINE + b"\r\n")
        read_until_answer(logs)
        t2 = time.perf_counter()
        inp.sendall(b"0\r\n\r\n")  # end of stdin: the REPL ends
        inp.recv(4096)
    finally:
        logs.close()
        inp.close()
    cl.call("DELETE", f"/v1/vms/{vid}?force=true")
    return t2 - t0, t1 - t0, vid


def wait_blocked(cl: c.UnixHttp, vid: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        vm = cl.call("GET", f"/v1/vms/{vid}")
        if vm.get("blocked_in") in ("fd_read", "poll_oneoff"):
            return vm
        if vm["state"] not in ("created", "running"):
            raise RuntimeError(f"REPL VM ended: {vm.get('exit')}")
        time.sleep(0.01)
    raise RuntimeError("REPL VM never blocked in fd_read")


def import_py(cl: c.UnixHttp, name: str, data: bytes, plain: bool = False) -> tuple[float, dict]:
    q = f"/v1/images?name={name}" + ("&no_asyncify=true" if plain else "")
    t0 = time.perf_counter()
    st, body = cl.raw("POST", q, data, content_type="application/wasm")
    dt = time.perf_counter() - t0
    if st >= 400:
        raise c.HttpError(st, body)
    return dt, json.loads(body)


def cleanup(cl: c.UnixHttp) -> None:
    for vm in cl.call("GET", "/v1/vms?all=true")["vms"]:
        cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    for s in cl.call("GET", "/v1/snapshots")["snapshots"]:
        if s["name"].startswith(PREFIX):
            cl.call("DELETE", f"/v1/snapshots/{s['name']}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (fewer samples, a shorter loop)")
    ap.add_argument("--loop", type=int, default=None, help="iterations of the compute loop (default 400000)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ "
                    "instead of the working tree (python.wasm is read from the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    if not PY_WASM.is_file():  # not measured = MISS (docs/benchmarks.md), not a failure of run_all --all
        c.emit(f"## bench_python: {PY_WASM} is missing (scripts/fetch-interpreters fetches it); nothing measured\n")
        t = c.Targets()
        for name in TARGETS:
            t.check(name, False, "not measured: python.wasm missing")
        c.emit(t.render())
        res = {"bench": "python", "targets": t.to_json(), "load_warning": ""}
        c.write_json(a.json, res)
        return res
    loop = a.loop or (30000 if a.quick else 400000)
    n_compute = 1 if a.quick else 7
    n_restored, n_cold = (5, 2) if a.quick else (40, 10)
    n_snap = 2 if a.quick else 8
    n_import = 1 if a.quick else 3
    state = state_dir()
    state.mkdir(parents=True, exist_ok=True)
    c.emit(f"## bench_python: CPython 3.12 WASI (python.wasm, {PY_WASM.stat().st_size / 1e6:.1f} MB); state dir "
           f"{state} (kept across runs)\n")
    watch = c.CpuWatch()
    data = PY_WASM.read_bytes()
    t = c.Targets()
    res: dict[str, Any] = {"bench": "python", "loop": loop}
    with c.Daemon(state_dir=state, import_images=False) as d:
        cl = c.UnixHttp(d.socket, timeout=900)
        cleanup(cl)
        # 4 first (it is also the set-up): the first import of this run, then n_import cache hits
        first_s, img = import_py(cl, "python", data)
        if not img.get("asyncify"):
            sys.exit(f"bench_python: python.wasm was not rewritten with Asyncify: {img}")
        hits = [import_py(cl, "python", data)[0] for _ in range(n_import)]
        plain_s, plain = import_py(cl, "python-plain", data, plain=True)
        res["import"] = {"first_s": first_s, "hits_s": hits, "plain_s": plain_s,
                         "digest": img["digest"], "plain_digest": plain["digest"]}

        # 1. compute: rewritten vs original, alternated
        spec = {"args": ["-c", workload(loop)], "start": True, "auto_remove": True}
        times: dict[str, list[float]] = {"python": [], "python-plain": []}
        walls: dict[str, list[float]] = {"python": [], "python-plain": []}
        cpus: dict[str, list[float]] = {"python": [], "python-plain": []}
        fuels: dict[str, list[int]] = {"python": [], "python-plain": []}
        for i in range(n_compute + 1):  # the first round warms up (compiled module cache, page cache)
            for img_name in (("python", "python-plain") if i % 2 == 0 else ("python-plain", "python")):
                cpu0 = c.cpu_seconds(d.pid)
                t0 = time.perf_counter()
                vm = cl.call("POST", "/v1/vms?wait=true", {"image": img_name, **spec})
                dt = time.perf_counter() - t0
                cpu = c.cpu_seconds(d.pid) - cpu0
                if vm["exit"]["code"] != 0:
                    raise RuntimeError(f"{img_name} compute run: {vm['exit']}")
                if i > 0:
                    times[img_name].append(dt)
                    walls[img_name].append(vm["exit"]["wall_time_s"])
                    cpus[img_name].append(cpu)
                    fuels[img_name].append(vm["exit"]["fuel_consumed"])
        comp_ratio = c.median(times["python"]) / c.median(times["python-plain"])
        cpu_ratio = c.median(cpus["python"]) / c.median(cpus["python-plain"])
        fuel_ratio = c.median(fuels["python"]) / c.median(fuels["python-plain"])
        res["compute"] = {"times_s": times, "wall_time_s": walls, "daemon_cpu_s": cpus, "fuel": fuels,
                          "ratio": comp_ratio, "cpu_ratio": cpu_ratio, "fuel_ratio": fuel_ratio}

        # 3. (set-up of 2) the REPL waiting for input, snapshotted; timings of snapshot and restore
        vm = cl.call("POST", "/v1/vms", {"image": "python", "name": PREFIX + "repl", "args": ["-u", "-c", REPL],
                                         "stdin": True, "start": True})
        wait_blocked(cl, vm["id"])
        snap_s, snaps = [], []
        for i in range(n_snap):
            t0 = time.perf_counter()
            s = cl.call("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": f"{PREFIX}idle-{i}"})
            snap_s.append(time.perf_counter() - t0)
            snaps.append(s)
        snap_dir = state / "snapshots"
        disk = du(snap_dir) if snap_dir.is_dir() else 0
        cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
        restore_s = []
        for _ in range(n_snap):
            t0 = time.perf_counter()
            r = cl.call("POST", f"/v1/snapshots/{PREFIX}idle-0/restore", {"start": False})
            restore_s.append(time.perf_counter() - t0)
            cl.call("DELETE", f"/v1/vms/{r['id']}?force=true")
        s0 = snaps[0]
        res["snapshot"] = {"snapshot_s": snap_s, "restore_s": restore_s, "summary": s0,
                           "snapshots_dir_bytes": disk}

        # 2. first answer: restored vs cold, interleaved
        restored: list[tuple[float, float]] = []
        cold: list[tuple[float, float]] = []

        def restore() -> str:
            return cl.call("POST", f"/v1/snapshots/{PREFIX}idle-0/restore", {"start": True})["id"]

        def create() -> str:
            return cl.call("POST", "/v1/vms", {"image": "python", "args": ["-u", "-c", REPL], "stdin": True,
                                               "start": True})["id"]

        first_answer(d.socket, cl, restore)  # warm-up
        every = max(1, n_restored // n_cold)
        for i in range(n_restored):
            restored.append(first_answer(d.socket, cl, restore)[:2])
            if i % every == 0 and len(cold) < n_cold:
                cold.append(first_answer(d.socket, cl, create)[:2])
        res["first_answer"] = {"restored": restored, "cold": cold}
        cleanup(cl)
        cl.close()

    # ---- report
    c.emit(c.table(["image", "runs (s, create to exit)", "median s", "guest wall_time_s median",
                    "daemon CPU s median", "fuel consumed median"],
                   [[n, " ".join(f"{x:.3f}" for x in times[n]), f"{c.median(times[n]):.3f}",
                     f"{c.median(walls[n]):.3f}", f"{c.median(cpus[n]):.3f}", f"{int(c.median(fuels[n])):,}"]
                    for n in times],
                   title=f"1. compute: pure-Python loop of {loop} iterations, run to exit, {n_compute} alternated "
                         "runs each"))
    c.emit(f"\nrewritten / original: {comp_ratio:.3f}x (wall, the target); daemon CPU time {cpu_ratio:.3f}x; "
           f"fuel (Wasm instructions, immune to contention) {fuel_ratio:.3f}x\n")

    r_tot = [x[0] for x in restored]
    r_api = [x[1] for x in restored]
    c_tot = [x[0] for x in cold]
    c_api = [x[1] for x in cold]
    fa_ratio = c.median(c_tot) / c.median(r_tot)
    c.emit(c.table(["path", "samples", "p50 to answer ms", "p90 to answer ms", "p50 of the API call ms",
                    "p50 answer after the API call ms"],
                   [["restore {start:true} + stdin line", len(r_tot), c.ms(c.median(r_tot)), c.ms(c.pct(r_tot, 90)),
                     c.ms(c.median(r_api)), c.ms(c.median([x - y for x, y in restored]))],
                    ["cold create {start:true} + stdin line", len(c_tot), c.ms(c.median(c_tot)),
                     c.ms(c.pct(c_tot, 90)), c.ms(c.median(c_api)), c.ms(c.median([x - y for x, y in cold]))]],
                   title="2. time to first answer of a CPython REPL (`print(json.dumps(1))` on stdin, `1` read "
                         "from logs?follow=true)"))
    c.emit(f"\ncold / restored: {fa_ratio:.1f}x\n")

    st = s0.get("stats", {})
    c.emit(c.table(["", "value"], [
        ["guest memory (memory_bytes)", f"{s0.get('memory_bytes', 0) / 2**20:.1f} MiB"],
        ["chunks", str(len(s0["chunks"]) if isinstance(s0.get("chunks"), list) else s0.get("chunks"))],
        ["new bytes written by the first snapshot (stats.new_bytes)", f"{st.get('new_bytes', 0) / 2**20:.2f} MiB"],
        [f"snapshots dir on disk after {n_snap} snapshots (du)", f"{disk / 2**20:.2f} MiB"],
        ["snapshot ms: first / median of the rest", f"{c.ms(snap_s[0])} / "
         f"{c.ms(c.median(snap_s[1:])) if len(snap_s) > 1 else '-'}"],
        ["frozen_ms / write_ms of the first (stats)", f"{st.get('frozen_ms')} / {st.get('write_ms')}"],
        ["restore {start:false} ms: median / max", f"{c.ms(c.median(restore_s))} / {c.ms(max(restore_s))}"],
    ], title="3. snapshot and restore of an idle CPython (the REPL waiting in fd_read)"))
    c.emit("")
    c.emit(c.table(["import", "seconds"], [
        ["first import in this run (the rewrite unless cached by an earlier run)", f"{first_s:.3f}"],
        ["second import (cache hit), each", " ".join(f"{x:.3f}" for x in hits)],
        ["original module (no_asyncify)", f"{plain_s:.3f}"],
    ], title="4. importing python.wasm"))
    c.emit("")
    res["load_warning"] = watch.emit()
    c.emit("")
    t.check(TARGETS[0], comp_ratio <= 1.25, f"{comp_ratio:.3f}x")
    t.check(TARGETS[1], c.median(r_tot) <= 0.005, c.ms(c.median(r_tot)) + " ms")
    t.check(TARGETS[2], fa_ratio >= 20, f"{fa_ratio:.1f}x")
    t.check(TARGETS[3], c.median(hits) <= 1.0, f"{c.median(hits):.3f} s")
    c.emit(t.render())
    res["targets"] = t.to_json()
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
