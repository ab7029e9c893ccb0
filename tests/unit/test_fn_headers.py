"""Function responses: a header a function gives several times (CGI lines, SDK lines, a list from a Python
or JavaScript handler) leaves the gateway once per value, e.g. several Set-Cookie; and the function's url
is one a client can use whatever address the gateway binds."""
from __future__ import annotations

from microvmd.api.gateway import encode_response
from microvmd.functions import wagi
from microvmd.functions.http import FnResponse, add_header
from microvmd.functions.service import gateway_base


def test_repeated_cgi_headers_keep_every_value() -> None:
    resp = wagi.parse(b"Content-Type: text/plain\nSet-Cookie: a=1; Path=/\nset-cookie: b=2\nX-One: 1\n\nok")
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.headers == {"Content-Type": "text/plain", "Set-Cookie": "a=1; Path=/\nb=2", "X-One": "1"}


def test_the_gateway_sends_each_value_as_a_header_line() -> None:
    headers: dict[str, str] = {}
    for k, v in (("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Bad", "x\rInjected: 1"), ("Vary", "a")):
        add_header(headers, k, v)
    add_header(headers, "Content-Length", "99")  # (the gateway's to say)
    wire = encode_response(FnResponse(200, headers, b"ok", "rid-1"), keep_alive=True)
    head, _, body = wire.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK" and body == b"ok"
    assert [ln for ln in lines if ln.startswith("Set-Cookie")] == ["Set-Cookie: a=1", "Set-Cookie: b=2"]
    assert not any("X-Bad" in ln or "Injected" in ln for ln in lines)  # a CR never reaches the client
    assert "Vary: a" in lines and "X-Request-Id: rid-1" in lines and "Content-Length: 2" in lines
    assert "Connection: close" not in lines


def test_the_gateway_answers_a_head_request_without_its_body_and_a_1xx_as_a_502() -> None:
    wire = encode_response(FnResponse(200, {}, b"hello", "r"), keep_alive=False, head=True)
    assert wire.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\n")
    wire = encode_response(FnResponse(101, {}, b"", "r"), keep_alive=True)
    assert wire.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    wire = encode_response(FnResponse(204, {"X-A": "b"}, b"a body it cannot have", "r"), keep_alive=True)
    assert wire.endswith(b"X-A: b\r\nX-Request-Id: r\r\n\r\n") and b"Content-Length" not in wire
    wire = encode_response(FnResponse(200, {"X-Odd": "a\ud800b"}, b"", "r"), keep_alive=True, http10=True)
    assert b"X-Odd: a?b\r\n" in wire and b"Connection: keep-alive\r\n" in wire


def test_the_url_of_a_function_names_a_reachable_address() -> None:
    assert gateway_base("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert gateway_base("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert gateway_base("::", 9000) == "http://[::1]:9000"
    assert gateway_base("::1", 9000) == "http://[::1]:9000"
    assert gateway_base("fd00::5", 80) == "http://[fd00::5]:80"
