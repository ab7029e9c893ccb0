"""``/v1/functions`` routes: deploy, list, inspect, remove, invoke and read the log of functions (thin:
decode, call the controller, encode). The HTTP gateway that serves them to the world is ``gateway.py``."""
from __future__ import annotations

import base64
import binascii
from urllib.parse import urlsplit

from aiohttp import web

from .. import contract
from ..control import actions as a
from ..errors import BadRequest
from ..functions.http import FnRequest, FnResponse
from . import codec
from .server import Route, apply, body


async def fn_deploy(request: web.Request) -> web.StreamResponse:
    spec = await body(request, contract.FunctionDeploy)
    return codec.reply(request, contract.Function, await apply(request, a.DeployFunction(spec)), status=201)


async def fn_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.FunctionList, await apply(request, a.ListFunctions()))


async def fn_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Function, await apply(request, a.GetFunction(request.match_info["name"])))


async def fn_rm(request: web.Request) -> web.StreamResponse:
    await apply(request, a.RemoveFunction(request.match_info["name"]))
    return web.Response(status=204)


async def fn_logs(request: web.Request) -> web.StreamResponse:
    text: str = await apply(request, a.ReadFunctionLogs(request.match_info["name"]))
    return web.Response(text=text, content_type="text/plain", headers={"X-Content-Type-Options": "nosniff"})


def to_fn_request(inv: contract.InvokeRequest) -> FnRequest:
    if inv.body is not None and inv.body_base64 is not None:
        raise BadRequest("give body or body_base64, not both", code="invalid_field")
    data = b""
    if inv.body_base64 is not None:
        try:
            data = base64.b64decode(inv.body_base64, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("body_base64 is not base64", code="invalid_field") from None
    elif inv.body is not None:
        data = inv.body.encode()
    parts = urlsplit(inv.path)
    return FnRequest(inv.method, parts.path or "/", parts.query, {k.lower(): v for k, v in inv.headers.items()},
                     data, route="", server_name="localhost", remote_addr="unix")


def to_invoke_result(resp: FnResponse) -> contract.InvokeResult:
    try:
        text: str | None = resp.body.decode("utf-8")
        b64 = None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(resp.body).decode("ascii")
    return contract.InvokeResult(resp.status, resp.headers, text, b64, resp.request_id)


async def fn_invoke(request: web.Request) -> web.StreamResponse:
    inv = await body(request, contract.InvokeRequest)
    resp: FnResponse = await apply(request, a.InvokeFunction(request.match_info["name"], to_fn_request(inv)))
    return codec.reply(request, contract.InvokeResult, to_invoke_result(resp))


ROUTES: list[Route] = [
    Route("POST", "/v1/functions", fn_deploy,
          "Deploy (or replace) a function: an image (wagi) or a Python or JavaScript handler's source",
          request=contract.FunctionDeploy, response=contract.Function, status=201, tag="functions"),
    Route("GET", "/v1/functions", fn_list, "List functions (and where the gateway listens)",
          response=contract.FunctionList, tag="functions"),
    Route("GET", "/v1/functions/{name}", fn_get, "Inspect a function: its route, limits and counters",
          response=contract.Function, tag="functions"),
    Route("DELETE", "/v1/functions/{name}", fn_rm, "Remove a function (requests in flight finish)", status=204,
          tag="functions"),
    Route("POST", "/v1/functions/{name}/invoke", fn_invoke,
          "Invoke a function with the HTTP request in the body; the answer is its HTTP response",
          request=contract.InvokeRequest, response=contract.InvokeResult, tag="functions"),
    Route("GET", "/v1/functions/{name}/logs", fn_logs,
          "The function's log: failed requests (with their request ids) and their guests' stderr",
          response="text", tag="functions"),
]
