"""microvmd.systemd against real sockets and processes, and the unit files against systemd-analyze."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mvapi import SOCKET_ACTIVATE

from microvmd import systemd

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"

_ENV_VARS = (
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notify_path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"microvmd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


# --------------------------------------------------------------------------------------------------
# notify
# --------------------------------------------------------------------------------------------------
def test_notify_without_socket_is_a_noop() -> None:
    assert systemd.notify("READY=1") is False
    notifier = systemd.Notifier()
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False


def test_notify_path_socket(notify_path_socket: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=serving") is True
    assert _recv(notify_path_socket) == "READY=1\nSTATUS=serving"


def test_notify_abstract_socket(notify_abstract_socket: socket.socket) -> None:
    assert systemd.notify("WATCHDOG=1") is True
    assert _recv(notify_abstract_socket) == "WATCHDOG=1"


def test_notify_dead_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd.notify("READY=1") is False


def test_notify_rejects_relative_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative.sock")
    assert systemd.notify("READY=1") is False


def test_notifier_messages(notify_path_socket: socket.socket) -> None:
    notifier = systemd.Notifier()
    assert notifier.enabled
    assert notifier.ready("listening on\n/run/x.sock")
    assert _recv(notify_path_socket) == f"READY=1\nSTATUS=listening on /run/x.sock\nMAINPID={os.getpid()}"
    assert notifier.status("3 VMs running")
    assert _recv(notify_path_socket) == "STATUS=3 VMs running"
    assert notifier.watchdog()
    assert _recv(notify_path_socket) == "WATCHDOG=1"
    assert notifier.reloading()
    assert _recv(notify_path_socket) == "RELOADING=1"
    assert notifier.stopping()
    assert _recv(notify_path_socket) == "STOPPING=1"


def test_notifier_unset_env_keeps_working(notify_abstract_socket: socket.socket) -> None:
    notifier = systemd.Notifier(unset_env=True)
    assert "NOTIFY_SOCKET" not in os.environ
    assert notifier.stopping("bye")
    assert _recv(notify_abstract_socket) == "STOPPING=1\nSTATUS=bye"


async def test_notifier_watchdog_task(
    notify_path_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000")  # ping every 10 ms
    notifier = systemd.Notifier()
    assert notifier.watchdog_interval == pytest.approx(0.01)
    task = notifier.start_watchdog()
    assert task is not None
    assert notifier.start_watchdog() is task
    notify_path_socket.setblocking(False)
    loop = asyncio.get_running_loop()
    pings = [await asyncio.wait_for(loop.sock_recv(notify_path_socket, 64), 5) for _ in range(3)]
    await notifier.stop_watchdog()
    assert task.done()
    assert pings == [b"WATCHDOG=1"] * 3


async def test_notifier_without_watchdog_starts_no_task(notify_path_socket: socket.socket) -> None:
    assert systemd.Notifier().start_watchdog() is None


# --------------------------------------------------------------------------------------------------
# watchdog_interval
# --------------------------------------------------------------------------------------------------
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == pytest.approx(15.0)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    assert systemd.watchdog_interval(unset_env=True) == pytest.approx(0.5)
    assert "WATCHDOG_USEC" not in os.environ


# --------------------------------------------------------------------------------------------------
# listen_fds
# --------------------------------------------------------------------------------------------------
def test_listen_fds_ignores_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "api")
    assert systemd.listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


def test_listen_fds_unset_env_false_keeps_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds(unset_env=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


def test_listen_fds_nothing_passed() -> None:
    assert systemd.listen_fds() == []


# The socket goes to the child as systemd passes it (mvapi.SOCKET_ACTIVATE, LISTEN_FDNAMES=api).
# The "daemon": takes the socket over and serves one connection on it.
_SERVE = r"""
import json, os, socket, sys
from microvmd import systemd
named = systemd.listen_fds_with_names()
sock = named[0][1]
report = {
    "count": len(named),
    "name": named[0][0],
    "fileno": sock.fileno(),
    "family": int(sock.family),
    "type": int(sock.type),
    "listening": sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
    "inheritable": os.get_inheritable(sock.fileno()),
    "env_left": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
}
print(json.dumps(report), flush=True)
sock.settimeout(10)
conn, _ = sock.accept()
with conn:
    data = conn.recv(64)
    conn.sendall(b"pong:" + data)
