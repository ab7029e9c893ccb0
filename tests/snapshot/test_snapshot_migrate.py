"""Live migration between two real daemons over their Unix sockets, and guests suspended in blocking calls."""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mvapi import free_port, line_rpc, wait_port
from snaphelp import Daemon, numbers


def gone_from(d: Daemon, name: str) -> bool:
    got = d.ok("GET", "/v1/vms?all=true")
    vms = got["vms"] if isinstance(got, dict) else got
    return all(v["name"] != name for v in vms)


def test_migrate_echo_blocked_in_poll(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    port = free_port()
    a.mv("run", "-d", "--name", "e1", "--publish", f"127.0.0.1:{port}:8000", "echo")
    wait_port(port)
    assert line_rpc(port, "before") == "before"
    a.wait_blocked("e1")
    idle = socket.create_connection(("127.0.0.1", port), 5)  # a client connected across the migration
    idle.settimeout(10)
    try:
        r = a.cli("--json", "migrate", "e1", "--to", f"unix://{b.socket}")
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["vm"]["name"] == "e1" and answer["vm"]["state"] == "running"
        assert answer["stats"]["chunks_total"] >= answer["stats"]["chunks_sent"] >= 0
        assert gone_from(a, "e1")
        vm = b.vm("e1")
        assert vm["state"] == "running" and vm["id"] == answer["vm"]["id"]
        # the published port answers at the destination
        assert line_rpc(port, "after-migrate", retry=5) == "after-migrate"
        assert line_rpc(port, "again") == "again"
        # the connection that was open is reset/closed, not left hanging
        try:
            idle.sendall(b"x\n")
            assert idle.recv(100) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    finally:
        idle.close()
    assert not [s for s in a.snapshots() if s.startswith("migrate-e1")]  # the source cleaned up
    b.mv("rm", "-f", "e1")


def test_migrate_counter_continues_and_created_vm_stays_created(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    a.mv("run", "-d", "--name", "mc1", "--env", "INTERVAL_MS=30", "counter")
    v = a.wait_count("mc1", 3)
    a.mv("migrate", "mc1", "--to", f"unix://{b.socket}")
    assert gone_from(a, "mc1")
    got = numbers(b.logs("mc1")) or [b.wait_count("mc1", 0)]
    assert got[0] > v
    b.wait_count("mc1", got[0] + 2)
    b.mv("rm", "-f", "mc1")

    a.mv("create", "--name", "mc2", "--env", "INTERVAL_MS=10", "counter")
    a.mv("migrate", "mc2", "--to", str(b.socket))  # a bare path means a Unix socket
    assert b.vm("mc2")["state"] == "created" and gone_from(a, "mc2")
    b.mv("start", "mc2")
    b.wait_count("mc2", 2)
    assert numbers(b.logs("mc2"))[0] == 1
    b.mv("rm", "-f", "mc2")


@pytest.mark.parametrize("dest", ["unix", "https"])
def test_migrate_to_unreachable_destination_keeps_the_vm(pair: tuple[Daemon, Daemon], tmp_path: Path,
                                                         dest: str) -> None:
    a, _ = pair
    port = free_port()
    name = f"e-unreach-{dest}"
    a.mv("run", "-d", "--name", name, "--publish", f"127.0.0.1:{port}:8000", "echo")
    wait_port(port)
    tok = tmp_path / "tok"
    tok.write_text("0123456789abcdef0123456789")
    if dest == "unix":
        r = a.cli("migrate", name, "--to", f"unix://{tmp_path}/nobody-here.sock")
    else:
        r = a.cli("migrate", name, "--to", f"https://127.0.0.1:{free_port()}", "--token-file", str(tok))
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert "migration_failed" in r.stderr and "nothing was changed" in r.stderr
    assert a.vm(name)["state"] == "running"
    assert line_rpc(port, "still-here") == "still-here"
    a.mv("rm", "-f", name)


def test_migrate_https_without_token_is_refused(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("create", "--name", "notok", "counter")
    r = a.api("POST", "/v1/vms/notok/migrate", {"to": "https://127.0.0.1:9"})
    assert r.status == 400 and r.code == "invalid_destination", r.text
    r = a.api("POST", "/v1/vms/notok/migrate", {"to": "ftp://x"})
    assert r.status == 400 and r.code == "invalid_destination", r.text
    r = a.cli("migrate", "notok", "--to", "ftp://x")
    assert r.returncode == 2  # wrong usage of the client
    assert a.vm("notok")["state"] == "created"
    a.mv("rm", "-f", "notok")


def test_migrate_failing_at_the_target_keeps_the_vm_running_here(pair: tuple[Daemon, Daemon]) -> None:
    """The target is reachable but refuses the restore (its name is taken): the source thaws and rebinds."""
    a, b = pair
    port = free_port()
    a.mv("run", "-d", "--name", "e-clash", "--publish", f"127.0.0.1:{port}:8000", "echo")
    b.mv("create", "--name", "e-clash", "counter")
    wait_port(port)
    r = a.cli("migrate", "e-clash", "--to", f"unix://{b.socket}")
    assert r.returncode == 125 and "name_in_use" in r.stderr and "keeps running here" in r.stderr, r.stderr
    assert a.vm("e-clash")["state"] == "running"
    assert line_rpc(port, "still-answering") == "still-answering"
    assert b.vm("e-clash")["image"] == "counter"  # the target's own VM untouched
    assert not [s for s in a.snapshots() if s.startswith("migrate-")]
    for s in b.snapshots():  # see test_failed_migration_leaves_no_snapshot_on_the_target
        if s.startswith("migrate-e-clash"):
            b.mv("snapshot", "rm", s)
    a.mv("rm", "-f", "e-clash")
    b.mv("rm", "-f", "e-clash")


def test_migrate_leaves_no_snapshot_on_the_target(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    a.mv("run", "-d", "--name", "leak1", "--env", "INTERVAL_MS=30", "counter")
    a.wait_count("leak1", 1)
    a.mv("migrate", "leak1", "--to", f"unix://{b.socket}")
    b.wait_count("leak1", 0)
    assert not [s for s in b.snapshots() if s.startswith("migrate-leak1")], b.snapshots()
    assert not [s for s in a.snapshots() if s.startswith("migrate-leak1")], a.snapshots()
    b.mv("rm", "-f", "leak1")


def test_failed_migration_leaves_no_snapshot_on_the_target(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    a.mv("create", "--name", "leak2", "counter")
    b.mv("create", "--name", "leak2", "counter")
    try:
        r = a.cli("migrate", "leak2", "--to", f"unix://{b.socket}")
        assert r.returncode == 125 and "name_in_use" in r.stderr
        assert not [s for s in b.snapshots() if s.startswith("migrate-leak2")], b.snapshots()
    finally:
        for s in b.snapshots():
            if s.startswith("migrate-leak2"):
                b.cli("snapshot", "rm", s)
        a.cli("rm", "-f", "leak2")
        b.cli("rm", "-f", "leak2")


@pytest.mark.parametrize("vm_name", ["my vm", "y" * 128])
def test_migrate_vm_with_any_valid_name(pair: tuple[Daemon, Daemon], vm_name: str) -> None:
    a, b = pair
    a.mv("create", "--name", vm_name, "counter")
    try:
        r = a.cli("migrate", vm_name, "--to", f"unix://{b.socket}")
        assert r.returncode == 0, r.stderr
    finally:
        a.cli("rm", "-f", vm_name)
        b.cli("rm", "-f", vm_name)


def test_echo_suspended_in_poll_restored_elsewhere_serves_new_clients(pair: tuple[Daemon, Daemon],
                                                                      tmp_path: Path) -> None:
    a, b = pair
    port = free_port()
    a.mv("run", "-d", "--name", "e-rs", "--publish", f"127.0.0.1:{port}:8000", "echo")
    wait_port(port)
    assert line_rpc(port, "one") == "one"
    a.wait_blocked("e-rs")
    a.mv("snapshot", "create", "e-rs", "--name", "s-e-rs")
    assert line_rpc(port, "source-still-serves") == "source-still-serves"
    a.mv("rm", "-f", "e-rs")  # frees the port for the copy
    a.mv("snapshot", "export", "s-e-rs", "-o", str(tmp_path / "e.snap"))
    b.mv("snapshot", "import", str(tmp_path / "e.snap"))
    # an imported snapshot publishes nothing by itself: the restore grants the port (docs/snapshot-format.md)
    b.mv("restore", "s-e-rs", "--name", "e-rs2", "--start", "--publish", f"127.0.0.1:{port}:8000")
    wait_port(port)
    assert line_rpc(port, "restored") == "restored"
    b.mv("rm", "-f", "e-rs2")


def test_guest_suspended_in_accept_gets_the_connection_after_restore_elsewhere(
        pair: tuple[Daemon, Daemon], guests: dict[str, Path], tmp_path: Path) -> None:
    """greet blocks in mv_accept between clients; restored on b, its pending accept returns the new client."""
    a, b = pair
    port = free_port()
    a.mv("run", "-d", "--name", "greet", "--publish", f"127.0.0.1:{port}:8000", str(guests["greet"]))
    # no wait_port() here: a probe connection would be greet's client 1
    assert line_rpc(port, "x", retry=10) == "hello 1, x"
    end = time.monotonic() + 10
    while "accepted 1" not in a.logs("greet") and time.monotonic() < end:
        time.sleep(0.05)
    assert "accept" in a.wait_blocked("greet")["blocked_in"]
    time.sleep(0.2)  # client 1 has gone: greet is back in mv_accept for client 2
    a.mv("snapshot", "create", "greet", "--name", "s-greet")
    a.mv("rm", "-f", "greet")
    a.mv("snapshot", "export", "s-greet", "-o", str(tmp_path / "g.snap"))
    b.mv("snapshot", "import", str(tmp_path / "g.snap"))
    b.mv("restore", "s-greet", "--name", "greet2", "--start", "--publish", f"127.0.0.1:{port}:8000")
    assert line_rpc(port, "y", retry=10) == "hello 2, y"  # the suspended accept returned this client
    assert line_rpc(port, "z") == "hello 3, z"  # and it goes on
    out = b.logs("greet2")
    assert "accepted 2" in out and "accepted 3" in out and "accepted 1" not in out
    b.mv("rm", "-f", "greet2")


def test_migrate_guest_blocked_in_accept(pair: tuple[Daemon, Daemon], guests: dict[str, Path]) -> None:
    a, b = pair
    port = free_port()
    a.mv("run", "-d", "--name", "greet-m", "--publish", f"127.0.0.1:{port}:8000", str(guests["greet"]))
    assert "accept" in a.wait_blocked("greet-m")["blocked_in"]
    a.mv("migrate", "greet-m", "--to", f"unix://{b.socket}")
    assert line_rpc(port, "moved", retry=10) == "hello 1, moved"
    assert "accepted 1" in b.logs("greet-m")
    b.mv("rm", "-f", "greet-m")


def test_snapshot_asked_while_the_worker_waits_inside_a_device_call(make_daemon: Callable[..., Daemon],
                                                                    tmp_path: Path) -> None:
    """With a spin window as long as the quantum, the worker waits for the echo guest's next message inside
    net_poll for up to 20 ms after each answer, before the guest is parked on it. A snapshot asked for in
    that window unwinds the guest once it parks; it does not wait for a next message that never comes
    (it used to, and gave 409 no_suspension_point after 5 s)."""
    cfg = tmp_path / "spin.toml"
    cfg.write_text('[engine]\nspin_wait = "20ms"\n')
    d = make_daemon("spinw", "--config", str(cfg))
    port = free_port()
    d.mv("run", "-d", "--name", "ew", "--publish", f"127.0.0.1:{port}:8000", "echo")
    wait_port(port)
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(10)
        for i in range(5):
            msg = f"m{i}\n".encode()
            s.sendall(msg)
            got = b""
            while not got.endswith(b"\n"):
                got += s.recv(100)
            assert got == msg
            # at once: the worker is (almost always) still waiting inside net_poll for the next message
            status, doc = d.call("POST", "/v1/vms/ew/snapshots", {"name": f"ew-{i}"})
            assert status == 201, (i, status, doc)
            assert doc["kind"] == "unwound"
        s.sendall(b"after\n")  # the guest goes on serving the same connection
        got = b""
        while not got.endswith(b"\n"):
            got += s.recv(100)
        assert got == b"after\n"
    assert d.get("ew")["state"] == "running"
