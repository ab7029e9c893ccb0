#!/usr/bin/env python3
"""What a guest console write costs in each `engine.console` mode, and what a VM directory costs to make.

In one process, with the daemon's engine configuration (microvmd.engine.wt.make_engine), a WAT guest makes
--writes calls of fd_write with 32 bytes to stdout, called synchronously:

  file   wasmtime writes the log file itself (WasiConfig.stdout_file), as engine.console = "file"
  hook   WasiConfig.stdout_custom with a Python callback appending to an open file, as console = "hook"
  none   the same guest making no writes (the run's fixed cost, subtracted)

Per write = (median run time - median "none" run time) / writes. Then, in the state directory's file
system (--dir, default $TMPDIR), the per-VM file-system work a create does or avoids:

  mkdir + create 2 logs        what a create paid before VM directories were made in advance
  open 2 existing logs O_TRUNC what wasmtime does with directories made in advance

No target of its own: it explains section 1 of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "0123456789abcdef0123456789abcde\\n")
  (func (export "_start") (local $i i32)
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 32))
    (block $done (loop $l
      (br_if $done (i32.ge_u (local.get $i) (i32.const WRITES)))
      (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $l)))))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writes", type=int, default=200, help="fd_write calls per run (default 200)")
    p.add_argument("--runs", type=int, default=50, help="runs per mode (default 50)")
    p.add_argument("--dir", default=None, help="where the files go (default $TMPDIR)")
    p.add_argument("--ref", metavar="GIT-REV", help="measure a clean export of this revision's microvmd/")
    p.add_argument("--quick", action="store_true", help="a short smoke run (run_all.py --quick)")
    a = p.parse_args(argv)
    if a.quick:
        a.runs, a.writes = 3, 20
    c.set_ref(a.ref)
    sys.path.insert(0, str(c.code_root()))
    import wasmtime

    from microvmd.engine import wt

    c.emit(f"# bench_console: {a.writes} writes of 32 bytes per run, {a.runs} runs per mode\n")
    c.emit(c.machine_table())
    root = Path(tempfile.mkdtemp(prefix="bench-console-", dir=a.dir))
    engine = wt.make_engine(wt.EngineOptions())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    modules = {n: wasmtime.Module(engine, WAT.replace("WRITES", str(n))) for n in (0, a.writes)}
    log = root / "stdout.log"

    def run(mode: str) -> float:
        store = wasmtime.Store(engine)
        store.set_fuel(1 << 62)
        store.set_epoch_deadline(1 << 40)  # the daemon's engine interrupts at epoch deadlines; none ticks here
        wasi = wasmtime.WasiConfig()
        fd = -1
        if mode == "file":
            wasi.stdout_file = str(log)
        elif mode == "hook":
            fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            wasi.stdout_custom = lambda data: None if os.write(fd, data) else None
        store.set_wasi(wasi)
        inst = linker.instantiate(store, modules[0 if mode == "none" else a.writes])
        start = inst.exports(store)["_start"]
        t0 = time.perf_counter()
        start(store)  # type: ignore[operator]
        dt = time.perf_counter() - t0
        if fd >= 0:
            os.close(fd)
        store.close()
        return dt

    med = {}
    for mode in ("none", "file", "hook"):
        for _ in range(5):
            run(mode)
        med[mode] = statistics.median(run(mode) for _ in range(a.runs))
    per = {m: (med[m] - med["none"]) / a.writes * 1e6 for m in ("file", "hook")}
    c.emit(c.table(["console mode", "median run ms", "per write µs"],
                   [["none (no writes)", f"{med['none'] * 1e3:.3f}", "–"],
                    ['file (wasmtime writes the log)', f"{med['file'] * 1e3:.3f}", f"{per['file']:.1f}"],
                    ['hook (custom-output callback)', f"{med['hook'] * 1e3:.3f}", f"{per['hook']:.1f}"]]))
    c.emit(f"\nhook / file per write: {per['hook'] / per['file']:.1f}x ({per['hook'] - per['file']:.1f} µs more)")

    made, reopen = [], []
    for _ in range(300):
        d = root / uuid.uuid4().hex
        t0 = time.perf_counter()
        d.mkdir()
        for s in ("stdout", "stderr"):
            os.close(os.open(d / f"{s}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640))
        made.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in ("stdout", "stderr"):
            os.close(os.open(d / f"{s}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640))
        reopen.append(time.perf_counter() - t0)
    c.emit("")
    c.emit(c.table([f"VM directory work on {c.fs_type(root)}", "median µs"],
                   [["mkdir + create 2 logs", f"{statistics.median(made) * 1e6:.1f}"],
                    ["open 2 existing logs with O_TRUNC", f"{statistics.median(reopen) * 1e6:.1f}"]]))
    c.emit(f"\nload average at end: {c.loadavg()}")
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
