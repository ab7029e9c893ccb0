"""Durable by default: snapshots, images and VM records are fsynced before the API acknowledges them;
``?durable=false`` opts out per request (docs/operations.md, "Durability")."""
from __future__ import annotations

import signal
import time
from collections.abc import Callable

from mvapi import IMAGES, Daemon


def test_snapshot_is_fsynced_unless_the_request_opts_out(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    vm = d.ok("POST", "/v1/vms", {"image": "counter", "name": "c", "start": True, "env": {"INTERVAL_MS": "20"}})
    time.sleep(0.2)
    snap = d.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": "s-durable"})
    assert snap["stats"]["durable"] == 1 and snap["stats"]["sync_ms"] > 0
    fast = d.ok("POST", f"/v1/vms/{vm['id']}/snapshots?durable=false", {"name": "s-fast"})
    assert fast["stats"]["durable"] == 0
    img = d.api("POST", "/v1/images?name=h2&durable=false", raw=(IMAGES / "hello/hello.wasm").read_bytes())
    assert img.status in (200, 201)
    created = d.ok("POST", "/v1/vms?durable=false", {"image": "hello", "name": "fast"})
    # what was acknowledged is there after a kill -9 of the daemon
    d.stop(signal.SIGKILL)
    d.start()
    names = {s["name"] for s in d.ok("GET", "/v1/snapshots")["snapshots"]}
    assert {"s-durable", "s-fast"} <= names
    assert d.get("c")["state"] in ("stopped", "running")
    assert d.get(created["id"])["name"] == "fast"
    restored = d.ok("POST", "/v1/snapshots/s-durable/restore", {"name": "r", "start": True})
    assert restored["state"] == "running"
