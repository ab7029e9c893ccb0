#!/usr/bin/env python3
"""Functions through the HTTP gateway: a fresh micro-VM per request, against an aiohttp hello-world.

Measured side by side in one run, on loopback, with wrk (Debian `wrk`, installed by scripts/setup-deps):
  peer       an aiohttp + uvloop hello-world server (one process), GET /hello answering "hello x"
  microvmd   the WAGI sample function (images/wagi) deployed at /hello: every request is a fresh instance (a
             direct instance on a vCPU worker, docs/functions.md; a VM only when it must)
  microvmd sdk  the SDK sample function (images/fnsdk): every request is a fresh instance resumed from its
             snapshot (a direct instance as well)
Blocks alternate (--blocks of each, --seconds each, wrk -t2 -c16); the figure is the median block rate.
Then, at half of microvmd's measured rate, an open-loop client (requests sent on a fixed schedule, latency
counted from the scheduled time; uvloop, its collector off while it runs) gives the p99. The daemon reports
the time to a fresh instance itself (`fn inspect`: stats.restore_us and fresh_instance_us, the last 1,000
requests; stats.direct and direct_to_vm say how many requests were direct instances).
With the CPython image (scripts/fetch-interpreters; its Asyncify rewrite is kept in --python-state, the
same directory bench_python uses), a Python function restored per request is compared with starting CPython
per request (an ephemeral VM running the same handler with `python -c`).
Targets (functions issue): C function >= 50% of the aiohttp hello-world's requests per second; p99 <= 5 ms at
half the maximum rate; fresh instance <= 100 us p50; Python per request p50 <= 10 ms and >= 10x faster than
starting CPython per request.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

PEER = r'''
import sys
import uvloop
from aiohttp import web

async def hello(request):
    return web.Response(text="hello " + request.query.get("name", "world") + "\n")

app = web.Application()
app.router.add_get("/hello", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=uvloop.new_event_loop())
'''
PY_HANDLER = (Path(__file__).resolve().parents[1] / "images" / "functions" / "counter.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def wrk(url: str, seconds: float, conns: int = 16, threads: int = 2) -> tuple[float, int]:
    """(requests per second, non-2xx/3xx answers) of one wrk run."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", url], capture_output=True,
                         text=True, timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk said:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return float(m.group(1)), int(bad.group(1)) if bad else 0


async def open_loop(port: int, path: str, rate: float, seconds: float, conns: int = 32) -> tuple[list[float], int]:
    """Requests on a fixed schedule (``rate`` per second) over keep-alive connections; each latency counts from
    its scheduled time (a late send is latency too). Returns (latencies, failed answers)."""
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(conns):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    lat: list[float] = []
    failed = 0

    async def one(due: float) -> None:
        nonlocal failed
        r, w = await idle.get()
        try:
            w.write(req)
            head = await r.readuntil(b"\r\n\r\n")
            n = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))  # type: ignore[union-attr]
            await r.readexactly(n)
            if not head.startswith(b"HTTP/1.1 200"):
                failed += 1
            lat.append(time.perf_counter() - due)
        finally:
            idle.put_nowait((r, w))

    t0 = time.perf_counter()
    tasks = []
    i = 0
    while (due := t0 + i / rate) < t0 + seconds:
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
        i += 1
    await asyncio.gather(*tasks)
    while not idle.empty():
        idle.get_nowait()[1].close()
    return lat, failed


