"""`microvm system check [--repair] | df | prune [--dry-run]` on a real daemon and a real state directory,
damaged on purpose (a flipped byte in a pack, an image file, a VM record)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

from mvapi import IMAGES, Daemon


def test_check_finds_damage_and_repair_moves_it_aside(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    vm = d.ok("POST", "/v1/vms", {"image": "counter", "name": "c", "start": True, "env": {"INTERVAL_MS": "20"}})
    d.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "good"})
    d.ok("POST", "/v1/vms", {"image": "hello", "name": "h"})
    r = d.cli("system", "check")
    assert r.returncode == 0 and "clean" in r.stdout, (r.stdout, r.stderr)
    checked = json.loads(d.mv("--json", "system", "check"))["checked"]
    assert checked["snapshots"] == 1 and checked["chunks"] > 0 and checked["vms"] == 2 and checked["images"] >= 3

    # damage: a byte of the snapshot's pack, an image's module, the record of a VM the daemon has not loaded
    state = d.state_dir
    pack = next((state / "snapshots" / "packs").glob("*.pack"))
    os.chmod(pack, 0o600)
    with open(pack, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    spin = d.ok("GET", "/v1/images/spin")["digest"].split(":")[1]
    (state / "images" / "blobs" / spin / "original.wasm").write_bytes(b"\0asm broken")
    stray = state / "vms" / ("f" * 32)
    stray.mkdir()
    (stray / "vm.json").write_text("{not json")

    r = d.cli("system", "check")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "snapshot good" in r.stdout and "corrupted" in r.stdout
    assert f"image sha256:{spin}" in r.stdout and "vm " + "f" * 32 in r.stdout
    r = d.cli("system", "check", "--repair")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout.count("repaired:") >= 3 and "lost+found" in r.stdout
    assert d.cli("system", "check").returncode == 0
    assert list((state / "lost+found").rglob("good.snap"))
    assert d.call("GET", "/v1/snapshots/good")[0] == 404


def test_df_and_prune(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    a = d.ok("POST", "/v1/vms", {"image": "counter", "name": "a", "start": True, "env": {"INTERVAL_MS": "20"}})
    d.ok("POST", f"/v1/vms/{a['id']}/pause")  # two snapshots of the same memory: every chunk shared
    d.ok("POST", f"/v1/vms/{a['id']}/snapshots", {"name": "s1"})
    d.ok("POST", f"/v1/vms/{a['id']}/snapshots", {"name": "s2"})
    d.ok("POST", f"/v1/vms/{a['id']}/resume")
    h = d.ok("POST", "/v1/vms", {"image": "hello", "name": "h", "start": True})
    d.wait(h["id"])
    df = json.loads(d.mv("--json", "system", "df"))
    assert df["snapshots"]["count"] == 2 and df["snapshots"]["bytes"] > 0
    assert df["shared_chunks"]["count"] > 0 and df["shared_chunks"]["saved"] > 0
    assert df["vms"]["count"] == 2 and df["total"] >= df["snapshots"]["bytes"]
    assert "shared chunks" in d.mv("system", "df")

    out = d.mv("system", "prune", "--dry-run")
    assert "would remove vm h" in out and "would remove image spin" in out and "would remove image counter" not in out
    assert d.get("h")["state"] == "exited"
    out = d.mv("system", "prune")
    assert "removed vm h" in out
    assert d.call("GET", "/v1/vms/h")[0] == 404 and d.get("a")["state"] == "running"
    images = {i["name"] for i in d.ok("GET", "/v1/images")["images"]}
    assert "counter" in images and "spin" not in images
    assert d.cli("system", "check").returncode == 0
