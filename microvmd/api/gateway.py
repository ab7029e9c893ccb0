"""The function gateway: HTTP/1.1 on TCP (``--gateway HOST:PORT``), every request handed to the function
whose route matches its path (docs/functions.md). Thin like the API: decode the HTTP request into a
``FnRequest``, apply ``InvokeFunction``, encode the ``FnResponse``.

The gateway is its own small HTTP/1.1 server (an asyncio protocol over httptools, the parser uvicorn uses),
not an aiohttp application: a function's request is a few tens of microseconds of work once it reaches a
direct instance, and aiohttp's request and response objects, router and writer cost about as much again.
What it does, and what it bounds:
- keep-alive (HTTP/1.1 by default, HTTP/1.0 when asked), requests on one connection answered in order
  (pipelined ones wait their turn, at most ``PIPELINED`` parsed ahead; the rest of a read waits unparsed);
- a connection that has not sent a whole request head within ``idle_timeout`` (a slow-headers client, or
  an idle keep-alive one) is closed; a head above MAX_HEAD bytes or MAX_HEADERS lines is answered 431;
- at most ``stats.cap`` connections (``[daemon] gateway_connections``); one beyond is answered 503 with
  Retry-After and closed;
- a body is read only once its function admits the request (reading stops until then), within
  ``body_timeout`` (else 408 slow_client), and never beyond MAX_BODY bytes (413, Content-Length or chunks);
  ``Expect: 100-continue`` is answered when the body is wanted;
- a request the parser refuses is answered 400 and the connection closed.
"""
from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections import deque
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools

from ..control import actions as a
from ..control.controller import Controller
from ..errors import BadRequest, MicrovmError, PayloadTooLarge, RequestTimeout
from ..functions.http import FnRequest, FnResponse, error_response
from ..functions.service import MAX_BODY

log = logging.getLogger("microvmd.gateway")

# hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself: a function does not choose them
_DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer",
            "proxy-connection"}
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_REASONS = {s.value: s.phrase for s in HTTPStatus}
PIPELINED = 8  # requests read ahead of the one being answered on a connection; reading stops beyond
MAX_HEAD = 64 << 10  # bytes of a request head (its line and headers): a larger one is answered 431
MAX_HEADERS = 128  # header lines of a request: more are answered 431
FEED = 16 << 10  # bytes parsed at a time (between them: the pipelining bound, the body's admission, the limits)
PIPELINED_FEED = 1 << 10  # ... while requests wait for their answers (so few more than PIPELINED are queued)
CHUNK_FRAMING = 64  # bytes of framing a chunked body may have per chunk (its size line), beyond MAX_HEAD
LINGER, LINGER_BYTES = 2.0, 8 << 20  # an unread body after the answer: read and dropped for so long, so much
WRITE_HIGH = 1 << 20  # bytes of answers queued for a slow reader before the connection's next request waits
# (and a reader that takes none of them within the body timeout loses its connection)


def response_head(resp: FnResponse) -> tuple[FnResponse, list[tuple[str, str]]]:
    """The response as sent (a status outside 200-599 becomes a 502) and its header lines: hop-by-hop names,
    names that are not tokens and values with a CR, LF or NUL dropped, a header given several times
    (``add_header``) sent once per value, and X-Request-Id."""
    if not 200 <= resp.status <= 599:  # 1xx would leave the client waiting for the real answer
        resp = error_response(502, "bad_response", f"the function answered status {resp.status}", resp.request_id)
    lines = []
    for k, v in resp.headers.items():
        if k.lower() in _DROPPED or not _TOKEN.match(k) or k.lower() == "x-request-id":
            continue
        for one in v.split("\n"):  # a header given several times (add_header) goes out once per value
            if "\r" not in one and "\0" not in one:
                lines.append((k, one))
    if resp.request_id:
        lines.append(("X-Request-Id", resp.request_id))
    return resp, lines


