"""Function responses: a header a function gives several times (CGI lines, SDK lines, a list from a Python
or JavaScript handler) leaves the gateway once per value, e.g. several Set-Cookie; and the function's url
is one a client can use whatever address the gateway binds."""
from __future__ import annotations

from microvmd.api.gateway import _answer
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
    out = _answer(FnResponse(200, headers, b"ok", "rid-1"))
    assert out.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Bad" not in out.headers and "Injected" not in out.headers  # a CR never reaches the client
    assert out.headers["Vary"] == "a" and out.headers["X-Request-Id"] == "rid-1"


def test_the_url_of_a_function_names_a_reachable_address() -> None:
    assert gateway_base("127.0.0.1", 8080) == "http://127.0.0.1:8080"
    assert gateway_base("0.0.0.0", 8080) == "http://127.0.0.1:8080"
    assert gateway_base("::", 9000) == "http://[::1]:9000"
    assert gateway_base("::1", 9000) == "http://[::1]:9000"
    assert gateway_base("fd00::5", 80) == "http://[fd00::5]:80"
