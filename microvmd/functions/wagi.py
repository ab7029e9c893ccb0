"""WAGI: CGI/1.1 over WASI (https://github.com/deislabs/wagi/blob/main/docs/writing_modules.md).

The request's meta-variables are the guest's environment, its body is the guest's standard input, and the
guest writes CGI headers (``Status:``, ``Content-Type:``, ``Location:``, any others), an empty line, then the
body on standard output.
"""
from __future__ import annotations

import re

from .http import FnRequest, FnResponse, add_header

SOFTWARE = "microvmd"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# headers a CGI script must not see as HTTP_* (RFC 3875 4.1.18): the body's are CONTENT_*, and credentials
# of the gateway itself never reach a guest
_NOT_FORWARDED = {"content-type", "content-length", "authorization", "proxy-authorization", "connection",
                  "proxy"}  # (httpoxy: a Proxy header would become HTTP_PROXY)


class CgiError(ValueError):
    """The guest's output is not a CGI response."""


def environment(req: FnRequest, extra: dict[str, str]) -> dict[str, str]:
    """The CGI meta-variables of ``req`` (plus the function's own ``extra`` environment, which a request's
    headers cannot override)."""
    path_info = req.path_info
    uri = req.path + ("?" + req.query if req.query else "")
    env = {
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": SOFTWARE,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": req.server_name,
        "SERVER_PORT": str(req.server_port),
        "REQUEST_METHOD": req.method,
        "SCRIPT_NAME": req.route.rstrip("/"),
        "PATH_INFO": path_info,
        "PATH_TRANSLATED": path_info,
        "QUERY_STRING": req.query,
        "REMOTE_ADDR": req.remote_addr,
        "REMOTE_HOST": req.remote_addr,
        "REQUEST_URI": uri,
        "X_MATCHED_ROUTE": req.route,
        "X_RAW_PATH_INFO": path_info,
        "X_FULL_URL": f"http://{req.server_name}:{req.server_port}{uri}",
        "CONTENT_LENGTH": str(len(req.body)),
        "CONTENT_TYPE": req.headers.get("content-type", ""),
    }
    for name, value in req.headers.items():
        var = _VARIABLES.get(name)
        if var is None:
            var = _variable(name)
            if len(_VARIABLES) < 4096:  # (names are the client's to choose: the cache is bounded)
                _VARIABLES[name] = var
        if not var or "\0" in value:
            continue
        # a value's bytes that are not UTF-8 come from the HTTP parser as surrogates, which no environment
        # can hold: they become U+FFFD (the guest's environment is UTF-8, a VM's and a direct instance's alike)
        env[var] = value if value.isascii() else value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    env.update(extra)
    return env


def _variable(name: str) -> str:
    """The meta-variable of a (lower-case) header name: HTTP_NAME, or "" for one a script must not see."""
    if name in _NOT_FORWARDED or not _HEADER_NAME.match(name):
        return ""
    return "HTTP_" + name.upper().replace("-", "_")


_VARIABLES: dict[str, str] = {}  # header name -> its meta-variable (the names clients send: bounded)


def parse(out: bytes) -> FnResponse:
    """A CGI response: headers up to the first empty line (LF or CRLF), then the body."""
    head, sep, body = _split(out)
    if not sep:
        raise CgiError("no CGI headers: the output must start with headers (Content-Type: ...) and an empty line")
    headers: dict[str, str] = {}
    status: int | None = None
    for line in head.splitlines():
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if not colon or not _HEADER_NAME.match(name):
            raise CgiError(f"not a header line: {line[:80]!r}")
        if name.lower() == "status":
            code = value.split(" ", 1)[0]
            if not code.isdigit() or not 100 <= int(code) <= 599:
                raise CgiError(f"Status: {value[:40]!r} is not an HTTP status")
            status = int(code)
        else:
            add_header(headers, name, value)  # (a repeated header, Set-Cookie say, keeps every line)
    if status is None:
        status = 302 if any(k.lower() == "location" for k in headers) else 200
    return FnResponse(status, headers, body)


def _split(out: bytes) -> tuple[str, bool, bytes]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = out.find(sep)
        if i >= 0:
            other = b"\n\n" if sep == b"\r\n\r\n" else b"\r\n\r\n"
            j = out.find(other)
            if 0 <= j < i:  # the other separator comes first
                i, sep = j, other
            return out[:i].decode("latin-1"), True, out[i + len(sep):]
    return "", False, b""
