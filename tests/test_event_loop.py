"""The daemon's event loop is never blocked: guests, compiles, file I/O and hashing all run in threads.

The daemon measures its own loop lag (microvmd/looplag.py). Here we put it under the kinds of load that
would block a careless loop (many busy guests, image compiles, log streaming, snapshots and exports) and
require that no stall above 100 ms was seen.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from mvapi import IMAGES, Daemon


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with Daemon.fresh("mvd-loop-", "--import-images", str(IMAGES)) as d:
        yield d


def test_loop_never_blocks_under_load(daemon: Daemon) -> None:
    vms = []
    for _ in range(8):  # more busy guests than cores
        st, out = daemon.call("POST", "/v1/vms", {"image": "spin", "args": ["300000000"], "start": True})
        assert st == 201, out
        vms.append(out["id"])
    st, out = daemon.call("POST", "/v1/vms", {"image": "counter", "env": {"INTERVAL_MS": "5"}, "start": True})
    counter = out["id"]

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
            daemon.call("GET", "/v1/info")
            lat.append(time.perf_counter() - t)
            time.sleep(0.01)

    poller = threading.Thread(target=poll_info)
    poller.start()
    try:
        for i in range(3):  # compiles of fresh modules (distinct digests) on the I/O pool
            wat = f'(module (memory (export "memory") 1) (func (export "_start") (drop (i32.const {i}))))'
            assert daemon.call("POST", "/v1/images", raw=wat.encode())[0] == 201
        big = (IMAGES / "kv" / "kv.wasm").read_bytes()
        assert daemon.call("POST", "/v1/images?name=kv-again", raw=big)[0] in (201, 200)
        for vm in vms[:3]:
            assert daemon.call("GET", f"/v1/vms/{vm}/logs")[0] == 200
        for i in range(3):
            st, out = daemon.call("POST", f"/v1/vms/{counter}/snapshots", {"name": f"s{i}"})
            assert st == 201, out
            assert daemon.call("GET", f"/v1/snapshots/s{i}/export")[0] == 200
        for vm in vms:
            assert daemon.call("POST", f"/v1/vms/{vm}/wait")[0] == 200
    finally:
        stop.set()
        poller.join()
        meter.join()
    st, out = daemon.call("GET", "/v1/info")
    loop = out["event_loop"]
    machine_ms = max(control) * 1000
    # On a quiet machine the daemon's loop must never lag 100 ms. When the machine itself is starved (other
    # work on the cores: the control thread above lags too), only lag well beyond the machine's counts.
    allowed_ms = max(100.0, 1.5 * machine_ms + 50)
    assert loop["max_lag_ms"] < allowed_ms, \
        f"event loop blocked: {loop} (machine lag {machine_ms:.0f} ms); daemon log:\n{daemon.log()[-3000:]}"
    assert lat, "the poller never got an answer"
