"""The socket device's rate limiter observably slows a guest, holds no thread while it waits, and shows
its configuration and throttled time in inspect."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from mvapi import IMAGES, Daemon, free_port


@pytest.fixture(scope="module")
def mvd() -> Iterator[Daemon]:
    with Daemon.fresh("mvd-nrl-", "--import-images", str(IMAGES)) as d:
        yield d


def _echo_time(mvd: Daemon, limiter: object, nbytes: int) -> tuple[float, dict]:
    port = free_port()
    st, vm = mvd.call("POST", "/v1/vms", {"image": "echo", "start": True, "net_rate_limiter": limiter,
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
    st, info = mvd.call("GET", f"/v1/vms/{vm['id']}")
    mvd.call("DELETE", f"/v1/vms/{vm['id']}?force=true")
    assert isinstance(info, dict)
    return elapsed, info["devices"]["net"]


def test_bandwidth_limit_slows_the_guest(mvd: Daemon) -> None:
    free, net_free = _echo_time(mvd, None, 400_000)
    # 100 kB/s, a full bucket of 100 kB to start: 800 kB (in + out) needs about 7 s, less what the last
    # transfers leave as debt. (A transfer bigger than the bucket waits only for earlier debt and bills
    # its own to the next one, as Firecracker's does; the guest's reads are up to 256 KiB, so with too
    # little data the whole exchange fits in the first, unpaid, transfers.)
    limited, net = _echo_time(mvd, {"bandwidth": {"size": 100_000, "refill_time": 1000}}, 400_000)
    assert net_free["rate_limiter"] is None and net_free["stats"]["throttled_s"] == 0
    assert net["rate_limiter"]["bandwidth"]["size"] == 100_000
    assert net["stats"]["throttled_s"] > 1.0
    assert limited > 1.5 and limited > 5 * free, (free, limited)


def test_bad_limiter_is_refused(mvd: Daemon) -> None:
    st, body = mvd.call("POST", "/v1/vms", {"image": "echo", "net_rate_limiter": {"bandwidth": {"size": -1}}})
    assert st == 400, body
    assert isinstance(body, dict) and body["error"]["code"] == "invalid_field"
