"""The function gateway: HTTP/1.1 on TCP (``--gateway HOST:PORT``), every request handed to the function
whose route matches its path (docs/functions.md). Thin like the API: decode the HTTP request into a
``FnRequest``, apply ``InvokeFunction``, encode the ``FnResponse``."""
from __future__ import annotations

import asyncio
import logging
import re
import weakref
from typing import cast

from aiohttp import web
from multidict import CIMultiDict

from ..control import actions as a
from ..control.controller import Controller
from ..errors import BadRequest, MicrovmError, PayloadTooLarge, RequestTimeout
from ..functions.http import FnRequest, FnResponse, error_response
from ..functions.service import MAX_BODY

log = logging.getLogger("microvmd.gateway")

CONTROLLER = web.AppKey("controller", Controller)
# seconds for a client to send its whole body once its request is admitted (a slow client gets 408, not a
# place in the queue forever): [daemon] gateway_body_timeout
BODY_TIMEOUT = web.AppKey("body_timeout", float)
# hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself: a function does not choose them
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer",
            "proxy-connection"}


_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _answer(resp: FnResponse) -> web.Response:
    if not 200 <= resp.status <= 599:  # 1xx would leave the client waiting for the real answer
        resp = error_response(502, "bad_response", f"the function answered status {resp.status}", resp.request_id)
    headers: CIMultiDict[str] = CIMultiDict()
    for k, v in resp.headers.items():
        if k.lower() in _DROPPED or not _TOKEN.match(k):
            continue
        for one in v.split("\n"):  # a header given several times (add_header) goes out once per value
            if "\r" not in one and "\0" not in one:
                headers.add(k, one)
    if resp.request_id:
        headers["X-Request-Id"] = resp.request_id
    out = web.Response(status=resp.status, body=resp.body, headers=headers)
    if resp.error == "shutting_down":
        out.force_close()  # the daemon is stopping: this connection ends with this answer
    return out


async def serve(request: web.Request) -> web.StreamResponse:
    try:
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _answer(error_response(413, "too_large", f"the request body is above {MAX_BODY} bytes", "-"))
        headers: dict[str, str] = {}
        for k, v in request.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        path = request.path  # decoded, as CGI's PATH_INFO is; the query string stays raw (RFC 3875)
        query = request.raw_path.partition("?")[2]
        if any(ord(ch) < 0x20 or ch == "\x7f" for ch in path):
            return _answer(error_response(400, "bad_path", "the path holds a control character (%00-%1F)", "-"))
        host = request.url.host or "localhost"
        port = request.url.port or 0
        peer = request.remote or ""
        req = FnRequest(request.method, path, query, headers, b"", route="",
                        server_name=host, server_port=port, remote_addr=peer)
        # the body is read once the function has a place for the request: an unknown route, a full queue
        # or a stopping daemon answers without holding the body in memory
        reader = _body_reader(request) if request.body_exists else None
        resp: FnResponse = await request.app[CONTROLLER].apply(a.InvokeFunction(None, req, reader))
    except MicrovmError as exc:  # e.g. shutting down (503)
        resp = error_response(exc.status, exc.code, exc.message, "-")
    return _answer(resp)


def _body_reader(request: web.Request):  # type: ignore[no-untyped-def]
    async def read() -> bytes:
        timeout = request.app[BODY_TIMEOUT]
        try:
            return await asyncio.wait_for(request.read(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"the body did not arrive within {timeout:g} s", code="slow_client") from None
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(f"the request body is above {MAX_BODY} bytes", code="too_large") from None
        except Exception as exc:  # noqa: BLE001 - the client went away or sent a broken body: its failure, a 400
            raise BadRequest(f"the request body could not be read: {exc}", code="bad_body") from None
    return read


class GatewayStats:
    """The gateway's connections: open now, and refused at the cap (``/metrics``)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.refused = 0
        self.open = 0  # connections made and not yet lost (counted by GatewaySite's protocols)

    def release(self, cell: list[bool]) -> None:
        """Give back one connection's place, once (``cell`` says whether it still holds it)."""
        if cell[0]:
            cell[0] = False
            self.open -= 1


_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")
REFUSAL_LINGER = 0.5  # seconds a refused connection waits for its request head before it is closed


class _Refused(asyncio.Protocol):
    """A connection beyond the gateway's cap: answered 503 once its request head arrives (or at once after
    REFUSAL_LINGER), then closed. Reading the head first lets the client see the answer: closing a socket
    with unread data would reset the connection instead."""

    def __init__(self, site: GatewaySite) -> None:
        self.site = site
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports do not subclass it)
        self.site.lingering += 1
        if self.site.lingering > self.site.stats.cap:  # a flood: no lingering at all
            self._answer()
        else:
            self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._answer)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data or b"\n\n" in data:
            self._answer()

    def _answer(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        text = f"503 Service Unavailable: the gateway holds its maximum of {self.site.stats.cap} connections\n".encode()
        self.transport.write(_REFUSAL % (len(text), text))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.site.lingering -= 1
        if self.timer is not None:
            self.timer.cancel()


class _Counted(asyncio.Protocol):
    """aiohttp's handler for one connection, holding a place under the cap from the moment it is made: all
    calls go to the handler, and the place is given back when the connection is lost (or, should the loop
    never report that, when this object goes). aiohttp's own table of connections lists one only from its
    connection_made, a loop iteration after the accept: a burst accepted at once would all see it short."""

    __slots__ = ("inner", "stats", "cell", "__weakref__")

    def __init__(self, inner: asyncio.Protocol, stats: GatewayStats) -> None:
        self.inner = inner
        self.stats = stats
        self.cell = [True]
        stats.open += 1
        weakref.finalize(self, stats.release, self.cell)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.inner.connection_lost(exc)
        finally:
            self.stats.release(self.cell)


class GatewaySite(web.TCPSite):
    """The gateway's TCP site: at most ``cap`` connections at once (each is one of the daemon's descriptors,
    outside the guests' budget); a connection beyond them is answered 503 with Retry-After and closed.
    A connection that has not sent a whole request head within the runner's ``keepalive_timeout`` (and an
    idle keep-alive one) is closed by aiohttp itself."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, stats: GatewayStats,
                 backlog: int = 1024) -> None:
        super().__init__(runner, host, port, backlog=backlog, reuse_address=True)
        self.stats = stats
        self.lingering = 0

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        assert server is not None
        if self.stats.open >= self.stats.cap:
            self.stats.refused += 1
            if self.stats.refused & (self.stats.refused - 1) == 0:  # 1, 2, 4, 8...: the log is not flooded
                log.warning("function gateway: %d connection(s) refused so far at its cap of %d ("
                            "[daemon] gateway_connections)", self.stats.refused, self.stats.cap)
            return _Refused(self)
        return _Counted(server(), self.stats)

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        self._server = await asyncio.get_running_loop().create_server(
            self._protocol, self._host, self._port, backlog=self._backlog, reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def make_gateway(controller: Controller, body_timeout: float = 30.0) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY + 1)
    app[CONTROLLER] = controller
    app[BODY_TIMEOUT] = body_timeout
    app.router.add_route("*", "/{tail:.*}", serve)
    return app
