#!/usr/bin/env python3
"""Density: daemon memory and threads per live VM at 1,000 and 10,000 VMs in one microvmd.

Guests (--guest):
  counter (default)  images/counter/counter.wasm with INTERVAL_MS=86400000: it prints `1` and then sleeps in
                     `mv_sleep_ms` for a day, i.e. it is instantiated, its linear memory is allocated, and its
                     guest call is suspended in a host function (no thread held). Expected state:
                     running / blocked_in sleep_ms.
  echo               images/echo/echo.wasm with no published port: it listens on guest port 8000 and blocks in
                     `mv_poll` on its listening socket, i.e. waiting to accept a connection (the socket device's
                     net_poll). Expected state: running / blocked_in net_poll.
VMs are created with `start: true` through the API from `--concurrency` keep-alive connections at once.

At each level the benchmark waits until every VM reports the expected blocked_in, then reads from /proc:
  VmRSS (/proc/pid/status), Threads, the number of /proc/pid/maps lines (vs vm.max_map_count), open fds
  (vs the daemon's RLIMIT_NOFILE) and, from /proc/pid/smaps, the resident size of the guests' linear
  memories (each copy-on-write initialised memory starts with a `/memfd:wasm-memory-image` mapping,
  followed by its anonymous read-write pages, followed by its PROT_NONE reservation) and of wasmtime's
  async fiber stacks (2 MiB read-write mappings behind a 4 KiB guard page).
It also sums `memory_bytes` of `GET /v1/vms` (the size of each linear memory, not what is touched), and a
sampler thread reads the daemon's thread count every 100 ms from the start, so the highest count seen at
any time (creation bursts included) is reported beside the count once all VMs are blocked.

Metric: (RSS delta - resident linear memory delta) / VMs, the daemon's memory per VM beyond its guest's
linear memory.
Targets:
  foundation issue (counter): 10,000 live VMs in one daemon, <= 64 KiB per VM beyond linear memory.
  snapshot issue (echo): 10,000 VMs blocked in recv or accept with at most 64 daemon threads (judged on the
  highest thread count seen during the whole run, not only at rest).
For the other guest the figures are printed without a verdict.

The baseline is read after one warm-up VM was created, blocked and removed. The daemon runs with
RLIMIT_NOFILE as the shipped unit sets it (LimitNOFILE=1048576) unless --nofile says otherwise
(`--nofile inherit` keeps this shell's limit).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

KiB = 1024
GUESTS: dict[str, dict[str, Any]] = {
    "counter": {"spec": {"image": "counter", "env": {"INTERVAL_MS": "86400000"}, "start": True},
                "blocked": "sleep_ms", "what": "counter guest blocked in sleep_ms"},
    "echo": {"spec": {"image": "echo", "start": True}, "blocked": "net_poll",
             "what": "echo guest, no published port, blocked in net_poll on its listening socket (accept)"},
}


class ThreadSampler:
    """Reads the daemon's thread count every ``interval`` seconds in the background; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.max = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max = max(self.max, c.threads(self.pid))
                self.samples += 1
            except (OSError, KeyError, ValueError):
                return
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def smaps_breakdown(pid: int) -> dict[str, int]:
    """Resident bytes of linear memories and fiber stacks, from /proc/pid/smaps."""
    vmas: list[list[Any]] = []  # [start, end, perms, name, rss]
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split()
                a, b = first.split("-")
                vmas.append([int(a, 16), int(b, 16), parts[1], parts[5] if len(parts) > 5 else "", 0])
            elif first == "Rss:":
                vmas[-1][4] = int(line.split()[1]) * KiB
    lin_rss = lin_n = fib_rss = fib_n = 0
    for i, (start, end, perms, name, rss) in enumerate(vmas):
        if name == "/memfd:wasm-memory-image":
            lin_n += 1
            lin_rss += rss
            j, prev_end = i + 1, end
            while j < len(vmas) and vmas[j][0] == prev_end and vmas[j][2].startswith("rw") and not vmas[j][3]:
                lin_rss += vmas[j][4]
                prev_end = vmas[j][1]
                j += 1
        elif (perms == "rw-p" and not name and end - start == 2 << 20 and i > 0
              and vmas[i - 1][1] == start and vmas[i - 1][2] == "---p"
              and vmas[i - 1][1] - vmas[i - 1][0] == 4096):
            fib_n += 1
            fib_rss += rss
    return {"linear_rss": lin_rss, "linear_n": lin_n, "fiber_rss": fib_rss, "fiber_n": fib_n,
            "vmas": len(vmas)}


