#!/usr/bin/env python3
"""VMs that outlive the daemon: suspend-all and resume-all times, and what checkpointing costs a guest.

suspend/resume   N idle counter VMs (INTERVAL_MS=1000, --restart always) on a private daemon; SIGTERM, then
                 the same state directory started again. Reported: SIGTERM to the daemon's exit, and its own
                 "suspended N of N VMs in X ms" line; start (process spawn) to every VM answering running over
                 the API, and the daemon's "resumed ..., the last X ms after start-up began" line.
checkpoints      a memtouch VM (MB=64, DIRTY_PCT=10, INTERVAL_MS=10: it rewrites 10% of its pages every
                 10 ms) runs for --seconds with and without --checkpoint-interval 500ms; the guest's
                 progress is its count of `dirtied` lines. The cost is the progress it loses.

  python bench/bench_outlive.py [--vms 100] [--seconds 10] [--quick]
"""
from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def suspend_resume(n: int) -> list[list[str]]:
    d = c.Daemon(keep=True, log_level="info").start()
    try:
        cl = d.client()
        for i in range(n):
            cl.call("POST", "/v1/vms", {"image": "counter", "name": f"v{i}", "start": True, "restart": "always",
                                        "env": {"INTERVAL_MS": "1000"}})
        time.sleep(1.5)
        cl.close()
        assert d.proc is not None
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(120)
        down = (time.monotonic() - t0) * 1000
        log = d.log_path.read_text()
        m = re.search(r"suspended (\d+) of (\d+) VMs in ([0-9.]+) ms", log)
        t1 = time.monotonic()
        d.start()
        cl = d.client()
        while True:
            vms = cl.call("GET", "/v1/vms")["vms"]
            if sum(1 for v in vms if v["state"] == "running") >= n:
                break
            if time.monotonic() - t1 > 120:
                raise RuntimeError("VMs did not come back")
            time.sleep(0.01)
        up = (time.monotonic() - t1) * 1000
        log = d.log_path.read_text()
        r = re.search(r"resumed (\d+) of (\d+) suspended or checkpointed VMs, the last ([0-9.]+) ms", log)
        cl.close()
    finally:
        d.keep = False
        d.stop()
    return [[f"suspend {n} idle VMs (SIGTERM to exit)", f"{down:.0f}",
             f"daemon: {m.group(1)} of {m.group(2)} suspended in {float(m.group(3)):.0f} ms" if m else "-"],
            [f"resume {n} VMs (spawn to all running)", f"{up:.0f}",
             f"daemon: {r.group(1)} resumed, the last {float(r.group(3)):.0f} ms after start-up began" if r else "-"]]


def progress(cl: c.UnixHttp, name: str, seconds: float, interval: float | None) -> tuple[int, int]:
    spec = {"image": "memtouch", "name": name, "start": True,
            "env": {"MB": "64", "DIRTY_PCT": "10", "INTERVAL_MS": "10", "SEED": name}}
    if interval is not None:
        spec["checkpoint_interval"] = interval
    vm = cl.call("POST", "/v1/vms", spec)
    end = time.monotonic() + 60
    while b"ready 64" not in cl.raw("GET", f"/v1/vms/{vm['id']}/logs?stream=stdout")[1]:
        if time.monotonic() > end:
            raise RuntimeError("memtouch not ready")
        time.sleep(0.05)
    before = cl.raw("GET", f"/v1/vms/{vm['id']}/logs?stream=stdout")[1].count(b"dirtied")
    time.sleep(seconds)
    after = cl.raw("GET", f"/v1/vms/{vm['id']}/logs?stream=stdout")[1].count(b"dirtied")
    cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    return after - before, 0


def checkpoints(seconds: float) -> list[list[str]]:
    d = c.Daemon().start()
    try:
        cl = d.client()
        plain, _ = progress(cl, "plain", seconds, None)
        ckpt, _ = progress(cl, "ckpt", seconds, 0.5)
        cl.close()
    finally:
        d.stop()
    loss = (1 - ckpt / plain) * 100 if plain else float("nan")
    return [[f"memtouch 64 MiB, 10% dirtied every 10 ms, {seconds:g} s", f"{plain} rounds", "no checkpoints"],
            ["the same, --checkpoint-interval 500ms", f"{ckpt} rounds", f"{loss:.1f}% of the guest's progress lost"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (5 VMs, 2 s)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    if a.quick:
        a.vms, a.seconds = 5, 2.0
    c.emit(f"# bench_outlive: {a.vms} idle VMs suspended and resumed; checkpoint cost over {a.seconds:g} s")
    rows = suspend_resume(a.vms) + checkpoints(a.seconds)
    c.emit(c.table(["what", "ms / progress", "detail"], rows))
    c.write_json(a.json, {"vms": a.vms, "seconds": a.seconds, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
