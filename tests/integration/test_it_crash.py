"""Crash tests: kill -9 of the daemon at random moments under a mixed load (runs, snapshots, removals,
disk writes), many rounds. After each restart `system check` is clean, every listed snapshot restores, and
nothing the API acknowledged (and did not later remove) is missing."""
from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from mvapi import IMAGES, Api, Daemon

ROUNDS = 50


class Load(threading.Thread):
    """Runs, snapshots, removals and disk writes through the API, recording what was acknowledged."""

    def __init__(self, api: Api, round_: int) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.round = round_
        self.acked_snapshots: set[str] = set()
        self.acked_vms: set[str] = set()
        self.removed: set[str] = set()
        self.stop = False

    def run(self) -> None:
        i = 0
        while not self.stop:
            i += 1
            tag = f"r{self.round}-{i}"
            try:
                vm = self.api.ok("POST", "/v1/vms", {"image": "counter", "name": f"l-{tag}", "start": True,
                                                     "env": {"INTERVAL_MS": "10"}})
                self.acked_vms.add(vm["id"])
                self.api.ok("POST", "/v1/vms", {"image": "hello", "start": True, "ephemeral": True})
                self.api.ok("POST", f"/v1/vms/{vm['id']}/snapshots", {"name": f"s-{tag}"})
                self.acked_snapshots.add(f"s-{tag}")
                # a removal counts from when it is asked for: the daemon may do it and die before answering
                if i % 2 == 0:
                    self.removed.add(f"s-{tag}")
                    self.api.ok("DELETE", f"/v1/snapshots/s-{tag}")
                self.removed.add(vm["id"])
                self.api.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")
                w = self.api.ok("POST", "/v1/vms?wait=true", {
                    "image": "diskbench", "start": True, "disks": [{"name": "d"}],
                    "env": {"MODE": "randwrite", "BS": "4096", "TOTAL": "65536", "SEED": str(i)}})
                self.api.ok("DELETE", f"/v1/vms/{w['id']}?force=true")
            except (AssertionError, OSError, ValueError):
                return  # the daemon went away mid-request


@pytest.mark.slow
def test_kill_9_under_load_leaves_a_store_that_checks_clean(make_daemon: Callable[..., Daemon]) -> None:
    rng = random.Random(14)
    d = make_daemon("--import-images", str(IMAGES))
    d.ok("POST", "/v1/disks", {"name": "d", "size": 1 << 20})
    acked = 0
    for round_ in range(ROUNDS):
        load = Load(d.api, round_)
        load.start()
        time.sleep(rng.uniform(0.05, 0.8))
        d.stop(signal.SIGKILL)
        load.stop = True
        load.join(10)
        d.start()
        report: dict[str, Any] = d.ok("POST", "/v1/system/check")
        assert report["clean"], (round_, report["problems"])
        names = {s["name"] for s in d.ok("GET", "/v1/snapshots")["snapshots"]}
        acked += len(load.acked_snapshots)
        missing = load.acked_snapshots - load.removed - names
        assert not missing, (round_, missing)
        vms = {v["id"] for v in d.ok("GET", "/v1/vms?all=true")["vms"]}
        assert not (load.acked_vms - load.removed - vms), round_
        for name in sorted(names)[-3:]:  # every listed snapshot restores (the newest few each round)
            vm = d.ok("POST", f"/v1/snapshots/{name}/restore", {"name": f"x-{round_}-{name}"})
            d.ok("DELETE", f"/v1/vms/{vm['id']}?force=true")
        for name in names:
            d.ok("DELETE", f"/v1/snapshots/{name}")
    assert acked >= ROUNDS // 2, acked  # the load really ran: snapshots were acknowledged before the kills
