#!/usr/bin/env python3
"""A/B of the API run latency across revisions, in ONE run: one private daemon per revision, all alive at once,
measured in alternating blocks so that the machine's drift (20-40% within an hour on the 2-vCPU benchmark VM)
hits every revision alike. bench_run.py --ref measures one revision per process, minutes apart: differences
of a few tenths of a millisecond between two such runs are the machine, not the code.

Per revision: `POST /v1/vms?wait=true {"image": "hello", "start": true}` (timed) + DELETE, --runs per block,
--blocks blocks (the first is a warm-up, not counted), the order of the revisions reversed every other block.

  python bench/ab_run.py 2592fe0 HEAD          # p50 and p25 per revision, and each one's ratio to the first
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("refs", nargs="+", metavar="GIT-REV", help="revisions to compare (clean exports of microvmd/)")
    ap.add_argument("--blocks", type=int, default=12, help="blocks per revision, the first a warm-up (default 12)")
    ap.add_argument("--runs", type=int, default=60, help="runs per block (default 60)")
    a = ap.parse_args(argv)
    daemons: dict[str, c.Daemon] = {}
    times: dict[str, list[float]] = {r: [] for r in a.refs}
    try:
        for ref in a.refs:
            os.environ[c.REF_ENV] = subprocess.run(["git", "-C", str(c.ROOT), "rev-parse", "--verify",
                                                    f"{ref}^{{commit}}"], capture_output=True, text=True,
                                                   check=True).stdout.strip()
            daemons[ref] = c.Daemon().start()
        clients = {r: c.UnixHttp(daemons[r].socket) for r in a.refs}
        spec = b'{"image": "hello", "start": true}'
        for block in range(a.blocks):
            for ref in (a.refs if block % 2 == 0 else a.refs[::-1]):
                cl = clients[ref]
                for _ in range(a.runs):
                    t0 = time.perf_counter()
                    status, body = cl.raw("POST", "/v1/vms?wait=true", spec)
                    dt = time.perf_counter() - t0
                    if status != 201:
                        raise RuntimeError(f"{ref}: HTTP {status}: {body[:200]!r}")
                    cl.raw("DELETE", f"/v1/vms/{json.loads(body)['id']}?force=true")
                    if block > 0:
                        times[ref].append(dt)
    finally:
        for d in daemons.values():
            d.stop()
    base = c.median(times[a.refs[0]])
    rows = []
    for ref in a.refs:
        v = sorted(times[ref])
        rows.append([ref, str(len(v)), c.ms(c.median(v)), c.ms(v[len(v) // 4]), f"{c.median(v) / base:.3f}x"])
    c.emit(f"## ab_run: `POST /v1/vms?wait=true` hello + DELETE, {a.blocks - 1} alternating blocks of {a.runs} "
           f"runs per revision (one warm-up block not counted), all daemons alive at once\n")
    c.emit(c.table(["revision", "runs", "p50 ms", "p25 ms", f"p50 / {a.refs[0]}"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
