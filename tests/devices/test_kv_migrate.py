"""A disk-backed guest moves between daemons: images/kv on a virtual disk, live-migrated and snapshot-restored.

Real ``microvmd`` subprocesses (each on its own socket and state dir), the real client
(``python -m microvmd.cli.main``), real TCP on 127.0.0.1 through published ports.

What travels with a VM is its disks' point-in-time content: a snapshot reads each disk as the VM sees it
while the VM is frozen (``SnapshotView.read_all``, a cow overlay merged in), stores it as chunks next to
the memory, and a restore materializes it as a new disk ``<name>.restored-<hex>`` attached ``rw`` (a
migration keeps ``<name>`` when it is free on the target, and says so when it is not)
(``Snapshots._restore_disks`` -> ``BlockDevice.materialize``). kv keeps its data in memory *and* in an
append-only log on disk 0, so a running kv answering GET proves only that memory travelled; every test
therefore also starts a *fresh* kv on the disk in question, which can only know what the log holds.
"""
from __future__ import annotations

import json
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mvapi
import pytest
from mvapi import IMAGES, free_port, short_root

KV_WASM = IMAGES / "kv" / "kv.wasm"


# ================================================================================================ harness
class Daemon(mvapi.Daemon):
    """A real ``microvmd`` child process (mvapi.Daemon), sample images imported, with the kv helpers."""

    @classmethod
    def named(cls, root: Path, name: str) -> Daemon:
        """Started on ``root/NAME.sock`` with state dir ``root/NAME-state``."""
        d = cls(root, root / f"{name}-state", root / f"{name}.sock", ["--import-images", str(IMAGES)])
        return d.start()

    def disks(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.ok("GET", "/v1/disks")["disks"]}

    def published_port(self, ref: str) -> int:
        return int(self.inspect(ref)["devices"]["net"]["published"][0]["host_port"])

    def run_kv(self, name: str, disk: str, host_port: int = 0, *extra: str) -> int:
        """Start kv detached on ``disk`` (``NAME[:mode]``) with guest port 8000 published; returns the host port."""
        self.mv("run", "-d", "--name", name, "--disk", disk, "--publish", f"127.0.0.1:{host_port}:8000",
                *extra, "kv")
        port = self.published_port(name)
        assert kv(port, "PING") == ["PONG"]
        return port

    def rss_hwm(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")


def kv(port: int, *cmds: str, timeout: float = 20.0) -> list[str]:
    """Send kv commands on one new connection; returns one reply line per command."""
    end = time.monotonic() + timeout
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)
    with s, s.makefile("rwb") as f:
        out = []
        for c in cmds:
            f.write(c.encode() + b"\n")
            f.flush()
            line = f.readline()
            assert line.endswith(b"\n"), f"kv closed the connection after {c!r}: {line!r}"
            out.append(line.decode().rstrip("\r\n"))
        return out


def fresh_view(d: Daemon, disk: str, name: str) -> Any:
    """Start a new kv on ``disk`` (it knows only what the disk's log holds); returns a GET function."""
    port = d.run_kv(name, disk)

    def get(*keys: str) -> list[str]:
        return kv(port, *(f"GET {k}" for k in keys))
    return get


# ================================================================================================ fixtures
@pytest.fixture
def root() -> Iterator[Path]:
    p = short_root("mvkvm-")
    yield p
    shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def daemon_a(root: Path) -> Iterator[Daemon]:
    d = Daemon.named(root, "a")
    yield d
    d.stop()


@pytest.fixture
def daemon_b(root: Path) -> Iterator[Daemon]:
    d = Daemon.named(root, "b")
    yield d
    d.stop()


KEYS = {"alpha": "1", "beta": "hello world", "gamma": "x" * 200, "delta": "last one"}


def set_keys(port: int, keys: dict[str, str]) -> None:
    assert kv(port, *(f"SET {k} {v}" for k, v in keys.items())) == ["OK"] * len(keys)