def snapshot(pid: int) -> dict[str, int]:
    s = {"rss": c.rss_bytes(pid), "threads": c.threads(pid), "maps": c.map_count(pid), "fds": c.fd_count(pid)}
    s.update(smaps_breakdown(pid))
    return s


async def create_many(sock: Path, count: int, concurrency: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Create ``count`` VMs; stop at the first failure and report it exactly."""
    made = 0
    failure: dict[str, Any] | None = None
    issued = 0
    lock = asyncio.Lock()

    async def worker() -> None:
        nonlocal made, failure, issued
        try:
            cl = await c.AsyncUnixHttp.connect(sock)
        except OSError as exc:
            failure = failure or {"at": made, "error": f"connect: {exc}"}
            return
        try:
            while True:
                async with lock:
                    if failure is not None or issued >= count:
                        return
                    issued += 1
                try:
                    await cl.call("POST", "/v1/vms", spec)
                    made += 1
                except Exception as exc:  # noqa: BLE001 - report whatever it was, verbatim
                    if failure is None:
                        failure = {"at": made, "error": f"{type(exc).__name__}: {exc}"}
                    return
        finally:
            await cl.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"made": made, "seconds": time.perf_counter() - t0, "failure": failure}


def wait_blocked(cl: c.UnixHttp, expect: int, timeout: float, blocked: str) -> dict[str, Any]:
    """Poll GET /v1/vms (on a connection opened before the VMs: a daemon out of fds cannot accept)."""
    end = time.monotonic() + timeout
    while True:
        vms = cl.call("GET", "/v1/vms")["vms"]
        states = collections.Counter(f"{v['state']}/{v['blocked_in']}" for v in vms)
        if states.get(f"running/{blocked}", 0) >= expect or time.monotonic() > end:
            return {"states": dict(states), "memory_bytes": sum(v["memory_bytes"] for v in vms),
                    "live": len(vms)}
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (100 and 500 VMs)")
    ap.add_argument("--guest", choices=sorted(GUESTS), default="counter",
                    help="counter (default: blocked in sleep_ms) or echo (blocked in net_poll/accept)")
    ap.add_argument("--counts", default=None, help="VM counts to measure at, ascending (default 1000,10000)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent keep-alive connections (16)")
    ap.add_argument("--nofile", default="unit",
                    help="daemon RLIMIT_NOFILE: 'unit' (1048576, as systemd/microvmd.service), "
                         "'inherit' (this shell's), or a number")
    ap.add_argument("--max-threads", type=int, default=64,
                    help="thread target of the snapshot issue for --guest echo (default 64)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    counts = [int(x) for x in (a.counts or ("100,500" if a.quick else "1000,10000")).split(",")]
    target_n = 10_000
    g = GUESTS[a.guest]
    spec, blocked_in = g["spec"], g["blocked"]
    want_state = f"running/{blocked_in}"

    c.emit(f"## bench_density --guest {a.guest}: live VMs in one daemon ({g['what']}; "
           f"{a.concurrency} concurrent connections)\n")
    watch = c.CpuWatch()
    d = c.Daemon(nofile=a.nofile).start()
    sampler = ThreadSampler(d.pid)
    rows: list[list[str]] = []
    levels: list[dict[str, Any]] = []
    failure: dict[str, Any] | None = None
    max_map = int(Path("/proc/sys/vm/max_map_count").read_text())
    base: dict[str, int] = {}
    try:
        mon = d.client()
        vm = mon.call("POST", "/v1/vms", spec)
        wait_blocked(mon, 1, timeout=30, blocked=blocked_in)
        mon.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
        time.sleep(0.5)
        base = snapshot(d.pid)
        c.emit(f"baseline: RSS {base['rss'] / 2**20:.1f} MiB, {base['threads']} threads, {base['maps']} maps, "
               f"{base['fds']} fds; daemon RLIMIT_NOFILE {d.nofile_note}; vm.max_map_count {max_map}")
        have = 0
        for n in counts:
            peak_before = sampler.max
            res = asyncio.run(create_many(d.socket, n - have, a.concurrency, spec))
            have += res["made"]
            rate = res["made"] / res["seconds"] if res["seconds"] else 0.0
            c.emit(f"created {res['made']} VMs in {res['seconds']:.1f} s ({rate:.0f} VMs/s), {have} live; "
                   f"most daemon threads seen so far: {sampler.max} (before this level: {peak_before})")
            if res["failure"]:
                failure = {**res["failure"], "level": n, "live_before": have - res["made"],
                           "at_vm": have + 1, "daemon_alive": d.proc is not None and d.proc.poll() is None}
                c.emit(f"FAILED: a create request failed after {have} VMs were created (on the way to {n}): "
                       f"{res['failure']['error']}")
                c.emit("daemon log tail:\n" + d.log_tail(10))
            if have == 0 or d.proc is None or d.proc.poll() is not None:
                break
            st = wait_blocked(mon, have, timeout=120, blocked=blocked_in)
            time.sleep(1.0)
            s = snapshot(d.pid)
            drss = s["rss"] - base["rss"]
            dlin = s["linear_rss"] - base["linear_rss"]
            per_vm = (drss - dlin) / have
            levels.append({"vms": have, "create_s": res["seconds"], "rate": rate, **s, "states": st["states"],
                           "memory_bytes": st["memory_bytes"], "per_vm_beyond_linear": per_vm,
                           "threads_max_so_far": sampler.max})
            rows.append([
                str(have), f"{rate:.0f}", f"{s['rss'] / 2**20:.1f}", f"{drss / have / KiB:.1f}",
                f"{st['memory_bytes'] / have / KiB:.0f}", f"{dlin / have / KiB:.1f}",
                f"{(s['fiber_rss'] - base['fiber_rss']) / have / KiB:.1f} ({s['fiber_n']})",
                f"**{per_vm / KiB:.1f}**", f"{s['threads']} / {sampler.max}", f"{s['maps']} / {max_map}",
                f"{s['fds']}", ", ".join(f"{k}: {v}" for k, v in sorted(st["states"].items())),
            ])
            if failure:
                break
    finally:
        sampler.stop()
        t_stop = time.monotonic()
        d.stop(timeout=120)
        stop_s = time.monotonic() - t_stop

    have_total = levels[-1]["vms"] if levels else 0
    c.emit("")
    c.emit(c.table(["live VMs", "create VMs/s", "daemon RSS MiB", "RSS delta/VM KiB",
                    "linear memory size/VM KiB", "linear memory resident/VM KiB",
                    "fiber stacks resident/VM KiB (n)", "beyond linear memory/VM KiB",
                    "threads at rest / most seen", "maps / max_map_count", "fds", "VM states"], rows))
    c.emit(f"\ndaemon stop (SIGTERM to exit) with {have_total} live VMs: {stop_s:.1f} s; "
           f"daemon RLIMIT_NOFILE {d.nofile_note}; daemon thread count sampled {sampler.samples} times "
           f"(every 100 ms), highest {sampler.max}")
    if failure:
        c.emit(f"FAILURE: the first failed create request came after {failure['live_before'] + failure['at']} "
               f"VMs were created ({have_total} live in the end): {failure['error']}")
    warning = watch.emit()
    c.emit("")
    t = c.Targets()
    top = levels[-1] if levels else None
    reached = top["vms"] if top else 0
    blocked = top["states"].get(want_state, 0) if top else 0
    fail_note = f"; failed: {failure['error']}" if failure else ""
    if a.guest == "counter":
        t.check(f"{target_n:,} live VMs in one daemon", reached >= target_n and blocked >= target_n and not failure,
                f"{reached} created, {blocked} live and blocked in {blocked_in}{fail_note}")
        if top:
            t.check("<= 64 KiB daemon memory per VM beyond linear memory"
                    + ("" if reached >= target_n else f" (measured at {reached} VMs only)"),
                    top["per_vm_beyond_linear"] <= 64 * KiB and reached >= target_n,
                    f"{top['per_vm_beyond_linear'] / KiB:.1f} KiB/VM at {reached} VMs")
        else:
            t.check("<= 64 KiB daemon memory per VM beyond linear memory", False, "no VM could be created")
    else:
        t.check(f"{target_n:,} VMs blocked in recv or accept", reached >= target_n and blocked >= target_n
                and not failure, f"{reached} created, {blocked} live and blocked in {blocked_in} "
                f"(echo waiting to accept){fail_note}")
        if top:
            t.check(f"... with <= {a.max_threads} daemon threads"
                    + ("" if reached >= target_n else f" (measured at {reached} VMs only)"),
                    sampler.max <= a.max_threads and top["threads"] <= a.max_threads and reached >= target_n,
                    f"{top['threads']} threads with {reached} VMs blocked, at most {sampler.max} seen during "
                    f"the run")
        else:
            t.check(f"... with <= {a.max_threads} daemon threads", False, "no VM could be created")
    c.emit(t.render())
    res = {"bench": "density", "guest": a.guest, "rows": rows, "levels": levels, "failure": failure,
           "targets": t.to_json(), "load_warning": warning, "stop_seconds": stop_s, "nofile": d.nofile_note,
           "base": base if levels else None, "threads_max": sampler.max}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
