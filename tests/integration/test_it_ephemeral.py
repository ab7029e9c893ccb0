"""Ephemeral VMs (`"ephemeral": true`, `microvm run --rm`): no record, no console files, gone when they end.

What a function invocation will use: nothing of such a VM reaches the disk, and its output is kept in
memory (the last log_bytes of each stream) for followers and for the answer to a create with wait=true.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from mvapi import IMAGES, Api, Daemon


def _paths_changed_since(root: Path, t0: float) -> list[str]:
    changed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            try:
                if p.lstat().st_mtime >= t0:
                    changed.append(str(p.relative_to(root)))
            except FileNotFoundError:
                pass
    return changed


def test_run_rm_streams_the_console_and_writes_nothing(make_daemon) -> None:  # type: ignore[no-untyped-def]
    d = make_daemon("--import-images", str(IMAGES))  # its own daemon: no other test's work in its state dir
    deadline = time.monotonic() + 300
    while d.api.ok("GET", "/v1/images")["importing"]:  # sample images rewritten in the background at start
        assert time.monotonic() < deadline
        time.sleep(0.2)
    d.cli("run", "--rm", "hello")  # anything the first run makes lazily is made before the mark
    time.sleep(0.5)  # the directories made in advance are refilled by now
    t0 = time.time()
    time.sleep(0.05)
    for code in ("0", "3"):
        r = d.cli("run", "--rm", "--env", "WHO=eph", "hello", code)
        assert r.returncode == int(code), r.stderr
        assert "Hello from microvmd!" in r.stdout and "WHO=eph" in r.stdout
    time.sleep(0.2)  # anything written late would be written by now
    assert _paths_changed_since(d.state_dir, t0) == []


def test_create_ephemeral_with_wait_answers_the_exit_and_the_vm_is_gone(api: Api) -> None:
    r = api("POST", "/v1/vms?wait=true", {"image": "hello", "args": ["5"], "ephemeral": True, "start": True})
    assert r.status == 201, r.text
    vm = r.json()
    assert vm["exit"]["code"] == 5 and vm["exit"]["reason"] == "exit"
    assert vm["spec"]["ephemeral"] is True
    assert api("GET", f"/v1/vms/{vm['id']}").status == 404
    assert all(v["id"] != vm["id"] for v in api.ok("GET", "/v1/vms?all=true")["vms"])


def test_ephemeral_vm_is_listed_while_it_runs_and_its_console_follows(api: Api) -> None:
    vm = api.create("spin", "900000000000", ephemeral=True)
    assert vm["state"] == "created"
    seen: list[str] = []
    t = threading.Thread(target=lambda: seen.append(api(
        "GET", f"/v1/vms/{vm['id']}/logs?follow=true", timeout=60).text))
    t.start()
    time.sleep(0.2)
    assert api.ok("POST", f"/v1/vms/{vm['id']}/start")["state"] == "running"
    assert any(v["id"] == vm["id"] for v in api.ok("GET", "/v1/vms")["vms"])
    killed = api.ok("POST", f"/v1/vms/{vm['id']}/kill")
    assert killed["exit"]["reason"] == "killed"  # the answer carries the exit: the VM is gone after it
    t.join(30)
    assert not t.is_alive() and seen  # the follower's stream ended with the VM
    deadline = time.monotonic() + 10
    while api("GET", f"/v1/vms/{vm['id']}").status != 404:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_start_with_wait_answers_once_the_vm_has_ended(api: Api) -> None:
    vm = api.create("hello", "4", ephemeral=True)
    done = api.ok("POST", f"/v1/vms/{vm['id']}/start?wait=true")
    assert done["state"] == "exited" and done["exit"]["code"] == 4 and done["exit"]["reason"] == "exit"
    persistent = api.create("hello", "6")
    done = api.ok("POST", f"/v1/vms/{persistent['id']}/start?wait=true")
    assert done["exit"]["code"] == 6
    assert api.vm(persistent["id"])["state"] == "exited"  # a VM that is not ephemeral stays
    api.ok("DELETE", f"/v1/vms/{persistent['id']}")


def test_ephemeral_vm_cannot_have_a_cow_disk(api: Api) -> None:
    r = api("POST", "/v1/vms", {"image": "hello", "ephemeral": True, "disks": [{"name": "x", "mode": "cow"}]})
    assert r.status == 400 and r.code == "invalid_disk", r.text
    r = api("POST", "/v1/vms", {"image": "hello", "ephemeral": "yes"})
    assert r.status == 400 and "ephemeral" in r.message


def test_force_remove_races_running_slices_safely(api: Api) -> None:
    """`rm -f` right after start: the store is closed only once the running slice is back (no polling)."""
    for _ in range(20):
        vm = api.create("spin", "900000000000", start=True)
        assert api("DELETE", f"/v1/vms/{vm['id']}?force=true").status == 204
        assert api("GET", f"/v1/vms/{vm['id']}").status == 404
    assert api.ok("GET", "/v1/info")["vms"]["running"] >= 0  # the daemon is still serving


def test_run_rm_that_runs_out_of_fuel_leaves_nothing_behind(daemon: Daemon, api: Api) -> None:
    before = {v["id"] for v in api.ok("GET", "/v1/vms?all=true")["vms"]}
    r = daemon.cli("run", "--rm", "--fuel", "100000", "spin", "30000000")
    assert r.returncode == 137 and "out_of_fuel" in r.stderr, r.stderr
    assert {v["id"] for v in api.ok("GET", "/v1/vms?all=true")["vms"]} - before == set()


def test_a_restore_with_a_name_no_vm_may_have_is_a_400(api: Api) -> None:
    vm = api.create("hello")
    assert api("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "name-check"}).status == 201
    for bad in (".", "..", "a/b", "tab\there", "x" * 129):
        r = api("POST", "/v1/snapshots/name-check/restore", {"name": bad})
        assert r.status == 400, (bad, r.status, r.text)
    assert api("GET", "/v1/vms?all=true").status == 200  # the listing is whole
    api.ok("DELETE", "/v1/snapshots/name-check")
    api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")