# ================================================================================================ tests
def test_kv_migrates_with_its_disk(daemon_a: Daemon, daemon_b: Daemon) -> None:
    a, b = daemon_a, daemon_b
    a.mv("disk", "create", "d1", "--size", "1MiB")
    port = free_port()
    assert a.run_kv("kv1", "d1", port) == port
    set_keys(port, KEYS)
    assert kv(port, "DEL delta", "GET delta") == ["OK", "NOT_FOUND"]
    src = a.inspect("kv1")
    assert src["devices"]["blk"][0]["write_ops"] >= len(KEYS) + 1

    r = a.cli("migrate", "kv1", "--to", f"unix://{b.socket}")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert "disk" not in r.stderr  # its disk kept its name: nothing to say

    # gone from A: no VM, the disk is free again (and still holds A's data)
    status, _ = a.call("GET", "/v1/vms/kv1")
    assert status == 404
    assert "kv1" not in a.mv("ps", "-a")
    assert a.disks()["d1"]["used_by"] == []

    # on B: same name, running, the id the client printed; the published port answers there
    dst = b.inspect("kv1")
    assert dst["state"] == "running"
    assert out == dst["id"] != src["id"]
    assert dst["devices"]["net"]["published"][0]["host_port"] == port
    want = [KEYS[k] for k in ("alpha", "beta", "gamma")] + ["NOT_FOUND"]
    assert kv(port, "GET alpha", "GET beta", "GET gamma", "GET delta") == want

    # its disk is B's own copy of d1's content at migration time, attached rw, under the same name (free on B)
    (att,) = dst["devices"]["blk"]
    assert att["name"] == "d1" and att["mode"] == "rw"
    assert b.disks()["d1"]["used_by"] == ["kv1"]
    assert list(b.disks()) == ["d1"]

    # writes after the move land on B's disk only
    assert kv(port, "SET after moved") == ["OK"]
    b.mv("rm", "-f", "kv1")

    # the disk content travelled: a fresh kv on B's disk replays the log written on A (plus "after")
    get_b = fresh_view(b, att["name"], "check-b")
    assert get_b("alpha", "beta", "gamma", "delta", "after") == want + ["moved"]
    # and A's d1 kept its own history, without what was written on B
    get_a = fresh_view(a, "d1", "check-a")
    assert get_a("alpha", "beta", "gamma", "delta", "after") == want + ["NOT_FOUND"]


def test_migrate_says_when_the_target_has_a_disk_of_that_name(daemon_a: Daemon, daemon_b: Daemon) -> None:
    """B's own d1 is left as it is; the VM's copy gets another name there, and the user is told (stderr, and
    ``disks`` in the answer), since the VM on B no longer uses a disk called d1."""
    a, b = daemon_a, daemon_b
    a.mv("disk", "create", "d1", "--size", "1MiB")
    b.mv("disk", "create", "d1", "--size", "2MiB")
    port = a.run_kv("kv1", "d1")
    set_keys(port, {"moved": "yes"})
    r = a.cli("migrate", "kv1", "--to", f"unix://{b.socket}")
    assert r.returncode == 0, r.stderr
    (att,) = b.inspect("kv1")["devices"]["blk"]
    assert att["name"].startswith("d1.restored-")
    assert f"disk d1 is {att['name']} on the target: a disk named d1 already exists there" in r.stderr, r.stderr
    assert r.stdout.strip() == b.inspect("kv1")["id"]  # stdout is still only the new id
    assert b.disks()["d1"]["size"] == 2 << 20 and b.disks()["d1"]["used_by"] == []  # B's d1 untouched
    assert kv(b.published_port("kv1"), "GET moved") == ["yes"]
    # the JSON answer says it too
    b.mv("migrate", "kv1", "--to", f"unix://{a.socket}")  # back to A, whose d1 stays (disks are data)
    moved = json.loads(a.mv("--json", "migrate", "kv1", "--to", f"unix://{b.socket}"))
    (d,) = moved["disks"]
    assert d["renamed"] and d["name"].startswith("d1.restored-") and d["target_name"] != d["name"]
    assert "already has a disk named" in d["reason"]


def test_snapshot_restore_gives_a_separate_disk(daemon_a: Daemon) -> None:
    d = daemon_a
    d.mv("disk", "create", "d2", "--size", "1MiB")
    port = d.run_kv("kv2", "d2")
    set_keys(port, {"x": "1", "shared": "before"})
    d.mv("snapshot", "create", "kv2", "--name", "s2")
    snap = json.loads(d.mv("--json", "snapshot", "inspect", "s2"))
    assert [(x["name"], x["mode"], x["size"]) for x in snap["disks"]] == [("d2", "rw", 1 << 20)]
    # written after the snapshot: must not be in the restored VM, nor on its disk
    set_keys(port, {"late": "original only", "shared": "after"})

    d.mv("restore", "s2", "--name", "kv2r", "--start")
    info = d.inspect("kv2r")
    assert info["state"] == "running"
    (att,) = info["devices"]["blk"]
    assert att["name"].startswith("d2.restored-") and att["mode"] == "rw"
    rport = d.published_port("kv2r")  # published as 127.0.0.1:0:8000, so a port of its own
    assert rport != port
    assert kv(rport, "GET x", "GET shared", "GET late") == ["1", "before", "NOT_FOUND"]

    # both run at once, each on its own disk
    set_keys(rport, {"y": "restored only", "shared": "restored"})
    assert kv(port, "GET y", "GET shared") == ["NOT_FOUND", "after"]
    assert kv(rport, "GET late", "GET shared") == ["NOT_FOUND", "restored"]
    assert d.disks()["d2"]["used_by"] == ["kv2"]
    assert d.disks()[att["name"]]["used_by"] == ["kv2r"]

    # the disks themselves (fresh kvs replay only the logs)
    d.mv("rm", "-f", "kv2")
    d.mv("rm", "-f", "kv2r")
    orig = fresh_view(d, "d2", "check-orig")
    assert orig("x", "shared", "late", "y") == ["1", "after", "original only", "NOT_FOUND"]
    copy = fresh_view(d, att["name"], "check-copy")
    assert copy("x", "shared", "late", "y") == ["1", "restored", "NOT_FOUND", "restored only"]


