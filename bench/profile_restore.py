#!/usr/bin/env python3
"""Where the restore of an idle CPython REPL (bench_python's snapshot) spends its time: cProfile of the real
restore path (snapshot controller -> Hypervisor.restore -> Builder.restore -> Machine) run in-process, with the
scheduler's I/O hand-offs run inline so that one profile sees the whole path (py-spy is not needed).

Set-up: a daemon on bench_python's kept state dir ($MICROVMD_BENCH_PYTHON_STATE, default
$TMPDIR/microvmd-bench-python/state, which holds the rewritten python image: run bench_python.py once first)
makes the snapshot `bench-py-profile` of the REPL waiting in fd_read and stops. Then the restores are
profiled in this process against the same state dir.

  python bench/profile_restore.py [--restores 30] [--top 25]
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import bench_python as bp  # noqa: E402

SNAP = "bench-py-profile"


def make_snapshot(state: Path) -> None:
    with c.Daemon(state_dir=state, import_images=False) as d:
        cl = c.UnixHttp(d.socket, timeout=900)
        try:
            cl.call("GET", "/v1/images/python")
        except c.HttpError:
            sys.exit("profile_restore: no python image in the state dir: run bench/bench_python.py first")
        for s in cl.call("GET", "/v1/snapshots")["snapshots"]:
            if s["name"] == SNAP:
                cl.call("DELETE", f"/v1/snapshots/{SNAP}")
        vm = cl.call("POST", "/v1/vms", {"image": "python", "args": ["-u", "-c", bp.REPL], "stdin": True,
                                         "start": True})
        bp.wait_blocked(cl, vm["id"])
        cl.call("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": SNAP})
        cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")


async def profile(state: Path, restores: int) -> tuple[cProfile.Profile, list[float]]:
    from microvmd import config, daemon
    from microvmd.devices import install_devices
    from microvmd.snapshot.controller import Snapshots
    from microvmd.vmm.manager import Hypervisor

    sock = Path(tempfile.mkdtemp(prefix="mvd-prof-")) / "s.sock"
    cfg = config.load(daemon.parse_args(["--state-dir", str(state), "--socket", str(sock)]))
    hv = Hypervisor(cfg)
    install_devices(hv)

    async def inline(fn: Any, *args: Any) -> Any:  # one thread: the profile sees the work of the I/O threads
        return fn(*args)

    hv.sched.on_io = inline  # type: ignore[method-assign]
    await hv.load()
    snaps = Snapshots(hv)
    await snaps.startup()
    prof = cProfile.Profile()
    times = []
    for i in range(restores + 1):  # the first warms the compiled-module cache
        t0 = time.perf_counter()
        if i:
            prof.enable()
        vm = await snaps.restore(SNAP, None, start=False)
        if i:
            prof.disable()
            times.append(time.perf_counter() - t0)
        await hv.remove(vm, force=True)
    return prof, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restores", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    state = bp.state_dir()
    make_snapshot(state)
    prof, times = asyncio.run(profile(state, a.restores))
    times.sort()
    print(f"{len(times)} restores of {SNAP} (start=false), in-process: median {times[len(times) // 2] * 1e3:.2f} ms, "
          f"min {times[0] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms")
    for key in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(a.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
