"""The gateway as an HTTP/1.1 server (api/gateway.py), through raw sockets on loopback: keep-alive and
pipelining, HTTP/1.0, HEAD, Expect: 100-continue, chunked bodies, a half-closed client, and the requests it
refuses (a head too large, a stream it cannot parse, a body above the limit: answered, never reset)."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from mvapi import IMAGES, Daemon

WAGI = IMAGES / "wagi" / "wagi.wasm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gw() -> Iterator[tuple[Daemon, int]]:
    port = free_port()
    with Daemon.fresh("mvd-gwh-", "--gateway", f"127.0.0.1:{port}") as d:
        assert d.api.import_image(WAGI.read_bytes(), "wagi").status == 201
        assert d.api("POST", "/v1/functions", {"name": "hello", "image": "wagi"}).status == 201
        yield d, port


class Conn:
    """A raw connection that reads whole responses (Content-Length framed, as the gateway sends them)."""

    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.settimeout(30)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.s.sendall(data)

    def _fill(self) -> bool:
        chunk = self.s.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            assert self._fill(), f"the connection ended: {self.buf!r}"
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = 0 if head_only or status == 100 else int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._fill(), "the body was cut"
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed(self) -> bool:
        """Whether the server closes the connection (EOF or reset) within 10 s."""
        self.s.settimeout(10)
        try:
            return not self._fill()
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.s.close()


@pytest.fixture()
def conn(gw: tuple[Daemon, int]) -> Iterator[Conn]:
    c = Conn(gw[1])
    yield c
    c.close()


def test_pipelined_requests_are_answered_in_order_on_one_connection(conn: Conn) -> None:
    conn.send(b"".join(b"GET /hello?name=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
    for i in range(5):
        status, headers, body = conn.response()
        assert status == 200 and body == b"hello %d, call 1\n" % i
        assert "connection" not in headers  # kept alive
    conn.send(b"GET /hello?name=last HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.response()[2] == b"hello last, call 1\n"


def test_http10_closes_unless_asked_and_head_has_no_body(conn: Conn, gw: tuple[Daemon, int]) -> None:
    conn.send(b"HEAD /hello?name=h HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = conn.response(head_only=True)
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(b"hello h, call 1\n")
    conn.send(b"GET /hello?name=old HTTP/1.0\r\n\r\n")
    status, headers, body = conn.response()
    assert status == 200 and body == b"hello old, call 1\n" and headers["connection"] == "close"
    assert conn.closed()
    again = Conn(gw[1])
    try:
        again.send(b"GET /hello?name=k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert again.response()[0] == 200
        again.send(b"GET /hello?name=k2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert again.response()[2] == b"hello k2, call 1\n"
    finally:
        again.close()


def test_expect_100_continue_and_a_chunked_body(conn: Conn) -> None:
    conn.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    assert conn.response()[0] == 100  # the function admitted the request: now the body
    conn.send(b"x" * 5000)
    status, _, body = conn.response()
    assert status == 201 and body == b"got 5000 bytes, call 1\n"
    conn.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
    status, _, body = conn.response()
    assert status == 201 and body == b"got 7 bytes, call 1\n"


def test_a_half_closed_client_still_gets_its_answer(conn: Conn) -> None:
    conn.send(b"GET /hello?name=half HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.s.shutdown(socket.SHUT_WR)
    status, _, body = conn.response()
    assert status == 200 and body == b"hello half, call 1\n"
    assert conn.closed()


def test_refusals_are_answered_then_closed(gw: tuple[Daemon, int]) -> None:
    d, port = gw
    big = Conn(port)  # a head above 64 KiB: 431
    try:
        big.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 << 10) + b"\r\n\r\n")
        assert big.response()[0] == 431 and big.closed()
    finally:
        big.close()
    bad = Conn(port)  # not HTTP: 400
    try:
        bad.send(b"HELLO THERE\r\n\r\n")
        assert bad.response()[0] == 400 and bad.closed()
    finally:
        bad.close()
    large = Conn(port)  # a body above the limit, sent whole by a client that reads only afterwards: its 413
    try:              # arrives (the body is read and dropped), not a reset
        large.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n" + b"x" * (2 << 20))
        status, headers, _ = large.response()
        assert status == 413 and headers["connection"] == "close"
    finally:
        large.close()
    ok = Conn(port)  # and the gateway serves on
    try:
        ok.send(b"GET /hello?name=ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.response()[2] == b"hello ok, call 1\n"
    finally:
        ok.close()
    assert d.api.ok("GET", "/v1/functions/hello")["stats"]["direct_runner"] in ("native", "python")


def test_a_half_closed_pipelining_client_gets_every_answer(conn: Conn) -> None:
    conn.send(b"GET /hello?name=a HTTP/1.1\r\nHost: x\r\n\r\nGET /hello?name=b HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.s.shutdown(socket.SHUT_WR)
    assert conn.response()[2] == b"hello a, call 1\n"
    status, headers, body = conn.response()
    assert body == b"hello b, call 1\n" and headers["connection"] == "close"
    assert conn.closed()


def test_a_valid_request_before_garbage_is_answered_first(conn: Conn) -> None:
    conn.send(b"GET /hello?name=first HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
    assert conn.response()[2] == b"hello first, call 1\n"
    assert conn.response()[0] == 400 and conn.closed()


def test_upgrade_connect_and_too_many_headers(gw: tuple[Daemon, int]) -> None:
    _, port = gw
    up = Conn(port)  # an Upgrade the gateway does not make: answered as a plain request, then closed
    try:
        up.send(b"GET /hello?name=up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                b"GET /hello?name=after HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = up.response()
        assert body == b"hello up, call 1\n" and headers["connection"] == "close"
        assert up.closed()
    finally:
        up.close()
    tunnel = Conn(port)  # CONNECT names no path: 400, never a 500
    try:
        tunnel.send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert tunnel.response()[0] == 400 and tunnel.closed()
    finally:
        tunnel.close()
    many = Conn(port)
    try:
        many.send(b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n")
        assert many.response()[0] == 431 and many.closed()
    finally:
        many.close()


def test_a_hundred_pipelined_requests_in_one_send(conn: Conn) -> None:
    """More than are parsed ahead at once: the rest wait unparsed, and every one is answered, in order."""
    conn.send(b"".join(b"GET /hello?name=p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100)))
    for i in range(100):
        assert conn.response()[2] == b"hello p%d, call 1\n" % i


def test_a_large_body_then_a_small_head_in_one_read_is_no_431(conn: Conn) -> None:
    conn.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200000
              + b"GET /hello?name=after HTTP/1.1\r\nHo")
    assert conn.response()[2] == b"got 200000 bytes, call 1\n"
    conn.send(b"st: x\r\n\r\n")
    assert conn.response()[2] == b"hello after, call 1\n"


def test_trailers_are_not_headers_and_are_bounded(gw: tuple[Daemon, int]) -> None:
    _, port = gw
    c = Conn(port)
    try:  # a trailer never reaches the function's environment as a header
        c.send(b"POST /hello?env=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nab\r\n0\r\nX-Trailer: evil\r\nHost: evil\r\n\r\n")
        status, _, body = c.response()
        assert status == 200 and b"evil" not in body and b"HTTP_HOST=x\n" in body
    finally:
        c.close()
    c = Conn(port)
    try:  # a trailer that never ends is refused before the parser holds much of it
        c.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: ")
        for _ in range(20):
            try:
                c.send(b"a" * 16384)
            except OSError:
                break
        status, _, body = c.response()
        assert status == 400 and b"trailers" in body
    finally:
        c.close()


def test_an_upgrade_with_a_body_and_an_odd_host_port(gw: tuple[Daemon, int]) -> None:
    _, port = gw
    c = Conn(port)
    try:  # the parser would not read the body of an upgrade: the request is refused, not run without it
        c.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 5\r\n\r\n"
               b"hello")
        assert c.response()[0] == 400 and c.closed()
    finally:
        c.close()
    c = Conn(port)
    try:  # a port of non-ASCII digits is no port (the socket's), never a 500
        c.send("GET /hello?env=1 HTTP/1.1\r\nHost: a:²\r\n\r\n".encode())
        status, _, body = c.response()
        assert status == 200 and f"SERVER_PORT={port}\n".encode() in body
    finally:
        c.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_above_the_limit_is_answered_413_never_reset(gw: tuple[Daemon, int], chunked: bool) -> None:
    """Sent whole before the client reads (as most clients do): the rest of the body is read and dropped after
    the 413, so the client reads its answer, then the end of the connection."""
    c = Conn(gw[1])
    try:
        if chunked:
            chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
            c.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 32 + b"0\r\n\r\n")
        else:
            c.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n" + b"x" * (2 << 20))
        status, headers, _ = c.response()
        assert status == 413 and headers["connection"] == "close"
        assert c.closed()
    finally:
        c.close()


def test_a_chunked_body_in_tiny_chunks_is_served(conn: Conn) -> None:
    """Chunk framing is bounded per chunk, not as a whole: 30,000 one-byte chunks are a valid body."""
    conn.send(b"POST /hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 30000
              + b"0\r\n\r\n")
    status, _, body = conn.response()
    assert status == 201 and body == b"got 30000 bytes, call 1\n"


def test_a_huge_head_sent_whole_gets_its_431_not_a_reset(gw: tuple[Daemon, int]) -> None:
    c = Conn(gw[1])
    try:
        c.send(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        assert c.response()[0] == 431 and c.closed()
    finally:
        c.close()
