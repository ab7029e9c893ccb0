"""The gateway's own bounds, through real sockets on loopback: a cap on connections (503 and closed beyond it),
slow-headers and idle connections closed, and a full queue answered without reading the request's body."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mvapi import IMAGES, Daemon

WAGI = IMAGES / "wagi" / "wagi.wasm"
CAP = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    cfg: Path = tmp_path_factory.mktemp("gwcfg") / "microvmd.toml"
    cfg.write_text(f'[daemon]\ngateway_connections = {CAP}\ngateway_idle_timeout = "1s"\n'
                   'gateway_body_timeout = "4s"\n')  # (the slow uploads below must outlast their probes)
    port = free_port()
    with Daemon.fresh("mvd-gwl-", "--gateway", f"127.0.0.1:{port}", "--config", str(cfg)) as d:
        assert d.api.import_image(WAGI.read_bytes(), "wagi").status == 201
        assert d.api("POST", "/v1/functions", {"name": "hello", "image": "wagi"}).status == 201
        yield d, port


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def closed_by_server(s: socket.socket, within: float = 30.0) -> bool:
    """True once the server has closed ``s`` (EOF or reset); False if it is still open after ``within`` s."""
    s.settimeout(within)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def metric(d: Daemon, name: str) -> float:
    for line in d.api.metrics().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_connections_beyond_the_cap_get_503_then_idle_ones_are_closed(gwd: tuple[Daemon, int]) -> None:
    d, port = gwd
    assert get(port, "/hello?name=a")[0] == 200
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(CAP)]
    try:
        deadline = time.monotonic() + 30
        while metric(d, "microvmd_gateway_connections") < CAP and time.monotonic() < deadline:
            time.sleep(0.02)
        assert metric(d, "microvmd_gateway_connections_max") == CAP
        status, headers, body = get(port, "/hello?name=b")
        assert status == 503 and headers["retry-after"] == "1", (status, body)
        assert b"maximum of 8 connections" in body
        assert metric(d, "microvmd_gateway_connections_refused_total") >= 1
        # the idle ones sent no request head: closed after gateway_idle_timeout, and the gateway serves again
        assert all(closed_by_server(s) for s in idle)
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # the closed handlers leave aiohttp's table once their tasks end
        status = get(port, "/hello?name=c")[0]
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200


def test_a_slow_headers_client_is_closed(gwd: tuple[Daemon, int]) -> None:
    _, port = gwd
    s = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()

    def trickle() -> None:  # a byte of header every 0.2 s: never a whole request head
        try:
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(0.2):
                s.sendall(b"X")
        except OSError:
            pass

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        assert closed_by_server(s)
    finally:
        stop.set()
        t.join()
        s.close()


def test_an_idle_keep_alive_connection_is_closed(gwd: tuple[Daemon, int]) -> None:
    _, port = gwd
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(b"GET /hello?name=k HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(30)
        got = b""
        while b"hello k" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        assert closed_by_server(s)  # then nothing for gateway_idle_timeout
    finally:
        s.close()


def test_a_full_queue_answers_without_waiting_for_the_body(gwd: tuple[Daemon, int]) -> None:
    d, port = gwd
    assert d.api("POST", "/v1/functions", {"name": "narrow", "image": "wagi", "max_concurrency": 1,
                                          "timeout": 5}).status == 201

    def stats() -> dict[str, int]:
        return d.api.ok("GET", "/v1/functions/narrow")["stats"]  # type: ignore[no-any-return]

    def wait_for(active_and_queued: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = stats()
            if s["active"] + s["queued"] >= active_and_queued:
                return
            time.sleep(0.02)
        raise AssertionError(stats())

    # one running and three queued (of four), each spinning until its 5 s timeout
    spinning = [threading.Thread(target=get, args=(port, "/narrow?spin=1"), daemon=True) for _ in range(4)]
    slow = socket.create_connection(("127.0.0.1", port))
    try:
        for t in spinning:
            t.start()
        wait_for(4)
        # a request whose body is on its way counts as queued, and fills the queue...
        slow.sendall(b"POST /narrow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        wait_for(5)
        # ... so the next one is refused at once, its body never read (it is never sent; reading it first
        # would have taken the gateway's 30 s body timeout)
        c = socket.create_connection(("127.0.0.1", port))
        c.settimeout(10)
        c.sendall(b"POST /narrow HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        refused = c.recv(4096)
        c.close()
        assert refused.startswith(b"HTTP/1.1 503") and b"queue is full" in refused, refused
    finally:
        slow.close()  # its request ends as a 400 (the body could not be read), never a 5xx of the daemon
        for t in spinning:
            t.join(30)
    deadline = time.monotonic() + 30
    while stats()["errors"].get("bad_body") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats()["errors"].get("bad_body") == 1, stats()  # (its 4 s body deadline had not come)
    d.api("DELETE", "/v1/functions/narrow")


def _wait_no_connections(d: Daemon) -> None:
    deadline = time.monotonic() + 30
    while metric(d, "microvmd_gateway_connections") > 0:
        assert time.monotonic() < deadline, "the gateway still holds connections"
        time.sleep(0.05)


def test_a_burst_of_connections_never_holds_more_than_the_cap(gwd: tuple[Daemon, int]) -> None:
    """Connections accepted in one batch are counted as they are made, not when aiohttp lists them a loop
    iteration later: of 3 x CAP opened at once, exactly 2 x CAP are refused."""
    d, port = gwd
    _wait_no_connections(d)
    socks = []
    os.kill(d.pid, signal.SIGSTOP)  # the kernel completes the handshakes into the backlog meanwhile...
    try:
        for _ in range(3 * CAP):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
        time.sleep(0.2)
    finally:
        os.kill(d.pid, signal.SIGCONT)  # ... and the daemon accepts them in one batch
    try:
        answers = []
        for s in socks:
            s.setblocking(True)
            s.settimeout(30)
            got = b""
            try:
                while chunk := s.recv(4096):
                    got += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            answers.append(got)
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(refused) == 2 * CAP, [a[:40] for a in answers]
        assert all(a == b"" for a in answers if a not in refused)  # held, then closed idle
    finally:
        for s in socks:
            s.close()


def test_bodies_on_their_way_are_bounded_by_the_queue_even_with_free_slots(gwd: tuple[Daemon, int]) -> None:
    d, port = gwd
    _wait_no_connections(d)
    assert d.api("POST", "/v1/functions", {"name": "slim", "image": "wagi", "max_concurrency": 1}).status == 201
    head = b"POST /slim HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # the queue: 4 x 1
    try:
        for s in slow:
            s.sendall(head)
        deadline = time.monotonic() + 30
        while d.api.ok("GET", "/v1/functions/slim")["stats"]["queued"] < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c = socket.create_connection(("127.0.0.1", port))
        c.settimeout(10)
        c.sendall(head)
        refused = c.recv(4096)
        c.close()
        assert refused.startswith(b"HTTP/1.1 503") and b"queue is full" in refused, refused
    finally:
        for s in slow:
            s.close()
    d.api("DELETE", "/v1/functions/slim")


def test_a_body_that_does_not_arrive_in_time_is_a_408(gwd: tuple[Daemon, int]) -> None:
    d, port = gwd
    _wait_no_connections(d)
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.settimeout(30)
        c.sendall(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")  # 10 of 100
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = c.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 408"), got
    finally:
        c.close()
    errors = d.api.ok("GET", "/v1/functions/hello")["stats"]["errors"]
    assert errors.get("slow_client") == 1, errors
