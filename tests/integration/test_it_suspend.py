"""Suspend on a clean stop: SIGTERM snapshots every running VM whose restart policy keeps it (always,
unless-stopped); the next daemon resumes each where it was, in its own record and console, with its
published ports bound again. One that cannot be snapshotted starts again from its image."""
from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from mvapi import IMAGES, Daemon, free_port, line_rpc, until


def numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"^(\d+)$", text, re.M)]


def test_a_clean_stop_suspends_and_the_next_start_resumes(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    d.mv("run", "-d", "--name", "c", "--restart", "always", "--env", "INTERVAL_MS=30", "counter")
    d.mv("run", "-d", "--name", "n", "--env", "INTERVAL_MS=30", "counter")  # no policy: stopped, stays so
    d.mv("run", "-d", "--name", "s", "--restart", "unless-stopped", "spin", "100000000000")  # no Asyncify
    time.sleep(1.0)
    before = numbers(d.logs("c"))
    assert d.stop(signal.SIGTERM) == 0
    assert re.search(r"suspended 1 of 2 VMs in [0-9.]+ ms", d.log()), d.log()
    d.start()
    time.sleep(1.0)
    seq = numbers(d.logs("c"))
    assert seq == list(range(1, len(seq) + 1)), seq  # continued where it was: no gap, no restart from 1
    assert len(seq) > len(before) + 5
    c = d.get("c")
    assert c["state"] == "running" and c["restart_count"] == 0
    assert d.get("n")["state"] == "stopped"
    assert d.get("s")["state"] == "running"  # started again from its image
    assert re.search(r"resumed 1 of 1 suspended or checkpointed VMs, the last [0-9.]+ ms after start-up began", d.log()), d.log()
    assert not any(s["name"].startswith("suspend-") for s in d.ok("GET", "/v1/snapshots")["snapshots"])
    assert d.cli("system", "check").returncode == 0


def test_published_ports_are_bound_again_after_a_resume(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    port = free_port()
    d.mv("run", "-d", "--name", "e", "--restart", "always", "--publish", f"{port}:8000", "echo")
    assert line_rpc(port, "hi", retry=10.0).strip().endswith("hi")
    d.stop(signal.SIGTERM)
    d.start()
    assert line_rpc(port, "again", retry=10.0).strip().endswith("again")
    assert d.get("e")["state"] == "running"


def test_a_paused_vm_comes_back_paused(make_daemon: Callable[..., Daemon]) -> None:
    """Suspended VMs resume in the state they had: a paused one stays paused until the user resumes it."""
    d = make_daemon("--import-images", str(IMAGES))
    d.mv("run", "-d", "--name", "p", "--restart", "always", "--env", "INTERVAL_MS=30", "counter")
    until(lambda: len(numbers(d.logs("p"))) >= 3, what="counter output")
    d.mv("pause", "p")
    before = numbers(d.logs("p"))
    assert d.stop(signal.SIGTERM) == 0
    assert re.search(r"suspended 1 of 1 VMs", d.log()), d.log()
    d.start()
    until(lambda: "resumed 1 of 1" in d.log(), what="the resume")
    assert d.get("p")["state"] == "paused"
    assert numbers(d.logs("p")) == before  # it did not run on its own
    d.mv("resume", "p")
    until(lambda: len(numbers(d.logs("p"))) > len(before) + 3, what="output after resume")
    seq = numbers(d.logs("p"))
    assert seq == list(range(1, len(seq) + 1)), seq  # and continues where it was
    assert d.get("p")["state"] == "running"
