"""The daemon's event loop is never blocked: guests, compiles, file I/O and hashing all run in threads.

The daemon measures its own loop lag (microvmd/looplag.py). Here we put it under the kinds of load that
would block a careless loop (many busy guests, image compiles, log streaming, snapshots and exports) and
require that no stall above 100 ms was seen.
"""
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

ROOT = Path(__file__).resolve().parent.parent


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(self.path)


def call(sock: str, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, bytes]:
    c = _UnixHTTP(sock)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    c.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, out


@pytest.fixture
def daemon():
    root = Path(tempfile.mkdtemp(prefix="mvd-loop-", dir="/tmp"))
    sock = str(root / "s.sock")
    log = open(root / "log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "microvmd.daemon", "--socket", sock, "--state-dir",
                             str(root / "state"), "--import-images", str(ROOT / "images")],
                            stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(300):
        if os.path.exists(sock):
            try:
                if call(sock, "GET", "/v1/info")[0] == 200:
                    break
            except OSError:
                pass
        time.sleep(0.05)
    yield sock, root
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    log.close()


def test_loop_never_blocks_under_load(daemon) -> None:
    sock, root = daemon
    vms = []
    for _ in range(8):  # more busy guests than cores
        st, out = call(sock, "POST", "/v1/vms", {"image": "spin", "args": ["300000000"], "start": True})
        assert st == 201, out
        vms.append(json.loads(out)["id"])
    st, out = call(sock, "POST", "/v1/vms", {"image": "counter", "env": {"INTERVAL_MS": "5"}, "start": True})
    counter = json.loads(out)["id"]

    stop = threading.Event()
    lat: list[float] = []
    control: list[float] = []  # this process's own wake-up lag: how starved the whole machine is

    def measure_machine() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.02)
            control.append(time.perf_counter() - t - 0.02)

    meter = threading.Thread(target=measure_machine)
    meter.start()

    def poll_info() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            call(sock, "GET", "/v1/info")
            lat.append(time.perf_counter() - t)
            time.sleep(0.01)

    poller = threading.Thread(target=poll_info)
    poller.start()
    try:
        for i in range(3):  # compiles of fresh modules (distinct digests) on the I/O pool
            wat = f'(module (memory (export "memory") 1) (func (export "_start") (drop (i32.const {i}))))'
            assert call(sock, "POST", "/v1/images", raw=wat.encode())[0] == 201
        big = (ROOT / "images" / "kv" / "kv.wasm").read_bytes()
        assert call(sock, "POST", "/v1/images?name=kv-again", raw=big)[0] in (201, 200)
        for vm in vms[:3]:
            assert call(sock, "GET", f"/v1/vms/{vm}/logs")[0] == 200
        for i in range(3):
            st, out = call(sock, "POST", f"/v1/vms/{counter}/snapshots", {"name": f"s{i}"})
            assert st == 201, out
            assert call(sock, "GET", f"/v1/snapshots/s{i}/export")[0] == 200
        for vm in vms:
            assert call(sock, "POST", f"/v1/vms/{vm}/wait")[0] == 200
    finally:
        stop.set()
        poller.join()
        meter.join()
    st, out = call(sock, "GET", "/v1/info")
    loop = json.loads(out)["event_loop"]
    machine_ms = max(control) * 1000
    # On a quiet machine the daemon's loop must never lag 100 ms. When the machine itself is starved (other
    # work on the cores: the control thread above lags too), only lag well beyond the machine's counts.
    allowed_ms = max(100.0, 1.5 * machine_ms + 50)
    assert loop["max_lag_ms"] < allowed_ms, f"event loop blocked: {loop} (machine lag {machine_ms:.0f} ms); see {root}/log"
    assert lat, "the poller never got an answer"
