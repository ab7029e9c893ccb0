#!/usr/bin/env python3
"""Where one `hello` run spends its time inside the controller (no HTTP): microvmd.vmm.manager.Hypervisor driven
in a fresh process, `create(spec, start=True)` + `wait` + `remove` (what POST /v1/vms?wait=true does), with
functions wrapped at run time to time each phase (microvmd's code is not changed). Median over --n runs.

Phases: the event loop's part of create up to the vCPU hand-off; the hand-off itself (run_in_executor until the
worker runs); instantiation and the first slice on the vCPU worker; the record write on the persist thread
(concurrent with the build); the return to the loop; wait; remove.

--no-record replaces the create record's write with a no-op (a diagnostic: it shows what the write costs the
run, and that the VM directory the console then creates itself moves the cost rather than removes it).

  python bench/profile_run_phases.py [--tmpfs] [--no-record] [--ref GIT-REV]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

CHILD = r'''
import asyncio, functools, json, shutil, statistics, sys, tempfile, time
from microvmd.config import load
from microvmd.daemon import parse_args
from microvmd.devices import install_devices
from microvmd.vmm import builder, machine, registry, scheduler
from microvmd.vmm.manager import Hypervisor
from microvmd.vmm.vm import VmSpec

base, n, warm, wasm = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
no_record = sys.argv[5] == "1"
tmp = tempfile.mkdtemp(prefix="bench-phases-", dir=base)
cfg = load(parse_args(["--socket", tmp + "/s.sock", "--state-dir", tmp + "/state", "--log-level", "warning"]))
acc, T = {}, {}

def rec(k, v):
    acc.setdefault(k, []).append(v)

def wrap(obj, attr, name):
    f = getattr(obj, attr)
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            rec(name, time.perf_counter() - t)
    setattr(obj, attr, w)

if no_record:
    registry._write_records = lambda batch: None
else:
    wrap(registry, "_write_records", "record write (persist thread, concurrent)")
wrap(machine.Machine, "__init__", "instantiate (Machine.__init__, vCPU worker)")
wrap(machine.Machine, "run_slice", "first slice: the guest runs (Machine.run_slice, vCPU worker)")
_sub = scheduler.Scheduler.submit_cpu  # where a started create hands its build and first slice to a worker
def sub(self, fn, *a):
    rec("create on the loop, up to the vCPU hand-off", time.perf_counter() - T["t0"])
    T["ocp"] = time.perf_counter()
    return _sub(self, fn, *a)
scheduler.Scheduler.submit_cpu = sub
_bar = builder.Builder.boot_and_run
def bar(self, vm, img, run_slice):
    rec("hand-off: queued until the vCPU worker runs", time.perf_counter() - T["ocp"])
    try:
        return _bar(self, vm, img, run_slice)
    finally:
        T["end"] = time.perf_counter()
builder.Builder.boot_and_run = bar

async def main():
    hv = Hypervisor(cfg)
    install_devices(hv)
    # (a --ref revision older than the VM runtime object loads on an I/O thread)
    await (hv.load() if asyncio.iscoroutinefunction(hv.load) else hv.sched.on_io(hv.load))
    with open(wasm, "rb") as f:
        await hv.import_image(f.read(), "hello")
    for i in range(warm + n):
        if i == warm:
            acc.clear()
        T["t0"] = time.perf_counter()
        vm = await hv.create(VmSpec(image="hello"), start=True)
        t1 = time.perf_counter()
        ex = await hv.wait(vm)
        t2 = time.perf_counter()
        if ex.get("reason") != "exit" or ex.get("code") != 0:
            raise SystemExit(f"hello did not exit 0: {ex}")
        await hv.remove(vm, force=True)
        t3 = time.perf_counter()
        rec("vCPU task done -> create returns on the loop", t1 - T["end"])
        rec("wait", t2 - t1)
        rec("TOTAL create(start=True) + wait", t2 - T["t0"])
        rec("remove (not in the run)", t3 - t2)
    await hv.shutdown()
    print(json.dumps({k: statistics.median(v) for k, v in acc.items()}))

import uvloop
uvloop.run(main())
shutil.rmtree(tmp, ignore_errors=True)
'''


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1500, help="measured runs (default 1500, after 300 warm-up)")
    ap.add_argument("--tmpfs", action="store_true", help="state dir on /dev/shm instead of $TMPDIR")
    ap.add_argument("--no-record", action="store_true", help="skip the create record's write (diagnostic)")
    ap.add_argument("--ref", metavar="GIT-REV", help="a clean export of this revision's microvmd/")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    base = "/dev/shm" if a.tmpfs else ""
    cmd = [c.PY, "-c", CHILD, base, str(a.n), "300", str(c.images_dir() / "hello" / "hello.wasm"),
           "1" if a.no_record else "0"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=c.code_env(), cwd=c.code_root(), timeout=900)
    if p.returncode != 0:
        print(p.stderr, file=sys.stderr)
        return 1
    res = json.loads(p.stdout.strip().splitlines()[-1])
    where = c.fs_type(base or __import__("tempfile").gettempdir())
    c.emit(f"## hello: create(start=True) + wait in-process, median of {a.n} runs; state dir on {where}"
           f"{'; record write skipped' if a.no_record else ''}\n")
    c.emit(c.table(["phase", "median ms"], [[k, c.ms(v)] for k, v in res.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
