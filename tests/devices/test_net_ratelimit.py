"""The socket device's rate limiter observably slows a guest, holds no thread while it waits, and shows
its configuration and throttled time in inspect."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class _U(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)


def call(sock: str, method: str, path: str, body: object = None) -> tuple[int, object]:
    c = _U(sock)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data) if data else None


@pytest.fixture(scope="module")
def sock():
    root = Path(tempfile.mkdtemp(prefix="mvd-nrl-", dir="/tmp"))
    path = str(root / "s.sock")
    log = open(root / "log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "microvmd.daemon", "--socket", path, "--state-dir",
                             str(root / "state"), "--import-images", str(ROOT / "images")],
                            stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(400):
        if os.path.exists(path):
            try:
                call(path, "GET", "/v1/info")
                break
            except OSError:
                pass
        time.sleep(0.05)
    yield path
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    log.close()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _echo_time(sock: str, limiter: object, nbytes: int) -> tuple[float, dict]:
    port = _free_port()
    st, vm = call(sock, "POST", "/v1/vms", {"image": "echo", "start": True, "net_rate_limiter": limiter,
                                            "publish": [{"guest_port": 8000, "host_port": port}]})
    assert st == 201, vm
    assert isinstance(vm, dict)
    deadline = time.time() + 10
    while True:
        try:
            c = socket.create_connection(("127.0.0.1", port), 1)
            break
        except OSError:
            assert time.time() < deadline
            time.sleep(0.05)
    c.settimeout(30)
    data = b"r" * nbytes
    t0 = time.perf_counter()
    sender = threading.Thread(target=c.sendall, args=(data,))
    sender.start()
    got = 0
    while got < nbytes:
        d = c.recv(65536)
        assert d, "echo closed the connection"
        got += len(d)
    elapsed = time.perf_counter() - t0
    sender.join()
    c.close()
    st, info = call(sock, "GET", f"/v1/vms/{vm['id']}")
    call(sock, "DELETE", f"/v1/vms/{vm['id']}?force=true")
    assert isinstance(info, dict)
    return elapsed, info["devices"]["net"]


def test_bandwidth_limit_slows_the_guest(sock: str) -> None:
    free, net_free = _echo_time(sock, None, 200_000)
    # 100 kB/s, a full bucket of 100 kB to start: 400 kB (in + out) needs about 3 s
    limited, net = _echo_time(sock, {"bandwidth": {"size": 100_000, "refill_time": 1000}}, 200_000)
    assert net_free["rate_limiter"] is None and net_free["stats"]["throttled_s"] == 0
    assert net["rate_limiter"]["bandwidth"]["size"] == 100_000
    assert net["stats"]["throttled_s"] > 1.0
    assert limited > 1.5 and limited > 5 * free, (free, limited)


def test_bad_limiter_is_refused(sock: str) -> None:
    st, body = call(sock, "POST", "/v1/vms", {"image": "echo", "net_rate_limiter": {"bandwidth": {"size": -1}}})
    assert st == 400, body
    assert isinstance(body, dict) and body["error"]["code"] == "invalid_field"