def test_restore_of_a_cow_attachment_keeps_the_overlay_and_not_the_image(daemon_a: Daemon) -> None:
    """A cow VM's snapshot holds the disk as the VM saw it (overlay merged); the image never changes."""
    d = daemon_a
    d.mv("disk", "create", "base", "--size", "1MiB")
    port = d.run_kv("seed", "base")
    set_keys(port, {"from_base": "yes"})
    d.mv("rm", "-f", "seed")

    port = d.run_kv("kvc", "base:cow")
    assert kv(port, "GET from_base") == ["yes"]
    set_keys(port, {"cow": "private"})
    d.mv("snapshot", "create", "kvc", "--name", "sc")
    d.mv("rm", "-f", "kvc")
    d.mv("restore", "sc", "--name", "kvcr", "--start")
    (att,) = d.inspect("kvcr")["devices"]["blk"]
    assert att["name"].startswith("base.restored-") and att["mode"] == "rw"
    d.mv("rm", "-f", "kvcr")

    assert fresh_view(d, att["name"], "check-copy")("from_base", "cow") == ["yes", "private"]
    assert fresh_view(d, "base", "check-base")("from_base", "cow") == ["yes", "NOT_FOUND"]


# ------------------------------------------------------------------------------------------ known bugs
def test_restore_with_the_same_disk_attached_twice(daemon_a: Daemon) -> None:
    d = daemon_a
    d.mv("disk", "create", "twice", "--size", "1MiB")
    # disk 0 = the image read-only, disk 1 = a private cow view of it, where kv keeps its log
    port = d.run_kv("kvt", "twice:ro", 0, "--disk", "twice:cow", "--env", "KV_DISK=1")
    set_keys(port, {"k": "v"})
    d.mv("snapshot", "create", "kvt", "--name", "st")
    d.mv("rm", "-f", "kvt")
    r = d.cli("restore", "st", "--name", "kvtr", "--start")
    assert r.returncode == 0, r.stderr
    atts = d.inspect("kvtr")["devices"]["blk"]
    assert [a["mode"] for a in atts] == ["ro", "rw"]
    assert atts[0]["name"] != atts[1]["name"]
    assert kv(d.published_port("kvtr"), "GET k") == ["v"]


def test_failed_restore_leaves_no_disk_behind(daemon_a: Daemon) -> None:
    d = daemon_a
    d.mv("disk", "create", "d5", "--size", "1MiB")
    port = free_port()
    d.run_kv("kv5", "d5", port)
    d.mv("snapshot", "create", "kv5", "--name", "s5")
    r = d.cli("restore", "s5", "--name", "kv5r")  # kv5 still holds the fixed host port
    assert r.returncode == 125 and "port" in r.stderr
    assert sorted(d.disks()) == ["d5"]


def test_restored_disk_stays_sparse(daemon_a: Daemon) -> None:
    d = daemon_a
    d.mv("disk", "create", "sp", "--size", "64MiB")
    port = d.run_kv("kvs", "sp")
    set_keys(port, {"a": "b"})
    assert d.disks()["sp"]["allocated"] <= 1 << 20
    d.mv("snapshot", "create", "kvs", "--name", "ss")
    d.mv("rm", "-f", "kvs")
    d.mv("restore", "ss", "--name", "kvsr")
    (att,) = d.inspect("kvsr")["devices"]["blk"]
    assert d.disks()[att["name"]]["allocated"] <= 1 << 20


def test_snapshot_of_a_big_sparse_disk_is_cheap(daemon_a: Daemon) -> None:
    d = daemon_a
    size = 256 << 20
    d.mv("disk", "create", "big", "--size", str(size))
    port = d.run_kv("kvb", "big")
    set_keys(port, {"a": "b"})
    before = d.rss_hwm()
    d.mv("snapshot", "create", "kvb", "--name", "sb")
    grown = d.rss_hwm() - before
    assert grown < size // 4, f"daemon peak RSS grew by {grown >> 20} MiB for a {size >> 20} MiB disk"
