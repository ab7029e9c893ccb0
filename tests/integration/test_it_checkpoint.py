"""Checkpoints: `--checkpoint-interval` snapshots a running VM as a chain of diffs (periodic full ones, old
links removed), and after a kill -9 of the daemon `--restart always` resumes it from the last checkpoint."""
from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable

from mvapi import IMAGES, Daemon


def numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"^(\d+)$", text, re.M)]


def test_kill_9_resumes_from_the_last_checkpoint(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon("--import-images", str(IMAGES))
    d.mv("run", "-d", "--name", "k", "--restart", "always", "--checkpoint-interval", "300ms",
         "--env", "INTERVAL_MS=30", "counter")
    time.sleep(2.0)
    vm = d.get("k")
    assert vm["checkpoint"] and vm["checkpoint"].startswith("ckpt-")
    assert not d.ok("GET", "/v1/snapshots")["snapshots"]  # checkpoints are listed with all=true only
    snaps = [s for s in d.ok("GET", "/v1/snapshots?all=true")["snapshots"] if s["name"].startswith("ckpt-")]
    assert 1 <= len(snaps) <= 2, snaps  # old links removed
    assert any(s["parent"] for s in snaps), snaps  # a diff chain
    at_crash = max(numbers(d.logs("k")))
    d.stop(signal.SIGKILL)
    d.start()
    time.sleep(1.0)
    seq = numbers(d.logs("k"))
    after = seq[seq.index(at_crash) + 1:]
    assert after and after[0] > 1, (at_crash, after[:5])  # from the checkpoint, not from the image
    assert after[0] >= at_crash - 20  # within about one interval (300 ms / 30 ms) of the crash
    assert max(seq) > at_crash and d.get("k")["state"] == "running"
    assert d.cli("system", "check").returncode == 0
    d.mv("rm", "-f", "k")
    time.sleep(0.3)
    assert not d.ok("GET", "/v1/snapshots?all=true")["snapshots"]
    assert "ckpt-" not in d.mv("snapshot", "ls", "-a")


def test_checkpoints_need_a_snapshottable_guest(daemon: Daemon) -> None:
    r = daemon.cli("run", "-d", "--checkpoint-interval", "1s", "spin", "1000")
    assert r.returncode == 125 and "not_snapshottable" in r.stderr, r.stderr
    r = daemon.cli("run", "-d", "--checkpoint-interval", "10ms", "counter")
    assert r.returncode == 2 and "50ms" in r.stderr


def test_a_vm_paused_after_its_last_checkpoint_comes_back_paused_after_a_crash(
        make_daemon: Callable[..., Daemon]) -> None:
    """The record holds what the user last asked for: a VM paused since its last checkpoint is resumed from
    that checkpoint paused (it was running when the checkpoint was taken); one resumed again runs on."""
    d = make_daemon("--import-images", str(IMAGES))
    for name in ("p", "r"):
        d.mv("run", "-d", "--name", name, "--restart", "always", "--checkpoint-interval", "300ms",
             "--env", "INTERVAL_MS=30", "counter")
    deadline = time.monotonic() + 30
    while not all(d.get(n)["checkpoint"] for n in ("p", "r")):
        assert time.monotonic() < deadline, [d.get(n)["checkpoint"] for n in ("p", "r")]
        time.sleep(0.05)
    d.mv("pause", "p")
    d.mv("pause", "r")
    d.mv("resume", "r")
    d.stop(signal.SIGKILL)
    d.start()
    deadline = time.monotonic() + 30
    while d.get("p")["state"] != "paused" or d.get("r")["state"] != "running":
        assert time.monotonic() < deadline, (d.get("p")["state"], d.get("r")["state"])
        time.sleep(0.05)
    before = max(numbers(d.logs("p")) or [0])
    d.mv("resume", "p")
    deadline = time.monotonic() + 30
    while max(numbers(d.logs("p")) or [0]) <= before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
