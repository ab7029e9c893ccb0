"""A VM's console output rate (limits.log_rate, issue 13 item 1): a guest that writes faster is held off its
vCPU until its budget refills. Nothing it wrote is lost, the daemon and other VMs go on, and the hold is
counted in the VM's ``console`` and in /metrics. A held VM still stops, pauses and snapshots."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from mvapi import IMAGES, Daemon

from microvmd.devices.console import LogRate

FLOOD_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (local $p i32)
    ;; 4096 bytes of 'y' ending in a newline at 1024; the iovec at 0
    (local.set $p (i32.const 1024))
    (loop $fill
      (i32.store8 (local.get $p) (i32.const 121))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $p) (i32.const 5119))))
    (i32.store8 (i32.const 5119) (i32.const 10))
    (i32.store (i32.const 0) (i32.const 1024))
    (i32.store (i32.const 4) (i32.const 4096))
    (loop $write
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (br $write))))
"""


def _until(what: str, cond: Any, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _metric(d: Daemon, name: str) -> float:
    text = d.api("GET", "/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_log_rate_arithmetic() -> None:
    """The token bucket: the burst is free, then every byte over it costs 1/rate seconds of hold; the first
    look (a daemon that just started) is a baseline, never charged."""
    r = LogRate(1000, 500)
    r.seen = None  # (a VM from its record: its logs hold what an earlier daemon saw)
    assert r.hold_for(10_000) == 0.0  # baseline
    assert r.hold_for(10_400) == 0.0  # 400 of the 500 burst
    wait = r.hold_for(12_000)  # 1,600 more: about 1,500 over (plus the refill since the look before)
    assert 1.3 < wait <= 1.5 and r.holds == 1
    assert r.hold_for(12_000) == 0.0  # nothing new, nothing charged


@pytest.mark.parametrize("mode", ["file", "hook"])
def test_a_flooding_guest_is_held_and_the_daemon_goes_on(make_daemon: Any, tmp_path: Path, mode: str) -> None:
    cfg = tmp_path / "microvmd.toml"
    # (a rate a guest in a write loop passes many times over: it is held, briefly, again and again)
    cfg.write_text(f'[engine]\nconsole = "{mode}"\n[limits]\nlog_rate = "16MiB"\nlog_burst = "1MiB"\n'
                   f'log_bytes = "1MiB"\n')
    d = make_daemon("--config", str(cfg))
    info = d.api.ok("GET", "/v1/info")
    assert info["limits"]["log_rate"] == 16 << 20 and info["limits"]["log_burst"] == 1 << 20
    wat = tmp_path / "flood.wat"
    wat.write_text(FLOOD_WAT)
    r = d.cli("run", "-d", "--name", f"flood-{mode}", str(wat))
    assert r.returncode == 0, r.stderr
    vm = _until("the flood is held twice", lambda: (v := d.api.vm(f"flood-{mode}"))["console"]["holds"] >= 2 and v)
    con = vm["console"]
    assert con["rate"] == 16 << 20 and con["burst"] == 1 << 20 and con["held_s"] > 0, con
    assert vm["state"] == "running"
    # the daemon serves, another VM runs and ends as usual while the flood is held
    chatty = tmp_path / "hello.wat"
    chatty.write_text('(module (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) '
                      '(result i32))) (memory (export "memory") 1) (data (i32.const 16) "hi\\n") '
                      '(func (export "_start") (i32.store (i32.const 0) (i32.const 16)) '
                      '(i32.store (i32.const 4) (i32.const 3)) '
                      '(drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))')
    r = d.cli("run", "--rm", str(chatty))
    assert r.returncode == 0 and r.stdout == "hi\n", (r.stdout, r.stderr)
    assert _metric(d, "microvmd_console_holds_total") >= 2
    assert _metric(d, "microvmd_console_held_seconds_total") > 0
    # pause and resume answer; a stop ends it at once, held or not
    d.api.ok("POST", f"/v1/vms/flood-{mode}/pause")
    assert d.api.vm(f"flood-{mode}")["state"] == "paused"
    d.api.ok("POST", f"/v1/vms/flood-{mode}/resume")
    r = d.cli("stop", f"flood-{mode}")
    assert r.returncode == 0, r.stderr
    vm = d.api.wait_state(f"flood-{mode}", "stopped")
    out = d.api.logs(f"flood-{mode}", "stdout")
    assert out and set(out) == {"y", "\n"}, out[:80]  # what it wrote is there, whole lines only
    assert all(len(line) == 4095 for line in out.splitlines()[1:-1])


def test_an_ephemeral_run_is_held_and_its_output_is_whole(make_daemon: Any, tmp_path: Path) -> None:
    """``run --rm``: the in-memory console is held the same way; every line arrives."""
    cfg = tmp_path / "microvmd.toml"
    cfg.write_text('[limits]\nlog_rate = "64KiB"\nlog_burst = "64KiB"\n')
    d = make_daemon("--config", str(cfg))
    from test_it_run import CHATTY_WAT
    wat = tmp_path / "chatty.wat"
    wat.write_text(CHATTY_WAT)
    r = d.cli("run", "--rm", str(wat))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 400 and lines[-1].endswith("x400"), (len(lines), lines[-1:])
    assert _metric(d, "microvmd_console_holds_total") >= 1


@pytest.mark.skipif(shutil.which("wasm-opt") is None, reason="Binaryen's wasm-opt is not installed")
def test_a_held_vm_is_snapshotted_and_counts_on(make_daemon: Any, tmp_path: Path) -> None:
    """A snapshot does not wait for the hold: the VM runs on, unseen, to its next suspension point. The hold
    here is far longer than the quiesce's 5 s (the guest's first slice writes kilobytes against 200 bytes a
    second), so only that makes the snapshot possible."""
    cfg = tmp_path / "microvmd.toml"
    cfg.write_text('[limits]\nlog_rate = "200"\nlog_burst = "200"\n')
    d = make_daemon("--config", str(cfg))
    r = d.cli("image", "import", str(IMAGES / "plaincount" / "plaincount.wasm"), "--name", "plaincount")
    assert r.returncode == 0, r.stderr
    r = d.cli("run", "-d", "--name", "slow", "--env", "INTERVAL_MS=0", "plaincount")
    assert r.returncode == 0, r.stderr
    _until("held for long", lambda: d.api.vm("slow")["console"]["held_s"] > 30)
    status, doc = d.api.call("POST", "/v1/vms/slow/snapshots", {"name": "slow-snap"})
    assert status == 201, doc  # (without it: 409 no_suspension_point after 5 s)
    assert d.api.vm("slow")["state"] == "running"  # (and held again for what it wrote on its way there)
    r = d.cli("restore", "slow-snap", "--name", "slow2", "--start")
    assert r.returncode == 0, r.stderr
    _until("the restored VM counts on", lambda: re.search(r"^\d+ \d+$", d.api.logs("slow2", "stdout"), re.M))
