"""Snapshots end to end: real daemons, the real client, sample guests and guests built with mvcc."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from snaphelp import Daemon, Export, numbers, record


def vm_ids(d: Daemon) -> set[str]:
    got = d.ok("GET", "/v1/vms?all=true")
    return {v["id"] for v in (got["vms"] if isinstance(got, dict) else got)}


def consecutive(ns: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(ns, ns[1:], strict=False))


def export_to(d: Daemon, snap: str, path: Path) -> bytes:
    d.mv("snapshot", "export", snap, "-o", str(path))
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------- the main path
def test_counter_snapshot_export_import_restore_continues(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = pair
    a.mv("run", "-d", "--name", "c1", "--env", "INTERVAL_MS=40", "counter")
    v0 = a.wait_count("c1", 5)
    assert a.mv("snapshot", "create", "c1", "--name", "s-c1").strip() == "s-c1"
    snap = json.loads(a.mv("snapshot", "inspect", "s-c1"))
    assert snap["name"] == "s-c1" and snap["kind"] == "unwound" and snap["vm"]["name"] == "c1"
    assert snap["memory_bytes"] > 0 and snap["memory_bytes"] % 65536 == 0 and snap["parent"] is None
    assert snap["vm"]["image"] == "counter" and snap["vm"]["digest"].startswith("sha256:")
    # the source keeps running
    assert a.vm("c1")["state"] == "running"
    va = a.wait_count("c1", v0 + 3)

    data = export_to(a, "s-c1", tmp_path / "s-c1.snap")
    assert data.startswith(b"MVSNAPX\x00")
    assert b.mv("snapshot", "import", str(tmp_path / "s-c1.snap")).strip() == "s-c1"
    assert "s-c1" in b.snapshots()
    vm_id = b.mv("restore", "s-c1", "--name", "c1b", "--start").strip()
    assert len(vm_id) == 32
    vb = b.wait_count("c1b", 0)
    got = numbers(b.logs("c1b"))
    # continues from past the snapshot value, not from 1: its first number follows one the source printed
    assert got[0] > v0 >= 5, (v0, got[:5])
    assert got[0] - 1 in numbers(a.logs("c1")), (got[0], numbers(a.logs("c1"))[-10:])
    assert consecutive(got), got
    # both go on independently
    b.wait_count("c1b", vb + 3)
    a.wait_count("c1", va + 3)
    info = b.vm("c1b")
    assert info["state"] == "running" and info["id"] == vm_id
    a.mv("rm", "-f", "c1")
    b.wait_count("c1b", b.wait_count("c1b", 0) + 2)  # b unaffected by the source's removal


def test_restore_on_the_same_daemon_and_snapshot_of_a_restored_vm(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("run", "-d", "--name", "g1", "--env", "INTERVAL_MS=30", "counter")
    a.wait_count("g1", 3)
    a.mv("snapshot", "create", "g1", "--name", "s-g1")
    a.mv("restore", "s-g1", "--name", "g2", "--start")
    n2 = a.wait_count("g2", 0)
    a.mv("snapshot", "create", "g2", "--name", "s-g2")  # a restored VM snapshots again (second generation)
    a.mv("restore", "s-g2", "--name", "g3", "--start")
    n3 = numbers(a.logs("g3")) or [a.wait_count("g3", 0)]
    assert n3[0] > n2 and consecutive(numbers(a.logs("g3")))
    for vm in ("g1", "g2", "g3"):
        a.mv("rm", "-f", vm)


def test_snapshot_of_a_paused_vm_blocked_in_sleep_and_resume(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("run", "-d", "--name", "p1", "--env", "INTERVAL_MS=1200", "counter")
    a.wait_count("p1", 0)
    a.mv("pause", "p1")  # within its 1.2 s sleep: the sleep has not completed
    snap = json.loads(a.mv("--json", "snapshot", "create", "p1", "--name", "s-p1"))
    assert snap["kind"] == "unwound" and snap["vm"]["state"] == "paused"
    time.sleep(0.3)
    assert a.vm("p1")["state"] == "paused"
    assert numbers(a.logs("p1")) == [1]  # the snapshot did not let it run on
    a.mv("resume", "p1")
    assert a.wait_count("p1", 1, timeout=15) == 2
    a.mv("restore", "s-p1", "--name", "p1r", "--start")
    assert a.wait_count("p1r", 0, timeout=15) == 2
    assert numbers(a.logs("p1r")) == [2]
    a.mv("rm", "-f", "p1", "p1r")


def test_snapshot_of_a_vm_paused_longer_than_its_sleep(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("run", "-d", "--name", "p2", "--env", "INTERVAL_MS=30", "counter")
    a.wait_count("p2", 2)
    a.mv("pause", "p2")
    time.sleep(0.3)
    try:
        r = a.api("POST", "/v1/vms/p2/snapshots", {"name": "s-p2"})
        assert r.status == 201, r.text
    finally:
        a.cli("rm", "-f", "p2")


# ------------------------------------------------------------------------------------------ ls / inspect / rm / names
def test_snapshot_ls_inspect_rm(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("create", "--name", "l1", "counter")
    a.mv("snapshot", "create", "l1", "--name", "s-ls-1")
    a.mv("snapshot", "create", "l1", "--name", "s-ls-2")
    listed = json.loads(a.mv("--json", "snapshot", "ls"))["snapshots"]
    names = [s["name"] for s in listed]
    assert {"s-ls-1", "s-ls-2"} <= set(names)
    text = a.mv("snapshot", "ls")
    assert text.splitlines()[0].split()[:3] == ["NAME", "VM", "KIND"]
    assert any(line.split()[:3] == ["s-ls-1", "l1", "created"] for line in text.splitlines())
    both = json.loads(a.mv("snapshot", "inspect", "s-ls-1", "s-ls-2"))
    assert [x["name"] for x in both] == ["s-ls-1", "s-ls-2"]
    assert a.mv("snapshot", "rm", "s-ls-1").strip() == "s-ls-1"
    assert "s-ls-1" not in a.snapshots() and "s-ls-2" in a.snapshots()
    r = a.cli("snapshot", "inspect", "s-ls-1")
    assert r.returncode == 125 and "snapshot_not_found" in r.stderr
    r = a.api("DELETE", "/v1/snapshots/s-ls-1")
    assert r.status == 404 and r.code == "snapshot_not_found"
    r = a.cli("snapshot", "rm", "s-ls-1", "s-ls-2")  # one missing: the other is still removed, exit 125
    assert r.returncode == 125 and "s-ls-2" not in a.snapshots()
    a.mv("rm", "-f", "l1")


def test_snapshot_auto_name(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("create", "--name", "auto1", "counter")
    n1 = a.mv("snapshot", "create", "auto1").strip()
    n2 = a.mv("snapshot", "create", "auto1").strip()
    assert n1 != n2 and n1.startswith("auto1") and {n1, n2} <= set(a.snapshots())
    a.mv("snapshot", "rm", n1, n2)
    a.mv("rm", "-f", "auto1")


@pytest.mark.parametrize("vm_name", ["my vm", "_under", "x" * 128])
def test_snapshot_auto_name_for_any_valid_vm_name(pair: tuple[Daemon, Daemon], vm_name: str) -> None:
    a, _ = pair
    a.mv("create", "--name", vm_name, "counter")
    try:
        r = a.cli("snapshot", "create", vm_name)
        assert r.returncode == 0, r.stderr
    finally:
        a.cli("rm", "-f", vm_name)


def test_name_collisions_are_409(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = pair
    a.mv("create", "--name", "n1", "counter")
    a.mv("snapshot", "create", "n1", "--name", "s-dup")
    r = a.api("POST", "/v1/vms/n1/snapshots", {"name": "s-dup"})
    assert r.status == 409 and r.code == "snapshot_exists", r.text
    r = a.cli("snapshot", "create", "n1", "--name", "s-dup")
    assert r.returncode == 125 and "snapshot_exists" in r.stderr
    # restore under a VM name in use
    r = a.api("POST", "/v1/snapshots/s-dup/restore", {"name": "n1"})
    assert r.status == 409 and r.code == "name_in_use", r.text
    # importing the same snapshot twice is fine; a different one with the same name is not
    export_to(a, "s-dup", tmp_path / "dup.snap")
    b.mv("snapshot", "import", str(tmp_path / "dup.snap"))
    b.mv("snapshot", "import", str(tmp_path / "dup.snap"))
    before = b.snapshots()
    a.mv("snapshot", "rm", "s-dup")
    a.mv("snapshot", "create", "n1", "--name", "s-dup")
    export_to(a, "s-dup", tmp_path / "dup2.snap")
    r = b.cli("snapshot", "import", str(tmp_path / "dup2.snap"))
    assert r.returncode == 125 and "snapshot_exists" in r.stderr
    assert b.snapshots() == before
    r = a.api("POST", "/v1/vms/n1/snapshots", {"name": "../x"})
    assert r.status == 400 and r.code == "invalid_name"
    a.mv("rm", "-f", "n1")


def test_restore_with_name_and_missing_snapshot(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("create", "--name", "rn1", "--env", "INTERVAL_MS=20", "counter")
    a.mv("snapshot", "create", "rn1", "--name", "s-rn1")
    vm_id = a.mv("restore", "s-rn1", "--name", "rn2").strip()
    vm = a.vm("rn2")
    assert vm["id"] == vm_id and vm["state"] == "created"
    a.mv("start", "rn2")
    a.wait_count("rn2", 2)
    r = a.api("POST", "/v1/snapshots/no-such-snap/restore", {"name": "x"})
    assert r.status == 404 and r.code == "snapshot_not_found"
    r = a.cli("restore", "no-such-snap", "--start")
    assert r.returncode == 125 and "no such snapshot" in r.stderr
    a.mv("rm", "-f", "rn1", "rn2")


def test_restore_when_the_image_is_missing_is_a_clear_error(make_daemon, pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    t = make_daemon("t", images=())
    a.mv("create", "--name", "im1", "counter")
    a.mv("snapshot", "create", "im1", "--name", "s-im1")
    export_to(a, "s-im1", tmp_path / "im.snap")
    # a stream without its image record (as migration sends to a target that has the image): the image an
    # imported snapshot needs can no longer be removed once it is here (409 image_in_use)
    ex = Export.parse((tmp_path / "im.snap").read_bytes())
    (tmp_path / "noimg.snap").write_bytes(Export(ex.head, [r for r in ex.records if r[0] != 2], [], ex.scheme).build())
    t.mv("snapshot", "import", str(tmp_path / "noimg.snap"))
    digest = json.loads(t.mv("snapshot", "inspect", "s-im1"))["vm"]["digest"]
    r = t.api("POST", "/v1/snapshots/s-im1/restore", {"start": True})
    assert r.status == 422 and r.code == "image_missing", r.text
    assert digest[:19] in r.message and "import" in r.message
    r = t.cli("restore", "s-im1")
    assert r.returncode == 125 and "image_missing" in r.stderr
    assert vm_ids(t) == set()
    t.mv("snapshot", "import", str(tmp_path / "im.snap"))  # brings the image back
    t.mv("restore", "s-im1", "--name", "im2", "--start")
    t.wait_count("im2", 1)
    a.mv("rm", "-f", "im1")


# ---------------------------------------------------------------------------------------------- what can be snapshotted
def test_created_vm_snapshots_at_once_and_restores(pair: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    a, b = pair
    a.mv("create", "--name", "cr1", "--env", "INTERVAL_MS=20", "counter")
    t0 = time.monotonic()
    snap = json.loads(a.mv("--json", "snapshot", "create", "cr1", "--name", "s-cr1"))
    assert time.monotonic() - t0 < 5
    assert snap["kind"] == "created" and snap["vm"]["state"] == "created"
    assert a.vm("cr1")["state"] == "created"
    export_to(a, "s-cr1", tmp_path / "cr.snap")
    b.mv("snapshot", "import", str(tmp_path / "cr.snap"))
    b.mv("restore", "s-cr1", "--name", "cr1b", "--start")
    b.wait_count("cr1b", 3)
    assert numbers(b.logs("cr1b"))[:3] == [1, 2, 3]  # a created VM starts from the beginning
    a.mv("start", "cr1")  # the source can still start
    a.wait_count("cr1", 1)
    a.mv("rm", "-f", "cr1")
    b.mv("rm", "-f", "cr1b")


def test_plain_wasi_guest_created_snapshots_and_running_is_not_snapshottable(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("create", "--name", "sp0", "spin", "1000")
    a.mv("snapshot", "create", "sp0", "--name", "s-sp0")
    a.mv("restore", "s-sp0", "--name", "sp0r", "--start")
    assert a.cli("wait", "sp0r").returncode == 0
    assert "checksum" in a.logs("sp0r")

    a.mv("run", "-d", "--name", "sp1", "spin", "100000000000")
    a.wait_state("sp1", "running")
    r = a.api("POST", "/v1/vms/sp1/snapshots", {"name": "s-sp1"})
    assert r.status == 409 and r.code == "not_snapshottable", r.text
    assert "Asyncify" in r.message
    r = a.cli("snapshot", "create", "sp1")
    assert r.returncode == 125 and "not_snapshottable" in r.stderr
    assert a.vm("sp1")["state"] == "running" and "s-sp1" not in a.snapshots()
    a.mv("rm", "-f", "sp0", "sp0r", "sp1")


def _run_busy(a: Daemon, guests: dict[str, Path], name: str) -> None:
    """Start the busy guest (computing forever, never at a suspension point) and wait until it runs."""
    a.mv("run", "-d", "--name", name, str(guests["busy"]))
    end = time.monotonic() + 10
    while "busy start" not in a.logs(name) and time.monotonic() < end:
        time.sleep(0.05)


def test_busy_asyncify_guest_without_suspension_point_is_409_after_the_timeout(
        pair: tuple[Daemon, Daemon], guests: dict[str, Path]) -> None:
    a, _ = pair
    _run_busy(a, guests, "busy1")
    t0 = time.monotonic()
    r = a.api("POST", "/v1/vms/busy1/snapshots", {"name": "s-busy"})
    took = time.monotonic() - t0
    assert r.status == 409 and r.code == "no_suspension_point", r.text
    assert 3.0 < took < 30, took
    assert "s-busy" not in a.snapshots()
    assert a.vm("busy1")["state"] == "running"  # not hurt by the attempt
    a.mv("stop", "busy1")
    assert a.vm("busy1")["state"] == "stopped"
    a.mv("rm", "busy1")


def test_paused_mid_compute_vm_is_snapshotted_and_stays_paused(pair: tuple[Daemon, Daemon],
                                                               guests: dict[str, Path]) -> None:
    """A VM paused while computing (not at a suspension point) runs on, unseen, to its next one, is
    snapshotted there and stays paused; resume and restore both continue from there."""
    a, _ = pair
    a.mv("run", "-d", "--name", "pb1", "--env", "ITERS=40000000", str(guests["burst"]))
    a.wait_count("pb1", 1)
    a.mv("pause", "pb1")
    fuel0 = a.vm("pb1")["fuel_consumed"]
    snap = json.loads(a.mv("--json", "snapshot", "create", "pb1", "--name", "s-pb1"))
    assert snap["kind"] == "unwound"
    vm = a.vm("pb1")
    assert vm["state"] == "paused", vm
    at = numbers(a.logs("pb1"))[-1]
    fuel1 = vm["fuel_consumed"]
    assert fuel1 >= fuel0
    time.sleep(0.3)
    assert a.vm("pb1")["fuel_consumed"] == fuel1  # parked again: no CPU while paused
    assert numbers(a.logs("pb1"))[-1] == at
    a.mv("resume", "pb1")
    assert a.wait_count("pb1", at) > at
    a.mv("restore", "s-pb1", "--name", "pb1r", "--start")
    got = a.wait_count("pb1r", 0)
    assert got > at, (got, at)  # the restored guest continued from the snapshot, it did not start over
    a.mv("rm", "-f", "pb1", "pb1r")
    a.mv("snapshot", "rm", "s-pb1")


def test_paused_busy_vm_that_never_reaches_a_suspension_point_is_409_and_stays_parked(
        pair: tuple[Daemon, Daemon], guests: dict[str, Path]) -> None:
    a, _ = pair
    _run_busy(a, guests, "busy2")
    a.mv("pause", "busy2")
    r = a.api("POST", "/v1/vms/busy2/snapshots", {"name": "s-busy2"})
    assert r.status == 409 and r.code == "no_suspension_point", r.text
    assert "s-busy2" not in a.snapshots()
    time.sleep(0.1)  # the slice that ran for the attempt ends at its next epoch tick
    vm = a.vm("busy2")
    assert vm["state"] == "paused", vm
    time.sleep(0.3)
    assert a.vm("busy2")["fuel_consumed"] == vm["fuel_consumed"], "a paused VM kept running"
    a.mv("rm", "-f", "busy2")


def test_terminal_vm_cannot_be_snapshotted(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("run", "--name", "done1", "--env", "COUNT=2", "--env", "INTERVAL_MS=1", "counter")
    r = a.api("POST", "/v1/vms/done1/snapshots", {})
    assert r.status == 409 and r.code == "invalid_state", r.text
    r = a.api("POST", "/v1/vms/nope-nope/snapshots", {})
    assert r.status == 404
    a.mv("rm", "done1")


# ---------------------------------------------------------------------------------------------- diff
def test_diff_snapshot_of_counter(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("diff", images=("counter",))
    d.mv("run", "-d", "--name", "dc", "--env", "INTERVAL_MS=20", "counter")
    d.wait_count("dc", 3)
    r = d.api("POST", "/v1/vms/dc/snapshots", {"name": "dc-diff0", "diff": True})
    assert r.status == 400 and r.code == "no_parent_snapshot", r.text
    full = json.loads(d.mv("--json", "snapshot", "create", "dc", "--name", "dc-full"))
    d.wait_count("dc", numbers(d.logs("dc"))[-1] + 2)
    diff = json.loads(d.mv("--json", "snapshot", "create", "dc", "--name", "dc-diff", "--diff"))
    assert diff["parent"] == "dc-full"
    assert full["stats"]["new_chunks"] == full["chunks"] >= 2
    # counter's whole memory is 3 chunks and a tick dirties all of them (stack, stdio buffer, Asyncify
    # buffer), so here a diff cannot be smaller than the full one; the big-memory test below shows the gain
    assert diff["stats"]["new_chunks"] <= full["stats"]["new_chunks"]
    assert diff["stats"]["new_bytes"] <= full["stats"]["new_bytes"]
    d.mv("restore", "dc-diff", "--name", "dcr", "--start")
    n = numbers(d.logs("dcr")) or [d.wait_count("dcr", 0)]
    d.wait_count("dcr", n[0] + 2)
    assert consecutive(numbers(d.logs("dcr")))
    # the parent can go: a diff snapshot is a complete manifest
    d.mv("snapshot", "rm", "dc-full")
    d.mv("restore", "dc-diff", "--name", "dcr2", "--start")
    d.wait_count("dcr2", n[0] + 1)


def test_diff_snapshot_of_a_big_memory_stores_far_fewer_chunks(pair: tuple[Daemon, Daemon], guests: dict[str, Path],
                                                                tmp_path: Path) -> None:
    a, b = pair
    a.mv("run", "-d", "--name", "big1", "--memory", "64MiB", "--env", "MEM_MB=8", "--env", "SEED=4242",
         str(guests["bigcounter"]))
    a.wait_count("big1", 2)
    full = json.loads(a.mv("--json", "snapshot", "create", "big1", "--name", "big-full"))
    assert full["memory_bytes"] >= 8 << 20
    assert full["stats"]["new_chunks"] >= 128
    a.wait_count("big1", numbers(a.logs("big1"))[-1] + 3)
    diff = json.loads(a.mv("--json", "snapshot", "create", "big1", "--name", "big-diff", "--diff"))
    assert diff["parent"] == "big-full"
    assert diff["stats"]["new_chunks"] <= 16, diff["stats"]
    assert diff["stats"]["new_chunks"] * 8 < full["stats"]["new_chunks"]
    assert diff["stats"]["new_bytes"] * 8 < full["stats"]["new_bytes"]
    # restore the diff elsewhere: the export carries every chunk, not just the new ones
    export_to(a, "big-diff", tmp_path / "bd.snap")
    assert (tmp_path / "bd.snap").stat().st_size > 8 << 20
    b.mv("snapshot", "import", str(tmp_path / "bd.snap"))
    b.mv("restore", "big-diff", "--name", "big1b", "--start")
    got = b.wait_count("big1b", 0)
    assert got > 3 and "filled" not in b.logs("big1b")  # continued, did not start over
    a.mv("rm", "-f", "big1")
    b.mv("rm", "-f", "big1b")


def test_diff_by_tracked_pages_misses_no_change(pair: tuple[Daemon, Daemon], guests: dict[str, Path]) -> None:
    """Where the kernel tracks written pages (userfaultfd write-protect + PAGEMAP_SCAN), a diff reads only
    those; it must still store every chunk that changed. Check: pause, diff, then a full snapshot of the
    same unchanged memory — every one of its chunks must already be stored (0 new), and the chain of diffs
    restores to the same state as the source."""
    a, _ = pair
    tracking = a.api("GET", "/v1/info").json()["snapshots"]["dirty_tracking"]
    a.mv("run", "-d", "--name", "trk", "--memory", "64MiB", "--env", "MEM_MB=8", "--env", "SEED=777",
         "--env", "INTERVAL_MS=5", str(guests["bigcounter"]))
    a.wait_count("trk", 2)
    a.mv("snapshot", "create", "trk", "--name", "trk-0")
    parent = "trk-0"
    for i in range(1, 4):
        a.wait_count("trk", numbers(a.logs("trk"))[-1] + 5)
        a.mv("pause", "trk")
        diff = json.loads(a.mv("--json", "snapshot", "create", "trk", "--name", f"trk-{i}", "--diff"))
        assert diff["parent"] == parent
        if tracking.startswith("userfaultfd"):
            assert diff["stats"]["dirty"] == "pagemap", diff["stats"]
            # a handful of ticks touched a handful of chunks, not the 128+ of the buffer
            assert diff["stats"]["written_chunks"] < 64, diff["stats"]
        full = json.loads(a.mv("--json", "snapshot", "create", "trk", "--name", f"trk-{i}-check"))
        assert full["stats"]["new_chunks"] == 0, (diff["stats"], full["stats"])
        parent = f"trk-{i}-check"
        a.mv("resume", "trk")
    a.mv("rm", "-f", "trk")
    a.mv("restore", "trk-3", "--name", "trk-r", "--start")
    got = a.wait_count("trk-r", 0)
    assert got > 3 and "filled" not in a.logs("trk-r")
    a.mv("rm", "-f", "trk-r")
    a.mv("snapshot", "rm", "trk-0", *[f"trk-{i}{c}" for i in range(1, 4) for c in ("", "-check")])


def test_a_table_the_guest_changed_comes_back(pair: tuple[Daemon, Daemon], guests: dict[str, Path],
                                              tmp_path: Path) -> None:
    """tablecounter overwrote a slot of its function table and grew it by one: the snapshot holds both
    changes (naming each function by where it was at instantiation) and a restore on another daemon calls
    the same functions through the same slots."""
    a, b = pair
    a.mv("run", "-d", "--name", "tab1", "--env", "INTERVAL_MS=20", str(guests["tablecounter"]))
    a.wait_count("tab1", 3)
    snap = json.loads(a.mv("--json", "snapshot", "create", "tab1", "--name", "s-tab1"))
    assert snap["kind"] == "unwound"
    export_to(a, "s-tab1", tmp_path / "tab.snap")
    b.mv("snapshot", "import", str(tmp_path / "tab.snap"))
    b.mv("restore", "s-tab1", "--name", "tab1b", "--start")
    got = b.wait_count("tab1b", 0)
    b.wait_count("tab1b", got + 3)
    calls = [ln for ln in b.logs("tab1b").splitlines() if ln.startswith("calls")]
    assert len(calls) >= 3 and set(calls) == {"calls 2 2"}, b.logs("tab1b")
    assert "changed" not in b.logs("tab1b")  # continued, did not start over
    vm = b.vm("tab1b")
    assert vm["state"] == "running", vm
    a.mv("rm", "-f", "tab1")
    b.mv("rm", "-f", "tab1b")


# ---------------------------------------------------------------------------------------------- hostile imports
def _tampered(data: bytes) -> bytes:
    bad = bytearray(data)
    for i in range(len(bad) // 2, min(len(bad), len(bad) // 2 + 64)):
        bad[i] ^= 0x5A
    return bytes(bad)


@pytest.fixture(scope="module")
def good_export(pair: tuple[Daemon, Daemon], tmp_path_factory: pytest.TempPathFactory) -> bytes:
    a, _ = pair
    a.mv("run", "-d", "--name", "hostile", "--env", "INTERVAL_MS=30", "counter")
    a.wait_count("hostile", 1)
    a.mv("snapshot", "create", "hostile", "--name", "s-hostile")
    a.mv("rm", "-f", "hostile")
    return export_to(a, "s-hostile", tmp_path_factory.mktemp("hostile") / "good.snap")


@pytest.mark.parametrize("case,expect", [
    ("tampered", "checksum"),
    ("truncated", "truncated"),
    ("truncated-tiny", "truncated"),
    ("wrong-version", "version {next}"),
    ("not-a-snapshot", "magic"),
    ("bad-chunk", "checksum"),
    ("wrong-end-digest", "digest"),
])
def test_hostile_export_files_are_refused_at_import(pair: tuple[Daemon, Daemon], good_export: bytes, tmp_path: Path,
                                                    case: str, expect: str) -> None:
    _, b = pair
    name = "s-hostile"
    data = good_export
    (tmp_path / "good.snap").write_bytes(data)
    ex = Export.parse(data)
    version = int.from_bytes(data[8:10], "little")
    expect = expect.format(next=version + 1)
    b.cli("snapshot", "rm", name)
    if case == "tampered":
        bad = _tampered(data)
    elif case == "truncated":
        bad = data[:len(data) // 2]
    elif case == "truncated-tiny":
        bad = data[:20]
    elif case == "wrong-version":
        bad = data[:8] + (version + 1).to_bytes(2, "little") + data[10:]
    elif case == "not-a-snapshot":
        bad = b"\x00asm\x01\x00\x00\x00" + data[8:]
    elif case == "bad-chunk":
        i = next(i for i, r in enumerate(ex.records) if r[0] == 3)
        p = bytearray(ex.records[i][1])
        p[-1] ^= 1
        ex.records[i] = (3, bytes(p))
        bad = ex.build()
    else:
        bad = data[:ex.offsets[-1]] + record(255, bytes(32))  # a wrong end digest with a valid CRC
    (tmp_path / "bad.snap").write_bytes(bad)
    snaps_before = b.snapshots()
    vms_before = vm_ids(b)
    r = b.cli("snapshot", "import", str(tmp_path / "bad.snap"))
    assert r.returncode == 125, (r.stdout, r.stderr)
    assert expect in r.stderr, r.stderr
    assert any(c in r.stderr for c in ("invalid_snapshot", "incompatible_snapshot")), r.stderr
    assert b.snapshots() == snaps_before and name not in snaps_before
    r2 = b.api("POST", f"/v1/snapshots/{name}/restore", {"start": True})
    assert r2.status == 404
    assert vm_ids(b) == vms_before
    # the good file still imports afterwards
    b.mv("snapshot", "import", str(tmp_path / "good.snap"))
    b.mv("snapshot", "rm", name)


@pytest.mark.parametrize("field,value", [("spec", "abc"), ("fuel_consumed", "abc"), ("fuel_budget", "abc")])
def test_crafted_manifest_field_types_are_refused_not_500(pair: tuple[Daemon, Daemon], tmp_path: Path,
                                                          field: str, value: object) -> None:
    a, b = pair
    name = f"s-craft-{field}"
    a.mv("create", "--name", f"cf-{field}", "counter")
    a.mv("snapshot", "create", f"cf-{field}", "--name", name)
    a.mv("rm", "-f", f"cf-{field}")
    ex = Export.parse(export_to(a, name, tmp_path / "g.snap"))
    m = ex.manifest()
    m["vm"][field] = value
    (tmp_path / "c.snap").write_bytes(ex.with_manifest(m).build())
    vms_before = vm_ids(b)
    imp = b.api("POST", "/v1/snapshots/import", raw=(tmp_path / "c.snap").read_bytes(),
                headers={"Content-Type": "application/octet-stream"})
    try:
        if imp.status == 201:
            r = b.api("POST", f"/v1/snapshots/{name}/restore", {"name": f"cfr-{field}", "start": True})
            assert r.status == 422 and r.code == "invalid_snapshot", (r.status, r.text)
        else:
            assert imp.status == 422 and imp.code == "invalid_snapshot", imp.text
        assert vm_ids(b) == vms_before
    finally:
        b.cli("rm", "-f", f"cfr-{field}")
        b.cli("snapshot", "rm", name)


def test_snapshot_ls_shows_size_and_diff(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    a.mv("run", "-d", "--name", "lsz", "--env", "INTERVAL_MS=20", "counter")
    a.wait_count("lsz", 1)
    try:
        a.mv("snapshot", "create", "lsz", "--name", "s-lsz")
        a.mv("snapshot", "create", "lsz", "--name", "s-lsz-d", "--diff")
        rows = {line.split()[0]: line for line in a.mv("snapshot", "ls").splitlines()[1:]}
        assert rows["s-lsz"].split()[3] != "-", rows["s-lsz"]
        assert "(diff)" in rows["s-lsz-d"], rows["s-lsz-d"]
    finally:
        a.cli("rm", "-f", "lsz")


def test_export_to_stdout_and_import_from_stdin(pair: tuple[Daemon, Daemon]) -> None:
    import os
    import subprocess
    import sys

    from mvapi import REPO

    a, b = pair
    a.mv("create", "--name", "pipe1", "counter")
    a.mv("snapshot", "create", "pipe1", "--name", "s-pipe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_")}
    base = [sys.executable, "-m", "microvmd.cli.main"]
    out = subprocess.run(base + ["--socket", str(a.socket), "snapshot", "export", "s-pipe", "-o", "-"],
                         capture_output=True, timeout=60, env=env, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith(b"MVSNAPX\x00"), out.stderr
    Export.parse(out.stdout)  # a whole stream, nothing else on stdout
    got = subprocess.run(base + ["--socket", str(b.socket), "snapshot", "import", "-"], input=out.stdout,
                         capture_output=True, timeout=60, env=env, cwd=REPO)
    assert got.returncode == 0 and got.stdout.strip() == b"s-pipe", got.stderr
    b.mv("restore", "s-pipe", "--name", "pipe2", "--start")
    b.wait_count("pipe2", 1)
    a.mv("rm", "-f", "pipe1")
    b.mv("rm", "-f", "pipe2")