sock.close()
"""


def test_listen_fds_socket_activation(tmp_path: Path) -> None:
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(8)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_ACTIVATE, str(listener.fileno()), "api", "-c", _SERVE],
            pass_fds=(listener.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
    finally:
        listener.close()  # the child owns the listening socket now
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"child printed nothing; stderr:\n{proc.stderr.read() if proc.stderr else ''}"
        report = json.loads(line)
        assert report == {
            "count": 1,
            "name": "api",
            "fileno": 3,
            "family": int(socket.AF_UNIX),
            "type": int(socket.SOCK_STREAM),
            "listening": 1,
            "inheritable": False,
            "env_left": [],
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(b"ping")
            assert client.recv(64) == b"pong:ping"
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --------------------------------------------------------------------------------------------------
# unit files
# --------------------------------------------------------------------------------------------------
def _parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_service_unit_settings() -> None:
    service = _parse_unit(UNITS / "microvmd.service")["Service"]
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "microvmd",
        "Group": "microvmd",
        "StateDirectory": "microvmd",
        "RuntimeDirectory": "microvmd",
        "RuntimeDirectoryMode": "0750",
        "WatchdogSec": "30s",
        "Restart": "on-failure",
        "TimeoutStopSec": "45s",
        "KillMode": "mixed",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "LimitNOFILE": "1048576",
    }
    for key, value in expect.items():
        assert service.get(key) == [value], key
    assert service["ExecStart"][0].startswith("/usr/local/bin/microvmd ")
    # The Wasm JIT needs W^X-violating mappings.
    assert "MemoryDenyWriteExecute" not in service
    unit = _parse_unit(UNITS / "microvmd.service")["Unit"]
    assert "microvmd.socket" in unit["Requires"][0].split()
    assert "microvmd.socket" in unit["After"][0].split()


def test_socket_unit_settings() -> None:
    sock = _parse_unit(UNITS / "microvmd.socket")["Socket"]
    assert sock["ListenStream"] == ["/run/microvmd/microvmd.sock"]
    assert sock["SocketMode"] == ["0660"]
    assert sock["SocketUser"] == ["microvmd"]
    assert sock["SocketGroup"] == ["microvmd"]
    assert sock["Accept"] == ["no"]


def test_sysctl_example() -> None:
    settings = {}
    for raw in (UNITS / "99-microvmd.conf").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert int(settings["vm.max_map_count"]) >= 1048576


def test_sysusers_creates_user(tmp_path: Path) -> None:
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [tool, f"--root={tmp_path}", str(UNITS / "sysusers.d-microvmd.conf")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^microvmd:x:\d+:\d+:.*:/var/lib/microvmd:", passwd, re.MULTILINE), passwd
    assert re.search(r"^microvmd:x:\d+:", (tmp_path / "etc" / "group").read_text(), re.MULTILINE)


# Messages systemd prints for real mistakes in a unit file (as opposed to environment-specific
# complaints such as a missing user, binary or running manager).
_SYNTAX_ERRORS = re.compile(
    r"Unknown key|Unknown section|Unknown lvalue|Failed to parse|Invalid section|"
    r"Missing '='|bad-setting|Assignment outside of section",
)


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    # /usr/local/bin/microvmd need not exist here: verify a copy that starts an existing binary.
    service = (UNITS / "microvmd.service").read_text()
    service = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", service, flags=re.MULTILINE)
    (tmp_path / "microvmd.service").write_text(service)
    shutil.copy(UNITS / "microvmd.socket", tmp_path / "microvmd.socket")
    result = subprocess.run(
        [tool, "verify", str(tmp_path / "microvmd.socket"), str(tmp_path / "microvmd.service")],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if _SYNTAX_ERRORS.search(line)]
    assert not problems, output


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    """The check above would notice a misspelt key: make sure the patterns match this systemd."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (no systemd on this machine)")
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nWatchdogSecs=30s\n")
    result = subprocess.run(
        [tool, "verify", str(bad)], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert _SYNTAX_ERRORS.search(result.stdout + result.stderr), result.stdout + result.stderr
