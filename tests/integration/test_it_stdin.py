"""Standard input: `microvm run -i`, `microvm attach`, and `POST /v1/vms/{ref}/stdin` under them.

A guest that reads stdin is blocked (not spinning) while it waits, can be snapshotted there, and a restored
copy takes its input through `attach`. The guest is `cat` in WAT: fd_read(0) to fd_write(1) until EOF
(imported plain, so the daemon rewrites it with Asyncify and serves its fd_read)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from mvapi import REPO, Api, Daemon

CAT = b"""(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (local $n i32)
    (block $done
      (loop $again
        (i32.store (i32.const 0) (i32.const 64))
        (i32.store (i32.const 4) (i32.const 1024))
        (drop (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
        (local.set $n (i32.load (i32.const 16)))
        (br_if $done (i32.eqz (local.get $n)))
        (i32.store (i32.const 4) (local.get $n))
        (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 20)))
        (br $again)))))"""


@pytest.fixture(scope="module")
def cat(api: Api) -> str:
    r = api.import_image(CAT, "cat-stdin")
    assert r.status == 201, r.text
    assert r.json()["snapshot_kind"] == "asyncify"
    r = api("POST", "/v1/images?name=cat-plain&no_asyncify=true", raw=CAT,
            headers={"Content-Type": "application/wasm"})
    assert r.status == 201 and r.json()["snapshot_kind"] == "stopped_only", r.text
    return "cat-stdin"


def test_run_i_streams_stdin_and_eof_ends_the_guest(daemon: Daemon, cat: str) -> None:
    r = daemon.cli("run", "--rm", "-i", cat, input=b"hello\nworld\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello\nworld\n"
    r = daemon.cli("run", "-i", "--name", "cat-kept", cat, input=b"kept\n")  # not ephemeral: same stream
    assert r.returncode == 0 and r.stdout == "kept\n", r.stderr
    daemon.mv("rm", "cat-kept")


def test_without_i_the_guest_reads_end_of_file(daemon: Daemon, cat: str) -> None:
    r = daemon.cli("run", "--rm", cat, input=b"ignored\n")
    assert r.returncode == 0 and r.stdout == "", r.stderr


def test_stdin_of_a_vm_without_it_is_refused(api: Api, cat: str) -> None:
    vm = api.create(cat, start=True)
    r = api("POST", f"/v1/vms/{vm['id']}/stdin", raw=b"x", headers={"Content-Type": "application/octet-stream"})
    assert r.status in (404, 409), r.text  # closed (409 stdin_closed), or already gone after reading EOF
    vm = api.create("cat-plain", stdin=True)
    r = api("POST", f"/v1/vms/{vm['id']}/stdin", raw=b"x", headers={"Content-Type": "application/octet-stream"})
    assert r.status == 409 and r.code == "no_stdin", r.text
    api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")


def test_a_guest_waiting_for_input_is_blocked_snapshotted_and_attached_elsewhere(
        daemon: Daemon, api: Api, cat: str) -> None:
    """run -i on a pipe kept open; snapshot while it waits; restore; attach feeds the copy, EOF ends it."""
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_")}
    client = subprocess.Popen([sys.executable, "-m", "microvmd.cli.main", "--socket", str(daemon.socket), "run",
                               "-i", "--name", "cat-src", cat], stdin=r, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(r)
    try:
        os.write(w, b"one\n")
        assert client.stdout is not None
        assert client.stdout.readline() == b"one\n"
        deadline = time.monotonic() + 10
        while api.vm("cat-src")["blocked_in"] != "fd_read":
            assert time.monotonic() < deadline, api.vm("cat-src")
            time.sleep(0.02)
        vm = api.vm("cat-src")
        assert vm["state"] == "running" and vm["devices"]["wasi"]["stdin"]["eof"] is False
        snap = api("POST", "/v1/vms/cat-src/snapshots", {"name": "cat-waiting"})
        assert snap.status == 201, snap.text
        restored = api("POST", "/v1/snapshots/cat-waiting/restore", {"name": "cat-copy", "start": True})
        assert restored.status == 201, restored.text
        out = daemon.cli("attach", "cat-copy", input=b"two\n", timeout=60)
        assert out.returncode == 0 and out.stdout == "two\n", (out.stdout, out.stderr)
        assert api.vm("cat-copy")["state"] == "exited"
        os.write(w, b"three\n")  # the original goes on with its own input
        assert client.stdout.readline() == b"three\n"
    finally:
        os.close(w)
        _, err = client.communicate(timeout=30)  # (closes its pipes)
    assert client.returncode == 0, err
    for name in ("cat-src", "cat-copy"):
        api.ok("DELETE", f"/v1/vms/{name}?force=true")
    api.ok("DELETE", "/v1/snapshots/cat-waiting")


def test_attach_to_an_ended_vm_reports_its_exit(daemon: Daemon, api: Api, cat: str) -> None:
    vm = api.create(cat, start=True)
    api.wait(vm["id"])
    r = daemon.cli("attach", vm["id"])
    assert r.returncode == 0
    api.ok("DELETE", f"/v1/vms/{vm['id']}")