def encode_response(resp: FnResponse, keep_alive: bool, head: bool = False, http10: bool = False) -> bytes:
    """The response's bytes on the wire (HTTP/1.1). No body for a HEAD request (its length all the same), nor
    for 204 and 304, which have none (RFC 9110 6.4.1): a body there would be read as the next response. A
    value that is not text (a lone surrogate from a handler) is sent with "?" in its place."""
    resp, lines = response_head(resp)
    out = [f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Unknown')}\r\n"]
    out.extend(f"{k}: {v}\r\n" for k, v in lines)
    bodiless = resp.status in (204, 304)
    if not bodiless:
        out.append(f"Content-Length: {len(resp.body)}\r\n")
    if not keep_alive:
        out.append("Connection: close\r\n")
    elif http10:
        out.append("Connection: keep-alive\r\n")  # (HTTP/1.0 closes unless told otherwise)
    out.append("\r\n")
    data = "".join(out).encode("utf-8", "replace")
    return data if head or bodiless else data + resp.body


class GatewayStats:
    """The gateway's connections: open now, and refused at the cap (``/metrics``)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.refused = 0
        self.open = 0  # connections made and not yet lost

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

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports do not subclass it)
        self.gw.lingering += 1
        if self.gw.lingering > self.gw.stats.cap:  # a flood: no lingering at all
            self._answer()
        else:
            self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._answer)

    def data_received(self, data: bytes) -> None:
        if not self.answered and (b"\r\n\r\n" in data or b"\n\n" in data):
            self._answer()

    def eof_received(self) -> bool | None:
        return None  # (the client has read its answer, or never will: the connection closes)

    def _answer(self) -> None:
        if self.answered or self.transport is None or self.transport.is_closing():
            return
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
        text = f"503 Service Unavailable: the gateway holds its maximum of {self.gw.stats.cap} connections\n".encode()
        self.transport.write(_REFUSAL % (len(text), text))
        if self.gw.lingering > self.gw.stats.cap:
            self.transport.close()  # (a flood: nothing more is waited for)
            return
        # what the client still sends (a body) is read and dropped until it ends its side, or for at most
        # REFUSAL_LINGER: closing with unread data would reset the connection and lose the answer
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.lingering -= 1
        if self.timer is not None:
            self.timer.cancel()


class _Request:
    """One request on a connection, from its head to its answer."""

    __slots__ = ("method", "url", "headers", "nheaders", "keep_alive", "http10", "body", "size", "head_complete",
                 "head_error", "complete", "too_large", "waiter", "expect_continue", "head_only")

    def __init__(self) -> None:
        self.method = "GET"
        self.url = b""
        self.headers: dict[str, str] = {}  # lower-case names (a repeated header's values joined with ", ")
        self.nheaders = 0
        self.keep_alive = True
        self.http10 = False
        self.head_complete = False
        self.head_error: tuple[int, str, str] | None = None  # answered instead of the function (431...)
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False  # the whole body has arrived
        self.too_large = False
        self.waiter: asyncio.Future[None] | None = None  # the body's reader, until it is complete
        self.expect_continue = False
        self.head_only = False


class _Connection(asyncio.Protocol):
    """One client connection (holding a place under the cap from the moment it is made until it is lost). Its
    requests are answered in order by one task, which lives as long as the connection."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.transport: asyncio.Transport | None = None
        self.port = 0  # the gateway's port and the client's address (connection_made)
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: _Request | None = None  # the request whose head or body is being parsed
        self.queue: deque[_Request] = deque()  # heads complete, not yet answered; the first is being answered
        self.task: asyncio.Task[None] | None = None  # answers the queue's requests, one after the other
        self.wakeup: asyncio.Future[None] | None = None  # the task's, while the queue is empty
        self.since = 0.0  # when the connection last had nothing to do (made, or its last answer sent)
        self.head_bytes = 0  # of the request being parsed: its line and headers so far
        self.head_read = 0  # bytes read while its head was incomplete (bounds what the parser buffers)
        self.framing = 0  # bytes of the body being parsed that were not body (chunk sizes, trailers)
        self.chunks = 0  # chunks of that body so far
        self.closed_at: float | None = None  # when _close was asked (a full write buffer may hold it open)
        self.unfed = b""  # read, not yet parsed (reading is paused until it is)
        self.reading = True
        self.write_paused: asyncio.Future[None] | None = None
        self.eof = False  # the client will send nothing more
        self.closing = False  # no request after those queued is answered
        self.broken = False  # the stream cannot be parsed further: nothing more is read
        self.lingering = False  # answered before its body was read: the body is read and dropped, then close
        self.lingered = 0
        self.cell = [True]
        gw.stats.open += 1
        weakref.finalize(self, gw.stats.release, self.cell)

    # -------------------------------------------------------------- the transport's calls
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH)
        # (once: each get_extra_info is a system call on uvloop)
        sock, peer = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        self.port = int(sock[1]) if sock else 0
        self.peer = str(peer[0]) if peer else ""
        self.since = asyncio.get_running_loop().time()
        self.gw.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self._abort()
                return
        if self.broken:
            return
        self.unfed = self.unfed + data if self.unfed else data
        self._feed()

    def _feed(self) -> None:
        """Parse what was read, in slices of at most FEED bytes, while more may be read (``_may_read``): what
        is left waits, unparsed, for ``_resume``. Parsing a read whole would queue a pipelined flood of one
        read at once, and parse a body its function has not asked for. After each slice the parser's own
        buffers are bounded: a head that does not end, or chunk framing and trailers that do not, are
        refused before they hold more than MAX_HEAD (and a slice) of memory."""
        while self.unfed and not self.broken and (self._may_read() or self.lingering):
            # (smaller slices while requests wait to be answered: a slice of pipelined ones is parsed whole)
            size = FEED if not self.queue or self.lingering else PIPELINED_FEED
            data, self.unfed = self.unfed[:size], self.unfed[size:]
            req = self.parsing
            in_head = req is not None and not req.head_complete
            in_body = req is not None and req.head_complete and not req.complete
            body_before = req.size if in_body and req is not None else 0
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._upgraded()
                return
            except httptools.HttpParserError as exc:
                if self.lingering:
                    self._close()  # (its answer is sent: nothing more is)
                else:
                    self._refuse(400, "bad_request", f"the request could not be parsed: {exc}")
                return
            now = self.parsing
            if now is not None and not now.head_complete:  # the parser holds part of a head
                self.head_read = self.head_read + len(data) if (in_head and now is req) else len(data)
                if self.head_read > MAX_HEAD + FEED:  # (its complete lines are counted exactly at its end)
                    self._refuse(431, "head_too_large", f"the request head is above {MAX_HEAD} bytes")
                    return
            elif in_body and now is req and req is not None and not self.lingering:
                # bytes of the body's framing: chunk-size lines (streamed by the parser: CHUNK_FRAMING each is
                # allowed) and trailers (buffered by it: MAX_HEAD)
                self.framing += len(data) - (req.size - body_before)
                if self.framing > MAX_HEAD + FEED + CHUNK_FRAMING * self.chunks:
                    self._refuse(400, "bad_body", "the request's chunk framing or trailers are too large")
                    return
        if self.unfed and not self.lingering:
            self._pause()

    def _upgraded(self) -> None:
        """An Upgrade (or CONNECT) the gateway does not make: that request is answered without its upgrade
        (400 if it has a body, which the parser does not read for an upgrade), then the connection closes;
        what follows it is not read."""
        req = self.queue[-1] if self.queue else None
        if req is not None:
            req.keep_alive = False
            if not _bodiless(req):
                req.head_error = (400, "bad_request", "an Upgrade request with a body is not served")
            if req is self.parsing:
                req.complete = True
                self.parsing = None
        self.broken = True
        self.closing = True
        self.unfed = b""
        self._pause()

    def eof_received(self) -> bool | None:
        self.eof = True
        if self.lingering:
            self._close()
            return None
        req = self.parsing
        if req is not None and req.waiter is not None and not req.waiter.done():
            req.waiter.set_exception(BadRequest("the client closed the connection before its body ended",
                                                code="bad_body"))
        if not self.queue and not self.lingering:
            self._close()
            return None
        return True  # (a half-closed client still gets the answers it asked for, then the connection ends)

    def pause_writing(self) -> None:
        if self.write_paused is None:
            self.write_paused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        w, self.write_paused = self.write_paused, None
        if w is not None and not w.done():
            w.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.stats.release(self.cell)
        self.gw.connections.discard(self)
        self.closing = True
        self.broken = True
        for req in (*self.queue, *([self.parsing] if self.parsing is not None else [])):
            if req.waiter is not None and not req.waiter.done():
                req.waiter.set_exception(BadRequest("the client went away before its body ended", code="bad_body"))
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.cancel()  # (the task ends)
        self.resume_writing()

    # -------------------------------------------------------------- the parser's calls
    def on_message_begin(self) -> None:
        self.parsing = _Request()
        self.head_bytes = 0

    def on_url(self, url: bytes) -> None:
        assert self.parsing is not None
        self.parsing.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.parsing
        assert req is not None
        if req.head_complete:
            return  # a chunked body's trailer: never merged into the headers (RFC 9110 6.5.1)
        self.head_bytes += len(name) + len(value) + 3  # (at least "name:value\r\n")
        req.nheaders += 1
        if req.nheaders > MAX_HEADERS:
            req.head_error = (431, "head_too_large", f"the request has more than {MAX_HEADERS} header lines")
            return
        k = name.decode("latin-1").lower()
        v = value.decode("utf-8", "surrogateescape")
        headers = req.headers
        headers[k] = f"{headers[k]}, {v}" if k in headers else v

    def on_headers_complete(self) -> None:
        req = self.parsing
        assert req is not None
        p = self.parser
        req.method = p.get_method().decode("latin-1")
        req.http10 = p.get_http_version() == "1.0"
        req.keep_alive = p.should_keep_alive()
        req.head_only = req.method == "HEAD"
        req.expect_continue = req.headers.get("expect", "").lower() == "100-continue"
        req.head_complete = True
        self.framing = 0
        if self.head_bytes > MAX_HEAD:
            req.head_error = (431, "head_too_large", f"the request head is above {MAX_HEAD} bytes")
        if req.head_error is not None:
            req.keep_alive = False  # (its body, if any, is not read)
        self.head_read = 0
        self.chunks = 0
        self.queue.append(req)
        if len(self.queue) == 1:
            if self.task is None:
                self.task = asyncio.get_running_loop().create_task(self._serve())
            elif self.wakeup is not None and not self.wakeup.done():
                self.wakeup.set_result(None)
        if not self._may_read():  # a body waits until its function wants it (``reader``)
            self._pause()

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, body: bytes) -> None:
        req = self.parsing
        assert req is not None
        req.size += len(body)  # (counted even when dropped: the framing bound in _feed is what is not body)
        if self.lingering or req.too_large:
            return
        if req.size > MAX_BODY:
            req.too_large = True
            req.body.clear()
            self._pause()
            if req.waiter is not None and not req.waiter.done():
                req.waiter.set_exception(PayloadTooLarge(f"the request body is above {MAX_BODY} bytes",
                                                         code="too_large"))
            return
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.parsing
        assert req is not None
        req.complete = True
        self.parsing = None
        if req.waiter is not None and not req.waiter.done():
            req.waiter.set_result(None)
        if self.lingering:
            self._close()

    # -------------------------------------------------------------- serving
    def _may_read(self) -> bool:
        """Whether more may be read: not too many requests ahead (checked between reads: one read of a flood
        may queue more), and no body its function has not asked for."""
        req = self.parsing
        return not self.broken and len(self.queue) <= PIPELINED and (
            req is None or not req.head_complete or req.waiter is not None or _bodiless(req))

    async def _serve(self) -> None:
        try:
            await self._serve_requests()
        except BaseException:
            self._abort()  # (a task that ends otherwise never leaves a request unanswered on an open connection)
            raise

    async def _serve_requests(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self.transport is None or self.transport.is_closing():
                return
            req = self.queue[0]
            try:
                resp = await self.gw.invoke(self, req)
            except Exception as exc:  # noqa: BLE001 - a bug: the client gets a 500, the daemon goes on
                log.exception("function gateway: request failed: %s", exc)
                resp = error_response(500, "internal", "the gateway failed (see the daemon's log)", "-")
            if self.transport.is_closing():
                return
            self.queue.popleft()
            # a body left unread (not admitted, too large, cut) ends the connection, as does a broken stream
            # (after the requests read before it) and a stopping daemon
            last = not self.queue and (self.closing or self.eof)
            keep = req.keep_alive and req.complete and not req.too_large and not last \
                and resp.error != "shutting_down"
            try:
                self.transport.write(encode_response(resp, keep, req.head_only, req.http10))
            except Exception as exc:  # noqa: BLE001 - a bug: the connection ends, the daemon goes on
                log.exception("function gateway: an answer could not be sent: %s", exc)
                self._abort()
                return
            self.since = loop.time()
            if not keep:
                if (self.broken or not req.complete) and not self.eof:  # (data may come that is not read)
                    self._linger()
                else:
                    self._close()
                return
            if not await self._drained():
                return
            if self._may_read():
                self._resume()
            if not self.queue:
                self.since = loop.time()
                self.wakeup = loop.create_future()
                try:
                    await self.wakeup
                except asyncio.CancelledError:
                    return  # (the connection was lost)
                finally:
                    self.wakeup = None

    async def _drained(self) -> bool:
        """Wait while a slow reader has more than WRITE_HIGH bytes of answers to take (the next request waits
        too); False when it took none of them for the body timeout (it is then cut off) or went away."""
        assert self.transport is not None
        while self.write_paused is not None:
            before = self.transport.get_write_buffer_size()
            try:
                await asyncio.wait_for(asyncio.shield(self.write_paused), self.gw.body_timeout)
            except TimeoutError:
                if self.transport.get_write_buffer_size() >= before:
                    self._abort()  # (it reads nothing: its answers would hold memory for ever)
                    return False
        return not self.transport.is_closing()

    def fn_request(self, req: _Request) -> FnRequest | None:
        """The function's view of ``req``; None when its target is not a path (CONNECT host:port, "*")."""
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            return None
        if url.host and not req.url.startswith(b"http"):  # (an authority alone, as CONNECT sends)
            return None
        path = unquote((url.path or b"/").decode("latin-1"), errors="surrogateescape")  # decoded, as CGI's
        query = (url.query or b"").decode("latin-1")  # PATH_INFO is; the query string stays raw (RFC 3875)
        host, port = _host_port(req.headers.get("host", ""))
        return FnRequest(req.method, path, query, req.headers, b"", route="", server_name=host or "localhost",
                         server_port=self.port if port is None else port, remote_addr=self.peer)

    def reader(self, req: _Request) -> Any:
        async def read() -> bytes:
            if req.too_large:
                raise PayloadTooLarge(f"the request body is above {MAX_BODY} bytes", code="too_large")
            if not req.complete:
                if self.eof or self.broken:
                    raise BadRequest("the client closed the connection before its body ended", code="bad_body")
                if req.expect_continue and not req.http10 and self.transport is not None:
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                req.waiter = asyncio.get_running_loop().create_future()
                self._resume()
                timeout = self.gw.body_timeout
                try:
                    await asyncio.wait_for(req.waiter, timeout)
                except TimeoutError:
                    raise RequestTimeout(f"the body did not arrive within {timeout:g} s", code="slow_client") from None
            return b"".join(req.body)
        return read

    # -------------------------------------------------------------- the connection
    def idle_for(self, now: float) -> float:
        """Seconds without a whole request head to answer (0 while one is answered or waits its turn, and
        while lingering, which has a clock of its own)."""
        if self.queue or self.lingering or self.write_paused is not None or self.closed_at is not None:
            return 0.0
        return now - self.since

    def _pause(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.unfed and not self.broken:  # what was read and left waits first (on the loop's next turn:
            asyncio.get_running_loop().call_soon(self._refeed)  # parsing calls back into this connection)
            return
        if not self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def _refeed(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._feed()
        if not self.unfed and self._may_read():
            self._resume()

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """The stream cannot be parsed further: the requests read before it are still answered, then this
        one (``status``), and the connection closes."""
        self.broken = True
        self.closing = True
        req, self.parsing = self.parsing, None
        if req is not None and req.waiter is not None and not req.waiter.done():
            req.waiter.set_exception(BadRequest(message, code="bad_body"))
        if req is not None and req in self.queue:
            return  # (its head was whole: its answer, then the close, come from the serving task)
        if self.queue:
            bad = _Request()  # answered in its turn
            bad.head_complete = bad.complete = True
            bad.keep_alive = False
            bad.head_error = (status, kind, message)
            self.queue.append(bad)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_response(error_response(status, kind, message, "-"), False))
            self._linger()  # (what follows is dropped unread: closing at once would reset the connection)

    def _linger(self) -> None:
        """The answer went before the body was read (413, a full queue, a stopping daemon), or after a stream
        that could not be parsed: closing now, with unread data, would reset the connection and the client
        would not see the answer. What comes is read and dropped (the body's end closes the connection at
        once; at most LINGER_BYTES, for at most LINGER seconds, or until the client ends its side)."""
        self.lingering = True
        self.closing = True
        self.reading = False
        self._resume()
        asyncio.get_running_loop().call_later(LINGER, self._close)

    def _abort(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.closing = True
        if self.closed_at is None:
            self.closed_at = asyncio.get_running_loop().time()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def close_when_idle(self) -> None:
        """At shutdown: close now if nothing is being answered, else once the answers are sent."""
        self.closing = True
        if not self.queue and not self.lingering:  # (a lingering one closes by itself within LINGER)
            self._close()


def _bodiless(req: _Request) -> bool:
    cl = req.headers.get("content-length")
    return "transfer-encoding" not in req.headers and (cl is None or cl.strip() in ("", "0"))


def _host_port(host: str) -> tuple[str, int | None]:
    """The Host header's name (an IPv6 address without its brackets) and port (None when it names none)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port = host.partition(":")
    return name.lower(), int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else None


class Gateway:
    """The gateway's server: listens, counts and bounds connections, and answers each request through the
    controller (``InvokeFunction``)."""

    def __init__(self, controller: Controller, stats: GatewayStats, body_timeout: float = 30.0,
                 idle_timeout: float = 15.0) -> None:
        self.controller = controller
        self.stats = stats
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        self.lingering = 0
        self.connections: set[_Connection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._sweeper: asyncio.Task[None] | None = None

    def _protocol(self) -> asyncio.Protocol:
        if self.stats.open >= self.stats.cap:
            self.stats.refused += 1
            if self.stats.refused & (self.stats.refused - 1) == 0:  # 1, 2, 4, 8...: the log is not flooded
                log.warning("function gateway: %d connection(s) refused so far at its cap of %d ("
                            "[daemon] gateway_connections)", self.stats.refused, self.stats.cap)
            return _Refused(self)
        return _Connection(self)

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        """Listen on HOST:PORT (OSError when it cannot)."""
        self.server = await asyncio.get_running_loop().create_server(self._protocol, host, port, backlog=backlog,
                                                                     reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1] if self.server.sockets else port
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections without a whole request head for ``idle_timeout`` (slow-headers clients, idle
        keep-alive ones): one pass every quarter of it, not a timer per request."""
        loop = asyncio.get_running_loop()
        period = max(0.05, min(1.0, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in list(self.connections):
                if conn.closed_at is not None and now - conn.closed_at > max(self.body_timeout, LINGER):
                    conn._abort()  # closed, but its last answers were never taken: the place is given back
                elif conn.idle_for(now) >= self.idle_timeout:
                    conn._close()

    async def invoke(self, conn: _Connection, req: _Request) -> FnResponse:
        if req.head_error is not None:
            return error_response(*req.head_error, "-")
        if req.too_large or (req.headers.get("content-length", "0").strip().isdigit()
                             and int(req.headers.get("content-length", "0")) > MAX_BODY):
            req.too_large = True
            return error_response(413, "too_large", f"the request body is above {MAX_BODY} bytes", "-")
        fr = conn.fn_request(req)
        if fr is None:
            req.keep_alive = False
            return error_response(400, "bad_target", "the request's target is not a path", "-")
        if any(ord(ch) < 0x20 or ch == "\x7f" for ch in fr.path):
            return error_response(400, "bad_path", "the path holds a control character (%00-%1F)", "-")
        if req.complete:  # (the body came with the head: nothing to wait for)
            fr.body = b"".join(req.body)
            reader = None
        else:
            reader = conn.reader(req)
        try:
            return cast(FnResponse, await self.controller.apply(a.InvokeFunction(None, fr, reader)))
        except MicrovmError as exc:  # e.g. shutting down (503)
            return error_response(exc.status, exc.code, exc.message, "-")

    async def stop(self) -> None:
        """Stop listening (connections made stay, see ``cleanup``)."""
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def cleanup(self) -> None:
        """Close every connection: idle ones now, busy ones once their answer is sent (at most a second)."""
        for conn in list(self.connections):
            conn.close_when_idle()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()
