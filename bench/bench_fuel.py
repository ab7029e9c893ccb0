#!/usr/bin/env python3
"""CPU cost of running a compute-bound guest in microvmd (fuel metering always on) vs raw wasmtime-py.

Every variant runs images/spin/spin.wasm with the same N (argv[1]) and must print the same checksum.

  wasmtime-py, no fuel      in this process, default Config (consume_fuel False): the baseline
  wasmtime-py, fuel         consume_fuel True, store fuel set to 2**62: the cost of metering alone
  wasmtime-py, fuel+epoch   the daemon's engine settings (consume_fuel, epoch_interruption, max_wasm_stack,
                            wasm_exceptions), a plain synchronous call with a far epoch deadline: the cost
                            of the daemon's generated code without its async calls and scheduler
  microvmd                  POST /v1/vms {"image": "spin", "args": [N], "start": true} + wait; no fuel
                            budget (the default), so the guest yields only at epoch ticks (10 ms)
  microvmd, fuel budget     the same with "fuel": 10**15, so the guest also yields every fuel_slice units

CPU time: for wasmtime-py, time.process_time() around instantiate + _start; for microvmd, the daemon
process's utime+stime (/proc/pid/stat, all threads) from before the create request until the wait answer.
Wall time for microvmd is the exit object's wall_time_s. Each figure is the median of --reps runs.

Target (foundation issue): microvmd CPU time <= 1.5x wasmtime-py without fuel.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402


def checksum(text: bytes) -> str:
    for line in text.decode(errors="replace").splitlines()[::-1]:
        if line.startswith("checksum "):
            return line.split()[1]
    return "?"


def make_engine(kind: str):  # noqa: ANN201
    import wasmtime

    cfg = wasmtime.Config()
    if kind in ("fuel", "fuel+epoch"):
        cfg.consume_fuel = True
    if kind == "fuel+epoch":
        cfg.epoch_interruption = True
        cfg.max_wasm_stack = 1 << 20
        cfg.cranelift_opt_level = "speed"
        cfg.wasm_exceptions = True
    return wasmtime.Engine(cfg)


def run_raw(kind: str, n: int, reps: int) -> tuple[list[float], list[float], str]:
    import wasmtime

    engine = make_engine(kind)
    module = wasmtime.Module.from_file(engine, str(c.images_dir() / "spin" / "spin.wasm"))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fuel-"))
    cpu: list[float] = []
    wall: list[float] = []
    sums = set()
    for _ in range(reps):
        out = tmp / "stdout.log"
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["spin", str(n)]
        wasi.stdout_file = str(out)
        store.set_wasi(wasi)
        if kind != "nofuel":
            store.set_fuel(1 << 62)
        if kind == "fuel+epoch":
            store.set_epoch_deadline(1 << 62)
        c0, w0 = time.process_time(), time.perf_counter()
        inst = linker.instantiate(store, module)
        try:
            inst.exports(store)["_start"](store)  # type: ignore[operator]
        except wasmtime.ExitTrap as e:
            if e.code != 0:
                raise
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        sums.add(checksum(out.read_bytes()))
        del inst, store
    shutil.rmtree(tmp, ignore_errors=True)
    return cpu, wall, ",".join(sorted(sums))


def run_daemon(d: c.Daemon, n: int, reps: int, fuel: int | None) -> tuple[list[float], list[float], str, int]:
    cl = d.client()
    cpu: list[float] = []
    wall: list[float] = []
    sums = set()
    fuel_used = 0
    spec = {"image": "spin", "args": [str(n)], "start": True}
    if fuel is not None:
        spec["fuel"] = fuel
    try:
        for _ in range(reps):
            time.sleep(0.2)  # let the daemon settle (the previous VM's teardown)
            c0 = c.cpu_seconds(d.pid)
            vm = cl.call("POST", "/v1/vms", spec)
            ex = cl.call("POST", f"/v1/vms/{vm['id']}/wait")
            cpu.append(c.cpu_seconds(d.pid) - c0)
            if ex.get("reason") != "exit" or ex.get("code") != 0:
                raise RuntimeError(f"spin did not exit 0 in microvmd: {json.dumps(ex)}")
            wall.append(float(ex["wall_time_s"]))
            fuel_used = int(ex["fuel_consumed"])
            st, logs = cl.raw("GET", f"/v1/vms/{vm['id']}/logs?stream=stdout")
            sums.add(checksum(logs))
            cl.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    finally:
        cl.close()
    return cpu, wall, ",".join(sorted(sums)), fuel_used


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (N=20M, 2 runs each)")
    ap.add_argument("-n", type=int, default=None, help="spin iterations (default 500000000)")
    ap.add_argument("--reps", type=int, default=None, help="runs per variant (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    n = a.n or (20_000_000 if a.quick else 500_000_000)
    reps = a.reps or (2 if a.quick else 5)

    c.emit(f"## bench_fuel: spin {n:,} iterations, median of {reps} runs\n")
    watch = c.CpuWatch()
    results: dict[str, tuple[list[float], list[float], str]] = {}
    for kind in ("nofuel", "fuel", "fuel+epoch"):
        results[kind] = run_raw(kind, n, reps)
    with c.Daemon() as d:
        cpu, wall, cs, fuel_used = run_daemon(d, n, reps, None)
        results["microvmd"] = (cpu, wall, cs)
        cpu, wall, cs, _ = run_daemon(d, n, reps, 10**15)
        results["microvmd+budget"] = (cpu, wall, cs)
    base = c.median(results["nofuel"][0])
    names = {
        "nofuel": "wasmtime-py, no fuel (consume_fuel False)",
        "fuel": "wasmtime-py, fuel (consume_fuel True)",
        "fuel+epoch": "wasmtime-py, daemon's Config (fuel+epoch), sync call",
        "microvmd": "microvmd (API create+start+wait, no budget)",
        "microvmd+budget": "microvmd with fuel budget 10^15 (fuel yields)",
    }
    rows = []
    for k, (cpu, wall, cs) in results.items():
        cm = c.median(cpu)
        rows.append([names[k], f"{cm:.3f}", f"{c.median(wall):.3f}", f"{cm / n * 1e9:.2f}", c.ratio(cm, base), cs])
    c.emit(c.table(["variant", "CPU s", "wall s", "CPU ns/iter", "CPU vs no fuel", "checksum"], rows))
    c.emit(f"\nfuel consumed by one microvmd run: {fuel_used:,} ({fuel_used / n:.2f} per iteration)")
    sums = {r[5] for r in rows}
    if len(sums) != 1:
        c.emit(f"WARNING: checksums differ between variants: {sums}")
    warning = watch.emit()
    c.emit("")
    t = c.Targets()
    r = c.median(results["microvmd"][0]) / base
    t.check("microvmd CPU <= 1.5x wasmtime-py without fuel", r <= 1.5 and len(sums) == 1,
            f"{r:.2f}x (metering alone: {c.median(results['fuel'][0]) / base:.2f}x, "
            f"daemon Config sync: {c.median(results['fuel+epoch'][0]) / base:.2f}x)")
    c.emit(t.render())
    res = {"bench": "fuel", "n": n, "reps": reps, "rows": rows, "targets": t.to_json(), "load_warning": warning}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
