#!/usr/bin/env python3
"""Run every microvmd benchmark, each in its own process with its own private daemon, and summarise.

  python bench/run_all.py            the foundation benchmarks, full (about 2 minutes on 2 CPUs): run, density,
                                     fuel, ps
  python bench/run_all.py --quick    a short smoke run of each (well under a minute)
  python bench/run_all.py --all      also every other bench/bench_*.py except the soak (density with the echo
                                     guest, disk, net, snapshot, coldstart, hostcall, ephemeral, durable,
                                     outlive, python, ...): about 10 minutes; docs/benchmarks.md
  python bench/run_all.py --only soak   the 10-minute soak (bench_soak.py)

Each bench/bench_*.py also runs on its own (see its --help). The exit status is 0 when every benchmark
ran, whatever its PASS/MISS verdicts (--strict: 1 when any target is missed as well), 2 when one failed
to run.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_run", "bench_density", "bench_fuel", "bench_ps"]  # the foundation issue's targets
# runs of a script with other arguments, each a benchmark of its own: name -> (script, arguments)
VARIANTS = {"bench_density_echo": ("bench_density", ["--guest", "echo"])}  # the snapshot issue's thread target
SOAKS = ["bench_soak"]  # minutes long: run on its own, or with --only soak
OTHERS = sorted([p.stem for p in HERE.glob("bench_*.py") if p.stem not in BENCHES + SOAKS] + list(VARIANTS))


def script_of(name: str) -> tuple[str, list[str]]:
    return VARIANTS.get(name, (name, []))


def accepts_json(name: str) -> bool:
    return "--json" in (HERE / f"{script_of(name)[0]}.py").read_text(errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run of every benchmark")
    ap.add_argument("--all", action="store_true", help="also run the other bench/bench_*.py: "
                    + ", ".join(b.removeprefix("bench_") for b in OTHERS))
    ap.add_argument("--only", action="append",
                    choices=[b.removeprefix("bench_") for b in BENCHES + OTHERS + SOAKS],
                    help="run only this benchmark (repeatable)")
    ap.add_argument("--json", metavar="FILE", help="write all results and the machine description as JSON")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    ap.add_argument("--ref", metavar="GIT-REV",
                    help="benchmark a clean export (git archive) of this revision's microvmd/ and images/ "
                         "instead of the working tree, e.g. HEAD when others have uncommitted edits")
    a = ap.parse_args(argv)
    c.set_ref(a.ref)
    pool = BENCHES + OTHERS + (SOAKS if a.only else []) if (a.all or a.only) else BENCHES
    names = [b for b in pool if not a.only or b.removeprefix("bench_") in a.only]

    c.emit("# microvmd benchmarks" + (" (--quick smoke run: figures are not meaningful)" if a.quick else ""))
    c.emit("")
    info = c.machine_info()
    c.emit(c.table(["machine", ""], list(info.items())))
    _, note = c.wasmtime_cli()
    c.emit(f"\nwasmtime CLI binary: {note}\n")
    results: dict[str, dict] = {}
    failed: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-results-"))
    for name in names:
        out = tmp / f"{name}.json"
        script, extra = script_of(name)
        cmd = [sys.executable, str(HERE / f"{script}.py"), *extra] \
            + (["--json", str(out)] if accepts_json(name) else []) + (["--quick"] if a.quick else [])
        c.emit(f"$ {' '.join(['python', f'bench/{script}.py', *extra] + (['--quick'] if a.quick else []))}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd)
        c.emit(f"({name}: {time.monotonic() - t0:.0f} s, exit {rc})\n")
        if rc != 0:
            failed.append(name)
            continue
        results[name] = json.loads(out.read_text()) if out.exists() else {"targets": []}

    c.emit("## Summary\n")
    rows = []
    for name in names:
        if name in failed:
            rows.append([name, "ERROR", "the benchmark did not complete (see its output above)"])
            continue
        targets = results[name].get("targets") or []
        if not targets:
            rows.append([name, "ran", "no PASS/MISS verdicts reported (see its output above)"])
        for t in targets:
            ok = t.get("pass", t.get("ok"))
            verdict = "info" if ok is None else "PASS" if ok else "MISS"  # None: a figure without a threshold
            rows.append([name, verdict, f"{t.get('target')}: {t.get('measured')}"])
    c.emit(c.table(["benchmark", "verdict", "target: measured"], rows))
    shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": info, "quick": a.quick, "results": results,
                                            "errors": failed}, indent=2, default=str) + "\n")
    if failed:
        return 2
    if a.strict and any(t.get("pass", t.get("ok")) is False for r in results.values() for t in r.get("targets") or []):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
