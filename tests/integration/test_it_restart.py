"""A VM that ended runs again: `start` of an exited or stopped VM (docker start) and restart policies
(`--restart no|on-failure[:N]|always|unless-stopped`), through the real client and a real daemon."""
from __future__ import annotations

import json
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

from mvapi import Daemon, until


def uname(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def test_start_runs_an_exited_vm_again_and_keeps_its_console(daemon: Daemon) -> None:
    name = uname("again")
    daemon.mv("create", "--name", name, "hello", "0")
    daemon.mv("start", name)
    assert daemon.cli("wait", name).returncode == 0
    first = daemon.inspect(name)
    assert first["state"] == "exited" and first["restart_count"] == 0
    daemon.mv("start", name)
    assert daemon.cli("wait", name).returncode == 0
    again = daemon.inspect(name)
    assert again["state"] == "exited"
    assert again["started"] > first["started"]
    assert again["id"] == first["id"]
    assert daemon.mv("logs", name).count("Hello from microvmd!") == 2


def test_start_runs_a_stopped_vm_again(daemon: Daemon) -> None:
    name = uname("stopped")
    daemon.mv("run", "-d", "--name", name, "--env", "INTERVAL_MS=20", "counter")
    until(lambda: "3\n" in daemon.logs(name), what="counter output")
    daemon.mv("stop", name)
    assert daemon.inspect(name)["state"] == "stopped"
    daemon.mv("start", name)
    vm = daemon.inspect(name)
    assert vm["state"] == "running" and vm["exit"] is None
    # the new run counts from 1 again, after the earlier output
    until(lambda: daemon.logs(name).count("1\n") >= 2, what="the second run's output")
    assert name in daemon.mv("ps")
    daemon.mv("rm", "-f", name)


def test_on_failure_restarts_up_to_n_times_with_a_back_off(daemon: Daemon) -> None:
    name = uname("fail")
    t0 = time.monotonic()
    daemon.mv("run", "-d", "--name", name, "--restart", "on-failure:2", "hello", "3")
    vm = until(lambda: (v := daemon.inspect(name))["restart_count"] == 2 and v["state"] == "exited"
               and not v["restarting"] and v, what="two restarts")
    took = time.monotonic() - t0
    assert took >= 0.1 + 0.2 - 0.05, took  # 100 ms, then 200 ms of back-off
    assert vm["restart_policy"] == "on-failure:2" and vm["spec"]["restart"] == "on-failure:2"
    assert vm["exit"]["code"] == 3
    time.sleep(0.6)  # no third restart
    assert daemon.inspect(name)["restart_count"] == 2
    assert daemon.mv("logs", name).count("Hello from microvmd!") == 3
    ps = daemon.mv("ps", "-a")
    assert any(name in line and "on-failure:2 (2)" in line for line in ps.splitlines()), ps
    # a clean exit is not a failure
    ok = uname("ok")
    daemon.mv("run", "-d", "--name", ok, "--restart", "on-failure", "hello", "0")
    daemon.cli("wait", ok)
    time.sleep(0.4)
    assert daemon.inspect(ok)["restart_count"] == 0


def test_always_restarts_but_not_after_a_user_stop(daemon: Daemon) -> None:
    name = uname("always")
    daemon.mv("run", "-d", "--name", name, "--restart", "always", "hello", "0")
    until(lambda: daemon.inspect(name)["restart_count"] >= 2, what="restarts of a VM that exits 0")
    daemon.mv("stop", name)  # running, or waiting for its back-off: either way it stays down
    time.sleep(0.5)
    vm = daemon.inspect(name)
    count = vm["restart_count"]
    assert vm["state"] in ("exited", "stopped") and not vm["restarting"]
    time.sleep(0.5)
    assert daemon.inspect(name)["restart_count"] == count
    daemon.mv("rm", "-f", name)


def test_a_bad_policy_and_rm_with_restart_are_refused(daemon: Daemon) -> None:
    r = daemon.cli("run", "-d", "--restart", "sometimes", "hello")
    assert r.returncode == 2 and "--restart" in r.stderr
    r = daemon.cli("run", "--rm", "--restart", "always", "hello")
    assert r.returncode == 2
    status, doc = daemon.call("POST", "/v1/vms", {"image": "hello", "restart": "on-failure:x"})
    assert status == 400 and doc["error"]["code"] == "invalid_restart_policy", doc


def test_policies_across_a_daemon_restart(make_daemon: Callable[..., Daemon]) -> None:
    from mvapi import IMAGES
    d = make_daemon("--import-images", str(IMAGES))
    d.mv("run", "-d", "--name", "a", "--restart", "always", "--env", "INTERVAL_MS=20", "counter")
    d.mv("run", "-d", "--name", "u", "--restart", "unless-stopped", "--env", "INTERVAL_MS=20", "counter")
    d.mv("run", "-d", "--name", "us", "--restart", "unless-stopped", "--env", "INTERVAL_MS=20", "counter")
    d.mv("run", "-d", "--name", "as", "--restart", "always", "--env", "INTERVAL_MS=20", "counter")
    d.mv("run", "-d", "--name", "n", "--env", "INTERVAL_MS=20", "counter")
    d.mv("stop", "us")
    d.mv("stop", "as")
    d.stop(signal.SIGKILL)
    d.start()
    states = {n: json.loads(d.mv("--json", "inspect", n))["state"] for n in ("a", "u", "us", "as", "n")}
    until(lambda: all(json.loads(d.mv("--json", "inspect", n))["state"] == "running" for n in ("a", "u", "as")),
          what="policy restarts at daemon start")
    states = {n: json.loads(d.mv("--json", "inspect", n))["state"] for n in ("a", "u", "us", "as", "n")}
    # docker: always comes back even when the user had stopped it; unless-stopped does not; no never does
    assert states == {"a": "running", "u": "running", "us": "stopped", "as": "running", "n": "stopped"}, states


def test_migrate_to_a_daemon_that_is_down_says_so_plainly(daemon: Daemon, tmp_path: Any) -> None:
    name = uname("mig")
    daemon.mv("create", "--name", name, "hello")
    r = daemon.cli("migrate", name, "--to", f"unix://{tmp_path}/nobody.sock")
    assert r.returncode == 125 and "ssl:default" not in r.stderr, r.stderr
    assert "No such file or directory" in r.stderr and "start it with" in r.stderr, r.stderr