def measure_open_loop(port: int, path: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """``open_loop`` as a lean client: on uvloop, with the collector off while it runs (its own pauses, tens of
    milliseconds with a request task per scheduled send, were part of the tail it measured)."""
    import uvloop

    gc.collect()
    gc.disable()
    try:
        return uvloop.run(open_loop(port, path, rate, seconds))  # type: ignore[no-any-return]
    finally:
        gc.enable()


def ready(cl: Any, name: str, timeout: float = 60.0) -> None:
    """Until the function's direct instances are made (in the background after its deploy)."""
    end = time.monotonic() + timeout
    while (state := cl.call("GET", f"/v1/functions/{name}")["stats"].get("direct_state", "ready")) != "ready":
        if state == "off" or time.monotonic() > end:
            raise RuntimeError(f"function {name}: no direct instances ({state}; see the daemon's log)")
        time.sleep(0.02)


def gateway_get(port: int, path: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def python_part(a: argparse.Namespace, t: c.Targets) -> dict:
    wasm = c.images_dir() / "python" / "python.wasm"
    if not wasm.is_file():
        c.emit("\nPython: images/python/python.wasm is missing (scripts/fetch-interpreters): not measured")
        t.check("Python function per request p50 <= 10 ms", False, "not measured (no CPython image)")
        t.check("Python per request >= 10x faster than starting CPython per request", False, "not measured")
        return {}
    gport = free_port()
    Path(a.python_state).mkdir(parents=True, exist_ok=True)
    with c.Daemon(state_dir=a.python_state, import_images=False, gateway=f"127.0.0.1:{gport}") as d:
        cl = c.UnixHttp(d.socket, timeout=1200.0)  # a first deploy imports and rewrites CPython (minutes)
        source = PY_HANDLER.read_text()
        t0 = time.perf_counter()
        cl.call("POST", "/v1/functions", {"name": "pybench", "python": source, "route": "/py"})
        deploy_s = time.perf_counter() - t0
        n = 10 if a.quick else 40
        warm = []
        for i in range(n + 3):
            t1 = time.perf_counter()
            status, body = gateway_get(gport, f"/py?name={i}")
            if status != 200 or b'"count": 1' not in body:
                raise RuntimeError(f"python function answered {status} {body[:200]!r}")
            if i >= 3:
                warm.append(time.perf_counter() - t1)
        inside = cl.call("GET", "/v1/functions/pybench")["stats"]["fresh_instance_us"]
        # the cold peer: the same handler, CPython started for the one request
        cold_prog = source + "\nprint(handle({'method': 'GET', 'path': '/py', 'query': 'name=x', 'headers': {}, " \
                             "'body': '', 'body_bytes': b''}))\n"
        cold = []
        for _ in range(3 if a.quick else 6):
            t1 = time.perf_counter()
            vm = cl.call("POST", "/v1/vms?wait=true", {"image": "python", "args": ["-c", cold_prog], "start": True,
                                                         "ephemeral": True})
            if vm["exit"]["code"] != 0:
                raise RuntimeError(f"cold CPython exited {vm['exit']}")
            cold.append(time.perf_counter() - t1)
        cl.call("DELETE", "/v1/functions/pybench")
    p50, cold50 = c.median(warm), c.median(cold)
    c.emit("")
    c.emit(c.table(["Python handler (images/functions/counter.py)", "p50 ms", "p99 ms", "runs"], [
        ["microvmd: restored from the function's snapshot, per request", c.ms(p50), c.ms(c.pct(warm, 99)),
         str(len(warm))],
        ["peer: CPython started per request (ephemeral VM, python -c)", c.ms(cold50), c.ms(c.pct(cold, 99)),
         str(len(cold))],
    ]))
    c.emit(f"deploy (interpreter cached): {deploy_s:.2f} s; fresh instance inside the daemon: {inside}")
    t.check("Python function per request p50 <= 10 ms", p50 <= 0.010, c.ms(p50) + " ms")
    t.check("Python per request >= 10x faster than starting CPython per request", cold50 / p50 >= 10,
            f"{cold50 / p50:.1f}x ({c.ms(cold50)} vs {c.ms(p50)} ms)")
    return {"python_p50": p50, "cold_p50": cold50, "instance_us": inside}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (1 block of 2 s per side)")
    ap.add_argument("--blocks", type=int, default=None, help="blocks per side (default 3)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per block (default 5)")
    ap.add_argument("--no-python", action="store_true", help="skip the Python part")
    ap.add_argument("--python-state", default="/tmp/microvmd-bench-functions-python",
                    help="state directory kept between runs for the CPython image (its rewrite takes minutes)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    if shutil.which("wrk") is None:
        raise SystemExit("bench_functions: wrk is missing: run scripts/setup-deps (Debian package wrk)")
    blocks = a.blocks or (1 if a.quick else 3)
    seconds = a.seconds or (2.0 if a.quick else 5.0)
    c.emit(f"## bench_functions: requests per second through the gateway, wrk -t2 -c16, {blocks} alternating "
           f"blocks of {seconds:g} s per side\n")
    watch = c.CpuWatch()
    t = c.Targets()
    pport, gport = free_port(), free_port()
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(pport)], env=c.code_env())
    rates: dict[str, list[float]] = {"aiohttp": [], "microvmd": [], "microvmd sdk": []}
    try:
        wait_port(pport)
        with c.Daemon(gateway=f"127.0.0.1:{gport}") as d:
            cl = d.client()
            cl.call("POST", "/v1/functions", {"name": "hello", "image": "wagi", "route": "/hello"})
            cl.call("POST", "/v1/functions", {"name": "hellosdk", "image": "fnsdk", "executor": "sdk",
                                              "route": "/sdk"})
            for name in ("hello", "hellosdk"):
                ready(cl, name)
            urls = {"aiohttp": f"http://127.0.0.1:{pport}/hello?name=x",
                    "microvmd": f"http://127.0.0.1:{gport}/hello?name=x",
                    "microvmd sdk": f"http://127.0.0.1:{gport}/sdk?name=x"}
            for u in urls.values():
                wrk(u, 1)  # warm-up (compiled code, pools)
            bad = 0
            order = list(urls)
            for i in range(blocks):
                for side in (order if i % 2 == 0 else order[::-1]):
                    rate, nbad = wrk(urls[side], seconds)
                    rates[side].append(rate)
                    bad += nbad if side != "aiohttp" else 0
            peak = c.median(rates["microvmd"])
            lat, failed = measure_open_loop(gport, "/hello?name=x", peak / 2, seconds * (0.5 if a.quick else 1))
            hello_stats = cl.call("GET", "/v1/functions/hello")["stats"]
            runner = hello_stats.get("direct_runner", "python")  # (older daemons: Python on the vCPU workers)
            inside = hello_stats["fresh_instance_us"]
            # the snapshot function, not saturated: what a restore costs, and what a request waits for one
            cl.call("POST", "/v1/functions", {"name": "seqsdk", "image": "fnsdk", "executor": "sdk", "route": "/seq"})
            ready(cl, "seqsdk")
            for _ in range(200):
                gateway_get(gport, "/seq?name=y")
            sdk_stats = cl.call("GET", "/v1/functions/seqsdk")["stats"]
    finally:
        peer.terminate()
        peer.wait(10)
    rows = [[side, " ".join(f"{r:.0f}" for r in rates[side]), f"{c.median(rates[side]):.0f}"] for side in rates]
    c.emit(c.table(["server", "requests/s per block", "median requests/s"], rows))
    best = max(("microvmd", "microvmd sdk"), key=lambda k: c.median(rates[k]))
    share = c.median(rates[best]) / max(1.0, c.median(rates["aiohttp"]))
    c.emit(f"\n{best} / aiohttp hello-world: {share:.2f}x (wrk counted {bad} non-2xx answers from microvmd)")
    p99 = c.pct(lat, 99)
    c.emit(f"open loop at {peak / 2:.0f} requests/s for {len(lat)} requests: p50 {c.ms(c.median(lat))} ms, "
           f"p99 {c.ms(p99)} ms, {failed} failed")
    c.emit(f"WAGI, inside the daemon, a fresh instance made (store, WASI, instance) under the open loop: {inside}; "
           f"direct instances {hello_stats.get('direct', '-')}, went on as VMs {hello_stats.get('direct_to_vm', '-')}; "
           f"direct instances run {'natively' if runner == 'native' else 'in Python (no native build)'}")
    restore = sdk_stats["restore_us"]
    c.emit(f"SDK function (images/fnsdk), 200 sequential requests: a fresh instance resumed from its snapshot "
           f"(store, WASI, instance, snapshot memory and globals) {restore}; direct instances "
           f"{sdk_stats.get('direct', '-')}, went on as VMs {sdk_stats.get('direct_to_vm', '-')}")
    t.check("C function, fresh VM per request >= 50% of aiohttp hello-world req/s", share >= 0.5 and bad == 0,
            f"{share:.2f}x ({best}: {c.median(rates[best]):.0f} vs {c.median(rates['aiohttp']):.0f})")
    t.check("p99 <= 5 ms at half the maximum rate", p99 <= 0.005 and failed == 0, f"{c.ms(p99)} ms")
    p50_us = restore["p50"] if restore else float("inf")
    t.check("fresh instance from the snapshot <= 100 us p50 (the restore itself, inside the daemon)", p50_us <= 100,
            f"{p50_us:.0f} us")
    py = {} if a.no_python else python_part(a, t)
    warning = watch.emit()
    c.emit("")
    c.emit(t.render())
    res = {"bench": "functions", "rows": rows, "share": share, "p99": p99, "instance_us": inside, "python": py,
           "targets": t.to_json(), "load_warning": warning}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
