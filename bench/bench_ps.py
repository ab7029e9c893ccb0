#!/usr/bin/env python3
"""Latency of `microvm ps` (a fresh client process) vs bare Python start-up.

  python -c pass                        the interpreter's own start-up (the floor for any Python CLI)
  python -c "import microvmd.cli.main"  start-up plus the client's entry module
  microvm ps                            the console script against a private daemon (a few VMs live),
                                        everything included: start-up, imports, one API call, output

Each is run as a subprocess with the venv's interpreter, --warmup times unmeasured, then --n times;
the figure is the median wall time. Python's bytecode cache is on, as by default (kept in a private
PYTHONPYCACHEPREFIX directory; PYTHONDONTWRITEBYTECODE is removed from the environment). A diagnostic
row shows `microvm ps` with PYTHONDONTWRITEBYTECODE=1, where the client's modules are compiled from
source at every start (sandboxes and some CI set that variable).
Target (foundation issue): `microvm ps` median <= 50 ms.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def timeit(cmd: list[str], n: int, warmup: int, expect: bytes | None = None, cache: bool = True) -> list[float]:
    env = c.client_env(cache)
    out: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env, cwd=c.code_root())
        t1 = time.perf_counter()
        if p.returncode != 0 or (expect is not None and expect not in p.stdout):
            raise RuntimeError(f"{cmd} failed ({p.returncode}): {p.stdout[:200]!r} {p.stderr[:300]!r}")
        if i >= warmup:
            out.append(t1 - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (5 runs each)")
    ap.add_argument("-n", type=int, default=None, help="measured runs per command (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured runs first (default 3)")
    ap.add_argument("--vms", type=int, default=5, help="live VMs listed by ps (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    n = a.n or (5 if a.quick else 30)

    c.emit(f"## bench_ps: `microvm ps` latency, median of {n} runs ({a.warmup} warm-up)\n")
    watch = c.CpuWatch()
    py = c.PY
    base = timeit([py, "-c", "pass"], n, a.warmup)
    imp = timeit([py, "-c", "import microvmd.cli.main"], n, a.warmup)
    with c.Daemon() as d:
        cl = d.client()
        for _ in range(a.vms):
            cl.call("POST", "/v1/vms", {"image": "counter", "env": {"INTERVAL_MS": "86400000"}, "start": True})
        cl.close()
        ps_cmd = [str(c.BIN_DIR / "microvm"), "--socket", str(d.socket), "ps"]
        ps = timeit(ps_cmd, n, a.warmup, b"counter")
        ps_nc = timeit(ps_cmd, n, a.warmup, b"counter", cache=False)
    ref = c.median(base)
    rows = []
    for name, xs in (("python -c pass", base), ('python -c "import microvmd.cli.main"', imp),
                     (f"microvm ps ({a.vms} live VMs)", ps),
                     ("diagnostic: microvm ps with PYTHONDONTWRITEBYTECODE=1 (no bytecode cache for microvmd)",
                      ps_nc)):
        rows.append([name, str(len(xs)), c.ms(c.median(xs)), c.ms(min(xs)), c.ms(c.pct(xs, 90)),
                     c.ratio(c.median(xs), ref), c.ms(c.median(xs) - ref)])
    c.emit(c.table(["command", "n", "median ms", "min ms", "p90 ms", "vs python -c pass",
                    "above python -c pass ms"], rows))
    warning = watch.emit()
    c.emit("")
    t = c.Targets()
    m = c.median(ps)
    t.check("`microvm ps` median <= 50 ms", m <= 0.050, f"{c.ms(m)} ms")
    c.emit("")
    c.emit(t.render())
    res = {"bench": "ps", "rows": rows, "targets": t.to_json(), "load_warning": warning}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
