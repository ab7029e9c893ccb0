"""The daemon process: graceful SIGTERM, recovery after SIGKILL, what survives a restart, the client's
exit statuses around it, and systemd socket activation and readiness notification."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mvapi import IMAGES, REPO, SOCKET_ACTIVATE, Daemon, cli, request

HUGE = "900000000000"
HELLO = str(IMAGES / "hello" / "hello.wasm")
SPIN = str(IMAGES / "spin" / "spin.wasm")
HELLO_LINES = ["Hello from microvmd!", "arg[1]=3", "WHO=persist"]


def _prepare(d: Daemon) -> dict[str, str]:
    """Images, an exited VM with logs, and live VMs in each live state."""
    for f in (HELLO, SPIN):
        r = d.cli("image", "import", f)
        assert r.returncode == 0, r.stderr
    assert d.cli("run", "--name", "done", "--env", "WHO=persist", "hello", "3").returncode == 3
    api = d.api
    busy = api.create("spin", HUGE, name="busy", start=True)
    paused = api.create("spin", HUGE, name="held", start=True)
    api.wait_state(paused["id"], "running")
    api.ok("POST", f"/v1/vms/{paused['id']}/pause")
    parked = api.create("spin", HUGE, name="parked", fuel=1_000_000, start=True)
    api.wait_state(parked["id"], "out_of_fuel")
    created = api.create("hello", name="fresh")
    api.wait_state(busy["id"], "running")
    assert "spinning for" in api.logs(busy["id"])
    return {"busy": busy["id"], "held": paused["id"], "parked": parked["id"], "fresh": created["id"]}


def _check_survivors(d: Daemon) -> None:
    names = {i["name"] for i in d.api.ok("GET", "/v1/images")["images"]}
    assert {"hello", "spin"} <= names
    r = d.cli("logs", "done")
    assert r.returncode == 0 and r.stdout.splitlines() == HELLO_LINES, (r.stdout, r.stderr)
    done = d.api.vm("done")
    assert done["state"] == "exited" and done["exit"]["code"] == 3
    # the restarted daemon runs guests
    assert d.cli("run", "--rm", "hello", "4").returncode == 4


# ------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_stops_guests_exits_0_and_removes_the_socket(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    ids = _prepare(d)
    t0 = time.monotonic()
    rc = d.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - t0
    assert rc == 0, d.log()
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert not d.socket.exists()
    assert "Traceback" not in d.log(), d.log()

    d.start()
    _check_survivors(d)
    for name, vm_id in ids.items():
        vm = d.api.vm(vm_id)
        assert vm["state"] == "stopped", (name, vm)
        assert vm["exit"]["code"] is None and vm["exit"]["reason"] == "stopped", (name, vm["exit"])
    # and they stay down (no restart policy) until a user starts one again, which runs it from its image
    r = d.api("POST", f"/v1/vms/{ids['busy']}/start")
    assert r.status == 200 and r.json()["state"] == "running", r.text


def test_sigterm_shutdown_is_clean_on_stderr(make_daemon: Callable[..., Daemon]) -> None:
    """No warnings at shutdown (an un-awaited coroutine used to leak one here)."""
    d = make_daemon()
    assert d.stop(signal.SIGTERM) == 0
    log = d.log()
    assert "never awaited" not in log and "Warning" not in log, log


def test_sigint_also_stops_cleanly(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    assert d.stop(signal.SIGINT) == 0
    assert not d.socket.exists()


# ------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_then_restart_marks_live_vms_daemon_restart(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    ids = _prepare(d)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert d.socket.exists()  # stale socket left behind: the next daemon must take it over

    d.start()
    _check_survivors(d)
    for name in ("busy", "held", "parked"):
        vm = d.api.vm(ids[name])
        assert vm["state"] == "stopped", (name, vm)
        assert vm["exit"]["reason"] == "daemon_restart" and vm["exit"]["code"] is None, (name, vm["exit"])
    assert "spinning for" in d.api.logs(ids["busy"])
    ps = d.cli("ps", "-a")
    assert "busy" in ps.stdout and "busy" not in d.cli("ps").stdout
    w = d.cli("wait", "busy")
    assert w.returncode == 137 and "daemon_restart" in w.stderr, (w.returncode, w.stderr)
    r = d.api("POST", f"/v1/vms/{ids['busy']}/start")  # docker start: from its image again
    assert r.status == 200 and r.json()["state"] == "running", r.text
    assert d.api.ok("DELETE", f"/v1/vms/{ids['busy']}?force=true") is None


def test_directories_made_in_advance_are_used_and_never_outlive_the_daemon(
        make_daemon: Callable[..., Daemon]) -> None:
    """VM directories (with empty console logs and an empty record file, synced) are made ahead of the creates
    that use them; unused ones are removed at a clean stop, and after a kill -9 the next start removes them
    without a word."""
    d = make_daemon("--import-images", str(IMAGES))
    vms = d.state_dir / "vms"

    def spare() -> set[str]:
        return {p.name for p in vms.iterdir() if not (p / "vm.json").exists() or not (p / "vm.json").stat().st_size}

    ready = spare()
    assert ready, "no directory made in advance at start-up"
    vm_id = d.cli("run", "-d", "hello").stdout.strip()
    assert vm_id in ready  # a create takes one of them
    assert d.cli("wait", vm_id).returncode == 0
    assert "Hello from microvmd!" in d.api.logs(vm_id, "stdout")
    deadline = time.monotonic() + 10
    while (vm_id in spare() or len(spare()) < len(ready) - 1) and time.monotonic() < deadline:
        time.sleep(0.05)  # its record is written with the next batch; the pool is topped up
    assert vm_id not in spare() and len(spare()) >= len(ready) - 1
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    left = spare()
    assert left  # kill -9 leaves them behind...
    d.start()
    assert not (left & spare())  # ...and the next daemon removes them (and makes fresh ones)
    assert "without a record" not in d.log()
    assert d.api.vm(vm_id)["state"] == "exited"
    assert d.stop() == 0
    assert spare() == set()  # a clean stop leaves none


def test_second_daemon_refuses_a_live_socket(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon()
    p = subprocess.run([sys.executable, "-m", "microvmd.daemon", "--socket", str(d.socket), "--state-dir",
                        str(tmp_path / "other")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode != 0
    assert "already" in (p.stderr + p.stdout), p.stderr
    assert request(d.socket, "GET", "/v1/info").status == 200  # the first one is unharmed


def test_socket_directory_mode_is_set_only_when_the_daemon_makes_it(make_daemon: Callable[..., Daemon]) -> None:
    """Issue 13 row 3: `--socket DIR/x.sock` used to chmod an existing DIR to 0750 (/tmp lost 1777)."""
    d = make_daemon(start=False)
    shared = d.root / "pub"
    shared.mkdir()
    shared.chmod(0o1777)
    d.socket = shared / "m.sock"
    d.start()
    assert request(d.socket, "GET", "/v1/info").status == 200
    assert oct(shared.stat().st_mode & 0o7777) == oct(0o1777)
    d.stop()
    fresh = d.root / "made" / "run"  # neither exists: the daemon makes both, the socket's own one 0750
    d.socket = fresh / "m.sock"
    d.start()
    assert request(d.socket, "GET", "/v1/info").status == 200
    assert oct(fresh.stat().st_mode & 0o7777) == oct(0o750)


def test_vms_that_failed_for_want_of_descriptors_leave_no_directory(make_daemon: Callable[..., Daemon]) -> None:
    """Issue 13 row 13: out of descriptors, a create's record write and the removal of its directory both
    failed, and the directory stayed under the state dir, listed nowhere. Now a create whose record cannot
    be written is undone, and a directory that cannot be deleted yet is deleted at the next chance."""
    import resource
    d = make_daemon()
    assert d.cli("image", "import", HELLO, "--name", "hello").returncode == 0
    time.sleep(0.3)  # the directories made in advance are made
    soft, hard = resource.prlimit(d.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{d.pid}/fd")) + 4, hard))
    statuses = []
    try:
        for i in range(20):
            try:
                statuses.append(request(d.socket, "POST", "/v1/vms", {"image": "hello", "name": f"fd{i}"}).status)
            except OSError:
                statuses.append(0)  # the accept itself found no descriptor (row 1)
    finally:
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert any(s >= 400 or s == 0 for s in statuses), statuses  # the limit did bite
    assert all(s < 500 or s == 503 for s in statuses), statuses
    for _ in range(50):  # (a connection accepted while descriptors ran out may still be reset: try again)
        try:
            vm = d.api.create("hello", name="after")  # the next record write sweeps what is left over
            break
        except OSError:
            time.sleep(0.1)
    assert d.api("DELETE", f"/v1/vms/{vm['id']}").status == 204
    listed = {v["id"] for v in d.api.ok("GET", "/v1/vms?all=true")["vms"]}
    unlisted = set(os.listdir(d.state_dir / "vms")) - listed
    assert len(unlisted) <= 8, sorted(unlisted)  # at most the directories made in advance for the next creates
    assert d.stop() == 0
    assert set(os.listdir(d.state_dir / "vms")) == listed  # and a clean stop removes those


# ------------------------------------------------------------------------------------------ client UX
def test_client_exit_statuses_without_and_with_a_daemon(daemon: Daemon, tmp_path: Path) -> None:
    nowhere = tmp_path / "none.sock"
    for args in (["ps"], ["run", "--rm", "hello"], ["image", "ls"], ["info"]):
        r = cli(nowhere, *args)
        assert r.returncode == 125, (args, r.returncode, r.stderr)
        assert str(nowhere) in r.stderr and r.stderr.strip(), r.stderr
    r = cli(nowhere, "version")
    assert r.returncode in (0, 125) and "microvm" in r.stdout

    for args in ([], ["bogus"], ["run"], ["wait"], ["run", "--memory", "lots", "hello"],
                 ["run", "--timeout", "forever", "hello"], ["ps", "--bogus"], ["fuel", "add", "x", "-5"]):
        r = daemon.cli(*args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert r.stderr.strip()

    r = daemon.cli("version")
    assert r.returncode == 0, r.stderr
    info = daemon.api.ok("GET", "/v1/version")
    assert info["version"] in r.stdout and info["wasmtime_version"] in r.stdout
    js = json.loads(daemon.cli("--json", "version").stdout)
    assert js
    # MICROVM_SOCKET is read when --socket is absent
    r = cli(None, "ps", env={"MICROVM_SOCKET": str(daemon.socket)})
    assert r.returncode == 0, r.stderr
    # the API refusing a request is 125 with the API's message
    r = daemon.cli("inspect", "no-such-vm-at-all")
    assert r.returncode == 125 and "no-such-vm-at-all" in r.stderr


# ------------------------------------------------------------------------------------------ systemd


def _recv_until(sock: socket.socket, word: str, timeout: float = 30.0) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sock.settimeout(max(0.05, end - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(msg)
        if word in msg.split("\n"):
            return got
    raise AssertionError(f"no {word} from the daemon; got {got}")


def test_socket_activation_and_sd_notify(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon(start=False)
    d.root.mkdir(exist_ok=True)
    api_path = d.root / "activated.sock"
    notify_path = d.root / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(str(api_path))
        listener.listen(64)
        notify.bind(str(notify_path))
        d.env = {"NOTIFY_SOCKET": str(notify_path)}
        # --socket names a path the daemon must NOT bind: it serves the passed socket instead
        argv = [sys.executable, "-c", SOCKET_ACTIVATE, str(listener.fileno()), "microvmd.socket",
                "-m", "microvmd.daemon", "--socket", str(d.socket), "--state-dir", str(d.state_dir)]
        d.start(wait=False, popen_argv=argv, pass_fds=[listener.fileno()])
        msgs = _recv_until(notify, "READY=1")
        assert f"MAINPID={d.pid}" in "\n".join(msgs)  # exec kept the pid
        r = request(api_path, "GET", "/v1/info")
        assert r.status == 200, r.text
        listener.close()  # the daemon holds its own copy
        assert not d.socket.exists()
        assert d.proc is not None and d.proc.poll() is None
        assert cli(api_path, "run", "--rm", HELLO, "5").returncode == 5
        d.send_signal(signal.SIGTERM)
        _recv_until(notify, "STOPPING=1")
        assert d.proc.wait(30) == 0, d.log()
        assert api_path.exists()  # systemd owns the socket file; the daemon must leave it
    finally:
        listener.close()
        notify.close()


def test_listen_pid_of_another_process_is_ignored(make_daemon: Callable[..., Daemon]) -> None:
    """Inherited LISTEN_* meant for an ancestor: the daemon binds its own socket."""
    d = make_daemon(start=False, env={"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
    d.start()
    assert d.socket.exists()
    assert request(d.socket, "GET", "/v1/info").status == 200


def test_import_images_skips_the_fetched_interpreters_unless_asked(make_daemon: Callable[..., Daemon],
                                                                   tmp_path: Path) -> None:
    """An image directory with a SHA256SUMS holds a fetched module (scripts/fetch-interpreters: python, js):
    --import-images leaves it out, so a test daemon never compiles and rewrites CPython; --import-fetched
    (make run) imports it too."""
    imgs = tmp_path / "imgs"
    for name, fetched in (("hello", False), ("interp", True)):
        (imgs / name).mkdir(parents=True)
        (imgs / name / f"{name}.wasm").write_bytes(Path(HELLO).read_bytes())
        if fetched:
            (imgs / name / "SHA256SUMS").write_text(f"0  {name}.wasm\n")
    (imgs / "empty").mkdir()  # a directory without its module is skipped as before

    def names(d: Daemon) -> set[str]:
        return {n for img in d.api.ok("GET", "/v1/images")["images"] for n in img["names"]}

    assert names(make_daemon("--import-images", str(imgs))) == {"hello"}
    assert names(make_daemon("--import-images", str(imgs), "--import-fetched")) == {"hello", "interp"}
