#!/usr/bin/env python3
"""Soak: minutes of churn (create, run, snapshot, restore, rm) against one private daemon, with the
daemon's RSS, open descriptors and state-directory size sampled every second; the least-squares slope of
each (per minute) says whether anything leaks.

Each churn round: run hello to its end (wait=true), start a counter, snapshot it, restore the snapshot as a
second VM, remove both VMs and the snapshot. Nothing is kept, so every slope should be about zero.

  python bench/bench_soak.py [--minutes 10] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, v), per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 60 * sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (20 s)")
    ap.add_argument("--json", help="also write the samples and slopes to this file")
    a = ap.parse_args()
    seconds = 20.0 if a.quick else a.minutes * 60
    d = c.Daemon().start()
    samples: dict[str, list[tuple[float, float]]] = {"rss_mib": [], "fds": [], "state_mib": []}
    rounds = 0
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(1.0):
            t = time.monotonic() - t0
            samples["rss_mib"].append((t, c.rss_bytes(d.pid) / (1 << 20)))
            samples["fds"].append((t, c.fd_count(d.pid)))
            samples["state_mib"].append((t, dir_size(d.state) / (1 << 20)))

    th = threading.Thread(target=sample, daemon=True)
    try:
        cl = d.client()
        th.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rounds += 1
            h = cl.call("POST", "/v1/vms?wait=true", {"image": "hello", "start": True})
            v = cl.call("POST", "/v1/vms", {"image": "counter", "start": True, "env": {"INTERVAL_MS": "5"}})
            cl.call("POST", f"/v1/vms/{v['id']}/snapshots", {"name": f"soak{rounds}"})
            r = cl.call("POST", f"/v1/snapshots/soak{rounds}/restore", {"start": True})
            for vm in (h, v, r):
                cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
            cl.call("DELETE", f"/v1/snapshots/soak{rounds}")
        stop.set()
        th.join()
        cl.close()
    finally:
        stop.set()
        d.stop()
    c.emit(f"# bench_soak: {seconds / 60:g} min of churn, {rounds} rounds "
           f"({rounds / seconds:.1f}/s: hello run, counter + snapshot + restore, 3 rm, snapshot rm)")
    rows = []
    for key, unit in (("rss_mib", "MiB"), ("fds", "descriptors"), ("state_mib", "MiB")):
        pts = samples[key]
        if not pts:
            continue
        first, last = pts[0][1], pts[-1][1]
        settled = [p for p in pts if p[0] >= 60] if seconds >= 120 else pts
        rows.append([key, f"{first:.1f}", f"{last:.1f}", f"{max(v for _, v in pts):.1f}",
                     f"{slope(pts):+.3f} {unit}/min", f"{slope(settled):+.3f} {unit}/min"])
    # the first minute holds start-up's high-water mark and the first malloc_trim (microvmd/heaptrim.py):
    # the slope after it is the one that says whether something grows
    c.emit(c.table(["sampled each second", "first", "last", "max", "slope", "slope after 1 min"], rows))
    c.write_json(a.json, {"seconds": seconds, "rounds": rounds, "slopes": {k: slope(v) for k, v in samples.items()},
                          "samples": samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
