"""The fetched interpreters (scripts/fetch-interpreters: images/js/js.wasm, images/python/python.wasm) as
sessions that outlive their daemon: a line sets a variable, the guest is snapshotted (or migrated) while it
waits for its next line on stdin, and on another daemon the next line still sees the variable.

Real daemons, real wasm-opt, real wasmtime. Skipped when the interpreters were not fetched. The Asyncify
rewrite of an interpreter takes minutes (QuickJS ~1.5 min, CPython ~3 min on 2 cores), so the daemons start
with a rewrite cache kept across test runs (``$MICROVMD_TEST_REWRITES``, default
``~/.cache/microvmd/test-rewrites``), exactly as one host's daemon keeps its own: the first run on a machine
pays the rewrite, the others do not. The rewrite itself is covered by test_anyguest.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mvapi import IMAGES, REPO
from snaphelp import Daemon

JS_WASM = IMAGES / "js" / "js.wasm"
PYTHON_WASM = IMAGES / "python" / "python.wasm"
# each line of stdin is run in the global scope (its `let` and `var` stay for the next line); output is
# flushed per line, as stdout is a file here, not a terminal
JS_PROG = "let l; while ((l = std.in.getline()) !== null) { std.evalScript(l); std.out.flush(); }"
PY_PROG = "import sys\nfor line in sys.stdin: exec(line)"

pytestmark = pytest.mark.skipif(shutil.which("wasm-opt") is None, reason="Binaryen's wasm-opt is not installed")


def _cache_dir() -> Path:
    env = os.environ.get("MICROVMD_TEST_REWRITES")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "microvmd" / \
        "test-rewrites"


@pytest.fixture
def cached_daemons(make_daemon) -> Iterator[tuple[Daemon, Daemon]]:  # type: ignore[no-untyped-def]
    """Two daemons whose state dirs start with the kept rewrites; what they rewrote is kept afterwards."""
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    states = []
    for name in ("a", "b"):
        state = make_daemon.root / f"{name}-state"
        (state / "images" / "rewrites").mkdir(parents=True)
        for f in cache.glob("*.wasm"):
            shutil.copy(f, state / "images" / "rewrites" / f.name)
        states.append(state)
    a = make_daemon("a", images=(), state_dir=states[0])
    b = make_daemon("b", images=(), state_dir=states[1])
    yield a, b
    for f in (states[0] / "images" / "rewrites").glob("*.wasm"):
        if not (cache / f.name).exists():
            tmp = cache / f".{f.name}.tmp"
            shutil.copy(f, tmp)
            tmp.replace(cache / f.name)


class Stdin:
    """`microvm attach VM` with its stdin held open: lines go to the guest as they are written, and the
    guest's input stays open (not at end of file) until ``close``."""

    def __init__(self, d: Daemon, vm: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "microvmd.cli.main", "--socket", str(d.socket),
                                      "attach", vm], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=REPO)

    def line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_output(d: Daemon, vm: str, text: str, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while True:
        out = d.logs(vm, "all")
        if text in out:
            return out
        if time.monotonic() > end:
            raise AssertionError(f"{vm}: no {text!r} in {timeout} s: {out[-500:]!r}")
        time.sleep(0.05)


def _import(d: Daemon, path: Path, name: str) -> None:
    r = d.cli("image", "import", str(path), "--name", name, timeout=1200)
    assert r.returncode == 0, r.stderr
    assert d.ok("GET", f"/v1/images/{name}")["snapshot_kind"] == "asyncify"


def _session(d: Daemon, image: str, args: list[str], first: str, ready: str) -> Stdin:
    """A VM of ``image`` with its stdin open, given its first line; returns once it printed ``ready`` and
    waits in fd_read for the next line."""
    d.ok("POST", "/v1/vms", {"image": image, "name": "s1", "args": args, "stdin": True, "start": True})
    stdin = Stdin(d, "s1")
    stdin.line(first)
    _wait_output(d, "s1", ready)
    d.wait_blocked("s1", "fd_read", timeout=60)
    return stdin


@pytest.mark.skipif(not JS_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_quickjs_session_snapshotted_while_it_waits_for_input_continues_on_another_daemon(
        cached_daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = cached_daemons
    _import(a, JS_WASM, "js")
    stdin = _session(a, "js", ["--std", "-e", JS_PROG], "let x = 40; var seen = []; print('ready', x)", "ready 40")
    try:
        status, snap = a.call("POST", "/v1/vms/s1/snapshots", {"name": "js-s"})
        assert status == 201, snap
        a.mv("snapshot", "export", "js-s", "-o", str(tmp_path / "js.snap"))
        b.mv("snapshot", "import", str(tmp_path / "js.snap"), timeout=600)
        b.mv("restore", "js-s", "--name", "s2", "--start")
        # the source goes on too: it was rewound into its read, its input still open
        stdin.line("seen.push('a'); print('source', x + 1, seen.length)")
        _wait_output(a, "s1", "source 41 1")
    finally:
        stdin.close()
    r = b.cli("attach", "s2", input=b"seen.push('b'); print('restored', x + 2, seen.join(','))\n", timeout=120)
    assert r.returncode == 0, r.stderr
    _wait_output(b, "s2", "restored 42 b")  # the variables as they were at the snapshot, not the source's
    assert b.api.wait("s2")["code"] == 0  # the end of its input ends the loop


@pytest.mark.slow  # CPython's compile on both daemons (and, on a cold cache, its rewrite): minutes
@pytest.mark.skipif(not PYTHON_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_cpython_session_migrated_while_it_waits_for_input_keeps_its_variables(
        cached_daemons: tuple[Daemon, Daemon]) -> None:
    a, b = cached_daemons
    _import(a, PYTHON_WASM, "python")
    stdin = _session(a, "python", ["-u", "-c", PY_PROG], "x = 40; print('ready', x)", "ready 40")
    try:
        r = a.cli("migrate", "s1", "--to", f"unix://{b.socket}", timeout=900)
        assert r.returncode == 0, r.stderr
    finally:
        stdin.close()
    assert a.call("GET", "/v1/vms/s1")[0] == 404  # it moved
    assert b.get("s1")["state"] == "running"
    r = b.cli("attach", "s1", input=b"print(x + 2)\n", timeout=300)
    assert r.returncode == 0, r.stderr
    _wait_output(b, "s1", "42")
    assert b.api.wait("s1")["code"] == 0
