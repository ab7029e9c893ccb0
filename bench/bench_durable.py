#!/usr/bin/env python3
"""The cost of durability: a snapshot (pack + manifest, fsynced with their directories) acknowledged
only once it is on stable storage, against the same snapshot with ``?durable=false``; and the same for a
VM's record (create) and an image import.

A private daemon (bench/_common.Daemon) runs memtouch VMs (MB=N, each with its own SEED so nothing is
deduplicated); each repetition takes a full snapshot of a fresh VM, alternately durable and not, and
reports the client round trip and the server's stats.sync_ms (pack + manifest publishing, fsyncs included).
The difference of the medians is the fsync cost per snapshot. Figures depend on the file system and the
disk under the state directory (printed).

  python bench/bench_durable.py [--mb 64] [--runs 10] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def wait_ready(cl: c.UnixHttp, vid: str, mb: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = cl.raw("GET", f"/v1/vms/{vid}/logs?stream=stdout")[1]
        if f"ready {mb}\n".encode() in out and cl.call("GET", f"/v1/vms/{vid}").get("blocked_in"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"memtouch {vid} not ready")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="MiB of touched guest memory (default 64)")
    ap.add_argument("--runs", type=int, default=10, help="snapshots of each kind (default 10)")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (2 runs of 8 MiB)")
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if a.quick:
        a.mb, a.runs = 8, 2
    d = c.Daemon().start()
    try:
        cl = d.client()
        c.emit(f"# bench_durable: memtouch MB={a.mb}, {a.runs} snapshots durable and {a.runs} with durable=false")
        c.emit(f"state dir on {c.fs_type(d.state)}")
        res: dict[str, dict[str, list[float]]] = {k: {"rtt": [], "sync": []} for k in ("durable", "not")}
        for i in range(2 * a.runs):
            kind = "durable" if i % 2 == 0 else "not"
            vm = cl.call("POST", "/v1/vms", {"image": "memtouch", "name": f"d{i}", "start": True,
                                             "env": {"MB": str(a.mb), "SEED": str(1000 + i)}})
            wait_ready(cl, vm["id"], a.mb)
            q = "" if kind == "durable" else "?durable=false"
            t0 = time.perf_counter()
            snap = cl.call("POST", f"/v1/vms/{vm['id']}/snapshots{q}", {"name": f"s{i}"})
            res[kind]["rtt"].append((time.perf_counter() - t0) * 1000)
            res[kind]["sync"].append(float(snap["stats"].get("sync_ms") or 0.0))
            cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
            cl.call("DELETE", f"/v1/snapshots/s{i}")
        creates: dict[str, list[float]] = {"durable": [], "not": []}
        for i in range(4 * a.runs):
            kind = "durable" if i % 2 == 0 else "not"
            q = "" if kind == "durable" else "?durable=false"
            t0 = time.perf_counter()
            vm = cl.call("POST", f"/v1/vms{q}", {"image": "counter", "name": f"c{i}"})
            creates[kind].append((time.perf_counter() - t0) * 1000)
            cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
        rows = []
        for kind, label in (("durable", "snapshot, durable (default)"), ("not", "snapshot, durable=false")):
            rows.append([label, f"{statistics.median(res[kind]['rtt']):.1f}", f"{min(res[kind]['rtt']):.1f}",
                         f"{statistics.median(res[kind]['sync']):.1f}"])
        for kind, label in (("durable", "create VM, durable (default)"), ("not", "create VM, durable=false")):
            rows.append([label, f"{statistics.median(creates[kind]):.2f}", f"{min(creates[kind]):.2f}", "-"])
        c.emit(c.table(["operation", "median ms", "min ms", "publish+fsync ms (server)"], rows))
        cost = statistics.median(res["durable"]["rtt"]) - statistics.median(res["not"]["rtt"])
        c.emit(f"fsync cost per {a.mb} MiB snapshot: {cost:.1f} ms (difference of the medians); "
               f"per VM record: {statistics.median(creates['durable']) - statistics.median(creates['not']):.2f} ms")
        c.write_json(a.json, {"mb": a.mb, "snapshot": res, "create": creates, "fsync_cost_ms": cost})
        cl.close()
    finally:
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
