"""The HTTP request and response as a function sees them, whatever the executor: plain data, no aiohttp.

The gateway (``api/gateway.py``) and ``POST /v1/functions/NAME/invoke`` both build a ``FnRequest`` and
encode the ``FnResponse`` they get back, so a function answers the same through either door.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass
class FnRequest:
    method: str
    path: str            # the path without the query string ("/py/x")
    query: str           # the raw query string, without "?"
    headers: dict[str, str]  # lower-case names (a repeated header's values joined with ", ")
    body: bytes
    route: str           # the function's route that matched ("/py")
    server_name: str = "localhost"
    server_port: int = 0
    remote_addr: str = ""

    @property
    def path_info(self) -> str:
        """What follows the route ("/x" for "/py/x" on route "/py"; "" for the route itself)."""
        rest = self.path[len(self.route.rstrip("/")):] if self.path.startswith(self.route.rstrip("/")) else self.path
        return rest if rest.startswith("/") or not rest else "/" + rest


def add_header(headers: dict[str, str], name: str, value: str) -> None:
    """Add a response header; a name given again (in any case) keeps every value, joined by a newline: the
    gateway sends each as a header line of its own (several ``Set-Cookie``, say)."""
    for have in headers:
        if have.lower() == name.lower():
            headers[have] = f"{headers[have]}\n{value}"
            return
    headers[name] = value


@dataclass
class FnResponse:
    status: int
    # a header sent several times holds its values joined by "\n" (add_header)
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    request_id: str = ""
    error: str | None = None  # the error kind for metrics (timeout, trap, bad_response...), None when it worked


def error_response(status: int, kind: str, message: str, request_id: str) -> FnResponse:
    """The gateway's own answer when the function could not give one: a short text naming the request id,
    which the function's log also names."""
    reason = HTTPStatus(status).phrase
    text = f"{status} {reason}: {message} (request {request_id})\n"
    return FnResponse(status, {"Content-Type": "text/plain; charset=utf-8"}, text.encode(), request_id, kind)
