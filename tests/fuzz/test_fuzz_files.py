"""Hostile files through the real daemon (issue 13 item 9): random valid modules from ``wasm-tools smith``
are imported and run as VMs with small fuel, time and memory, and each ends with a recorded reason; mutated
module binaries and mutated snapshot exports get a 4xx. The daemon serves on after all of them."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fuzzhelp import FUZZ_EXAMPLES, SEEDS, SLOW_EXAMPLES, mutated
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mvapi import IMAGES, Daemon

WASM_TOOLS = Path(sys.executable).with_name("wasm-tools")
# the exports every generated module has: a command's entry point
START = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0\x03\x02\x01\0\x07\x0a\x01\x06_start\0\0\x0a\x04\x01\x02\0\x0b"
# features this daemon's engine has not turned on, and sizes a VM here cannot have
SMITH_ARGS = ["--max-imports", "0", "--gc-enabled", "false", "--memory64-enabled", "false",
              "--custom-page-sizes-enabled", "false", "--threads-enabled", "false",
              "--max-memory32-bytes", str(8 << 20), "--max-funcs", "200"]
ENDINGS = {"exit", "trap", "out_of_fuel", "timeout", "stack_overflow"}


def fuzzing(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def smith(seed: bytes, tmp: Path) -> bytes | None:
    """A valid module generated from ``seed`` (None when wasm-smith cannot use this seed, its status 2)."""
    exports = tmp / "start.wasm"
    if not exports.exists():
        exports.write_bytes(START)
    out = subprocess.run([str(WASM_TOOLS), "smith", "--exports", str(exports), *SMITH_ARGS],
                         input=seed, capture_output=True, timeout=60, check=False)
    if out.returncode == 2:
        return None
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def _run_smith(d: Daemon, seed: bytes, tmp: Path, seen: dict[str, int]) -> None:
    module = smith(seed, tmp)
    if module is None:
        return
    r = d.api("POST", "/v1/images", raw=module, headers={"Content-Type": "application/wasm"}, timeout=120)
    assert r.status in (200, 201, 400, 413, 422), (r.status, r.text)
    if r.status >= 400:
        seen["refused"] = seen.get("refused", 0) + 1
        return
    digest = r.json()["digest"]
    r = d.api("POST", "/v1/vms", {"image": digest, "fuel": 1_000_000, "memory": 16 << 20, "timeout": 5,
                                  "start": True, "auto_remove": False})
    assert r.status in (201, 422), (r.status, r.text)  # 422: its memory or tables do not fit the limits
    if r.status == 422:
        seen["not_created"] = seen.get("not_created", 0) + 1
        return
    vm = r.json()
    end = d.api.wait(vm["id"], timeout=60)
    reason = str(end["reason"]).split(":")[0]  # ("trap: wasm `unreachable` instruction executed")
    assert reason in ENDINGS, end
    seen[reason] = seen.get(reason, 0) + 1
    assert d.api("DELETE", f"/v1/vms/{vm['id']}?force=true").status == 204
    d.api("DELETE", f"/v1/images/{digest}")


def _smith_run(d: Daemon, tmp: Path, examples: int) -> dict[str, int]:
    seen: dict[str, int] = {}

    @fuzzing(examples)
    @given(st.binary(min_size=32, max_size=2048))
    def run(seed: bytes) -> None:
        _run_smith(d, seed, tmp, seen)

    run()
    assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    assert d.api("GET", "/v1/info").status == 200
    return seen


def test_random_valid_modules_run_and_end_with_a_reason(fuzz_daemon: Daemon, tmp_path: Path) -> None:
    seen = _smith_run(fuzz_daemon, tmp_path, max(5, FUZZ_EXAMPLES // 2))
    assert sum(n for k, n in seen.items() if k in ENDINGS) >= 1, seen  # some ran (not all refused)


@pytest.mark.slow
def test_random_valid_modules_run_and_end_with_a_reason_long(fuzz_daemon: Daemon, tmp_path: Path) -> None:
    _smith_run(fuzz_daemon, tmp_path, SLOW_EXAMPLES)


def _mutated_modules(d: Daemon, examples: int) -> None:
    @fuzzing(examples)
    @given(mutated(SEEDS))
    def run(data: bytes) -> None:
        r = d.api("POST", "/v1/images?asyncify=false&name=fuzzed", raw=data,
                  headers={"Content-Type": "application/wasm"}, timeout=120)
        assert r.status < 500, (r.status, r.text)
        if r.status < 300:  # (by its name: a mutation may give back a seed, whose own name stays)
            d.api("DELETE", "/v1/images/fuzzed")

    run()
    assert d.api("GET", "/v1/info").status == 200


def test_mutated_modules_get_a_4xx_or_import(fuzz_daemon: Daemon) -> None:
    _mutated_modules(fuzz_daemon, FUZZ_EXAMPLES)


@pytest.fixture(scope="module")
def export(fuzz_daemon: Daemon) -> bytes:
    """A real snapshot export (a counter VM, stopped mid-run) to mutate."""
    d = fuzz_daemon
    # (again: a fuzzed system prune may have removed it)
    d.mv("image", "import", str(IMAGES / "counter" / "counter.wasm"), "--name", "counter")
    vm = d.api.create("counter", start=True, env={"INTERVAL_MS": "20"}, timeout=600)
    d.api.wait_state(vm["id"], "running")
    d.api.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "fuzz-seed"})
    r = d.api("GET", "/v1/snapshots/fuzz-seed/export")
    assert r.status == 200, r.text
    d.api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")
    d.api.ok("DELETE", "/v1/snapshots/fuzz-seed")
    return r.body


def _mutated_exports(d: Daemon, seed: bytes, examples: int) -> None:
    @fuzzing(examples)
    @given(mutated([seed]))
    def run(data: bytes) -> None:
        r = d.api("POST", "/v1/snapshots/import?name=fuzzed", raw=data,
                  headers={"Content-Type": "application/octet-stream"}, timeout=120)
        assert r.status < 500, (r.status, r.text)
        if r.status < 300:
            d.api("DELETE", "/v1/snapshots/fuzzed")

    run()
    assert d.api("GET", "/v1/info").status == 200


def test_mutated_snapshot_exports_are_refused(fuzz_daemon: Daemon, export: Any) -> None:
    _mutated_exports(fuzz_daemon, export, FUZZ_EXAMPLES)


@pytest.mark.slow
def test_mutated_files_long(fuzz_daemon: Daemon, export: Any) -> None:
    _mutated_modules(fuzz_daemon, SLOW_EXAMPLES)
    _mutated_exports(fuzz_daemon, export, SLOW_EXAMPLES)
