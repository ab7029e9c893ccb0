"""The function gateway: HTTP/1.1 on TCP (``--gateway HOST:PORT``), every request handed to the function
whose route matches its path (docs/functions.md). Thin like the API: decode the HTTP request into a
``FnRequest``, apply ``InvokeFunction``, encode the ``FnResponse``."""
from __future__ import annotations

import asyncio
import logging
import re

from aiohttp import web
from multidict import CIMultiDict

from ..control import actions as a
from ..control.controller import Controller
from ..errors import MicrovmError
from ..functions.http import FnRequest, FnResponse, error_response
from ..functions.service import MAX_BODY

log = logging.getLogger("microvmd.gateway")

CONTROLLER = web.AppKey("controller", Controller)
READ_TIMEOUT = 30.0  # seconds for a client to send its whole body (a slow client gets 408, not a slot forever)
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
        try:
            data = await asyncio.wait_for(request.read(), READ_TIMEOUT)
        except TimeoutError:
            return _answer(error_response(408, "slow_client", f"the body did not arrive within {READ_TIMEOUT:g} s",
                                          "-"))
        except web.HTTPRequestEntityTooLarge:
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
        req = FnRequest(request.method, path, query, headers, data, route="",
                        server_name=host, server_port=port, remote_addr=peer)
        resp: FnResponse = await request.app[CONTROLLER].apply(a.InvokeFunction(None, req))
    except MicrovmError as exc:  # e.g. shutting down (503)
        resp = error_response(exc.status, exc.code, exc.message, "-")
    return _answer(resp)


def make_gateway(controller: Controller) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY + 1)
    app[CONTROLLER] = controller
    app.router.add_route("*", "/{tail:.*}", serve)
    return app
