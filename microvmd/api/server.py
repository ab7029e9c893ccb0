"""The HTTP API: parse a request into a typed call on the controller, encode the answer. Nothing else.

Every route is declared once in ``ROUTES``; the aiohttp router and the OpenAPI document are both built
from that table, so they cannot drift apart.
"""
from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from .. import __version__, contract
from ..control import actions as a
from ..control.controller import Controller
from ..errors import BadRequest, MicrovmError, ShuttingDown
from ..vmm.manager import Hypervisor
from . import codec
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics

log = logging.getLogger("microvmd.api")

HV = web.AppKey("hypervisor", Hypervisor)
CONTROLLER = web.AppKey("controller", Controller)
T = TypeVar("T")
METRICS = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


Body = type[msgspec.Struct] | str | None


@dataclass(frozen=True)
class Route:
    """One route. ``request`` and ``response`` are contract types (a JSON or MessagePack body), or
    ``"binary"`` (application/octet-stream), ``"text"`` (text/plain), or None (no body; a 204 answer)."""

    method: str
    path: str
    handler: Handler
    summary: str
    request: Body = None
    response: Body = None
    status: int = 200
    tag: str = "vms"
    query: tuple[Query, ...] = ()


@dataclass(frozen=True)
class Query:
    """A query parameter of a route, for the OpenAPI document (handlers read it with ``_bool`` and co.)."""

    name: str
    schema: dict[str, Any]
    description: str


FLAG = {"type": "boolean"}
DURABLE = Query("durable", FLAG, "false: answer before the files are fsynced (default true: on stable storage)")


ROUTE_TABLE = web.AppKey("routes", list[Route])
OPENAPI = web.AppKey("openapi", dict[str, bytes])  # the document, built on first use


class Drain:
    """The API's part in shutdown: which connections are busy with a request, so that idle ones can be closed
    at once while busy ones keep reading (a request whose body is still arriving completes) and close after
    their answer. aiohttp's own pre_shutdown() stops reading busy connections too, so an upload in flight
    would hang until it is cancelled."""

    def __init__(self) -> None:
        self.busy: dict[object, int] = {}  # the connection (aiohttp's protocol object) -> requests on it
        self.draining = False

    def enter(self, conn: object) -> None:
        self.busy[conn] = self.busy.get(conn, 0) + 1

    def leave(self, conn: object) -> None:
        n = self.busy.pop(conn, 1) - 1
        if n > 0:
            self.busy[conn] = n

    async def drain(self, server: web.Server | None, timeout: float) -> int:
        """Until every connection has closed (answers now say ``Connection: close``), at most ``timeout``
        seconds; returns how many are still open. Call it after the listening sites have stopped."""
        self.draining = True
        if server is None:
            return 0
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while server.connections:
            for conn in server.connections:
                if conn not in self.busy:
                    conn.close()  # idle keep-alive: closes now (a request already read is still handled)
            if loop.time() >= end:
                break
            await asyncio.sleep(0.01)
        return len(server.connections)


DRAIN = web.AppKey("drain", Drain)


def hv(request: web.Request) -> Hypervisor:
    return request.app[HV]


async def apply(request: web.Request, action: a.Action) -> Any:
    return await request.app[CONTROLLER].apply(action)


def _bool(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


def durable(request: web.Request) -> bool:
    """``?durable=false``: acknowledge before the files are fsynced (the caller can lose them in a power loss)."""
    return request.query.get("durable", "").lower() not in ("0", "false", "no")


async def body(request: web.Request, typ: type[T]) -> T:
    return await codec.decode(request, typ, request.app[HV].cfg.json_limit)


# ------------------------------------------------------------------ system
async def info(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Info, await apply(request, a.GetInfo()))


async def version(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Version, await apply(request, a.GetVersion()))


async def openapi(request: web.Request) -> web.StreamResponse:
    cache = request.app[OPENAPI]
    if "doc" not in cache:  # built on first use (~8 ms), then served as it is
        cache["doc"] = json.dumps(openapi_document(request.app[ROUTE_TABLE])).encode()
    return web.Response(body=cache["doc"], content_type="application/json")


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": METRICS_CONTENT_TYPE,
                                                                    "X-Content-Type-Options": "nosniff"})


def client_of(request: web.Request) -> str:
    """Who sent a request, for fairness between clients (the compile pool): the peer's process on the Unix
    socket (SO_PEERCRED), the peer's address on TCP."""
    t = request.transport
    sock = t.get_extra_info("socket") if t is not None else None
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
            return f"pid {pid} uid {uid}"
        except OSError:
            return "unix"
    peer = t.get_extra_info("peername") if t is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


# ------------------------------------------------------------------ images
async def image_import(request: web.Request) -> web.StreamResponse:
    data = await codec.read_limited(request, hv(request).cfg.upload_limit)
    act = a.ImportImage(data, request.query.get("name") or None, request.query.get("entry") or None,
                        asyncify=not _bool(request, "no_asyncify"), durable=durable(request),
                        client=client_of(request))
    return codec.reply(request, contract.Image, await apply(request, act), status=201)


async def image_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.ImageList, await apply(request, a.ListImages()))


async def image_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Image, await apply(request, a.GetImage(request.match_info["ref"])))


async def image_update(request: web.Request) -> web.StreamResponse:
    act = a.UpdateImage(request.match_info["ref"], await body(request, contract.ImagePatch))
    return codec.reply(request, contract.Image, await apply(request, act))


async def image_rm(request: web.Request) -> web.StreamResponse:
    await apply(request, a.RemoveImage(request.match_info["ref"]))
    return web.Response(status=204)


# ------------------------------------------------------------------ VMs
async def vm_create(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.VmCreate)
    act = a.CreateVm(b, start=b.start, wait=_bool(request, "wait"), durable=durable(request))
    return codec.reply(request, contract.Vm, await apply(request, act), status=201)


async def vm_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.VmList, await apply(request, a.ListVms(_bool(request, "all"))))


async def vm_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Vm, await apply(request, a.GetVm(request.match_info["ref"])))


async def vm_rm(request: web.Request) -> web.StreamResponse:
    await apply(request, a.RemoveVm(request.match_info["ref"], _bool(request, "force")))
    return web.Response(status=204)


def _vm_action(kind: Callable[[str], a.Action], name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return codec.reply(request, contract.Vm, await apply(request, kind(request.match_info["ref"])))
    handler.__name__ = f"vm_{name}"
    return handler


async def vm_start(request: web.Request) -> web.StreamResponse:
    act = a.StartVm(request.match_info["ref"], wait=_bool(request, "wait"))
    return codec.reply(request, contract.Vm, await apply(request, act))


async def vm_wait(request: web.Request) -> web.StreamResponse:
    t = request.query.get("timeout")
    try:
        timeout = float(t) if t else None
    except ValueError:
        timeout = math.nan
    if timeout is not None and not 0 <= timeout < math.inf:
        raise BadRequest(f"timeout must be a finite, non-negative number of seconds, got {t!r}",
                         code="invalid_query")
    return codec.reply(request, contract.WaitResult, await apply(request, a.WaitVm(request.match_info["ref"], timeout)))


async def vm_fuel(request: web.Request) -> web.StreamResponse:
    act = a.AddFuel(request.match_info["ref"], (await body(request, contract.FuelAdd)).amount)
    return codec.reply(request, contract.Vm, await apply(request, act))


async def vm_logs(request: web.Request) -> web.StreamResponse:
    stream = request.query.get("stream", "all")
    if stream not in ("stdout", "stderr", "all"):
        raise BadRequest("stream must be stdout, stderr or all", code="invalid_query")
    streams = ("stdout", "stderr") if stream == "all" else (stream,)
    act = a.ReadLogs(request.match_info["ref"], streams, _bool(request, "follow"), _bool(request, "from_end"))
    logs: a.LogStream = await apply(request, act)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                       "X-Content-Type-Options": "nosniff"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        async for chunk in logs.chunks:
            await resp.write(chunk)
        await resp.write_eof()
    except (ConnectionResetError, ClientConnectionResetError):
        pass  # the follower went away
    return resp


async def vm_stdin(request: web.Request) -> web.StreamResponse:
    act = a.FeedStdin(request.match_info["ref"], request.content.iter_any())
    return codec.reply(request, contract.StdinResult, await apply(request, act))


# ------------------------------------------------------------------ table
ROUTES: list[Route] = [
    Route("GET", "/v1/info", info, "Daemon version, state and VM counts", response=contract.Info, tag="system"),
    Route("GET", "/v1/version", version, "Daemon and wasmtime versions", response=contract.Version, tag="system"),
    Route("GET", "/v1/openapi.json", openapi, "This document (generated from microvmd/contract.py)",
          response="json", tag="system"),
    Route("GET", "/metrics", metrics, "Prometheus text metrics", response="text", tag="system"),
    Route("POST", "/v1/images", image_import, "Import a module (.wasm bytes or WAT text); query: name, entry, "
          "no_asyncify (keep a plain WASI module as it is instead of rewriting it for snapshots), durable=false",
          request="binary", response=contract.Image, status=201, tag="images",
          query=(Query("name", {"type": "string"}, "the image's name"),
                 Query("entry", {"type": "string"}, "the export to call (default _start)"),
                 Query("no_asyncify", FLAG, "keep a plain WASI module as it is (not snapshottable while it runs)"),
                 DURABLE)),
    Route("GET", "/v1/images", image_list, "List images (and the imports whose rewrite is still running)",
          response=contract.ImageList, tag="images"),
    Route("GET", "/v1/images/{ref}", image_get, "Inspect an image (name, sha256:digest or digest prefix)",
          response=contract.Image, tag="images"),
    Route("PATCH", "/v1/images/{ref}", image_update,
          "Set the image's defaults: entry, args, env, limits {fuel, memory, timeout}", request=contract.ImagePatch,
          response=contract.Image, tag="images"),
    Route("DELETE", "/v1/images/{ref}", image_rm, "Remove an image (409 while VMs use it)", status=204,
          tag="images"),
    Route("POST", "/v1/vms", vm_create,
          "Create a VM (start=true starts it; query wait=true answers once it has exited or run out of fuel, "
          "durable=false before its record is fsynced)",
          request=contract.VmCreate, response=contract.Vm, status=201,
          query=(Query("wait", FLAG, "answer once the VM has exited or run out of fuel (needs start)"), DURABLE)),
    Route("GET", "/v1/vms", vm_list, "List VMs (all=true includes exited ones)", response=contract.VmList,
          query=(Query("all", FLAG, "include VMs that have ended"),)),
    Route("GET", "/v1/vms/{ref}", vm_get, "Inspect a VM (id, id prefix or name)", response=contract.Vm),
    Route("DELETE", "/v1/vms/{ref}", vm_rm, "Remove a VM (force=true kills a live one first)", status=204,
          query=(Query("force", FLAG, "kill a live VM first"),)),
    Route("POST", "/v1/vms/{ref}/start", vm_start,
          "Start a created VM (query wait=true answers once it has exited or run out of fuel)",
          response=contract.Vm, query=(Query("wait", FLAG, "answer once the VM has exited or run out of fuel"),)),
    Route("POST", "/v1/vms/{ref}/stop", _vm_action(a.StopVm, "stop"), "Stop a VM at its next yield point",
          response=contract.Vm),
    Route("POST", "/v1/vms/{ref}/kill", _vm_action(a.KillVm, "kill"), "Kill a VM", response=contract.Vm),
    Route("POST", "/v1/vms/{ref}/pause", _vm_action(a.PauseVm, "pause"), "Pause a running VM (it holds no thread)",
          response=contract.Vm),
    Route("POST", "/v1/vms/{ref}/resume", _vm_action(a.ResumeVm, "resume"), "Resume a paused VM", response=contract.Vm),
    Route("POST", "/v1/vms/{ref}/wait", vm_wait, "Wait until the VM exits or runs out of fuel; query: timeout",
          response=contract.WaitResult,
          query=(Query("timeout", {"type": "number", "exclusiveMinimum": 0}, "seconds (408 wait_timeout after)"),)),
    Route("POST", "/v1/vms/{ref}/fuel", vm_fuel, "Add fuel; an out_of_fuel VM continues", request=contract.FuelAdd,
          response=contract.Vm),
    Route("GET", "/v1/vms/{ref}/logs", vm_logs,
          "Console output; query: follow, stream=stdout|stderr|all, from_end (only what is written from now on)",
          response="text",
          query=(Query("follow", FLAG, "keep streaming until the VM ends"),
                 Query("stream", {"type": "string", "enum": ["stdout", "stderr", "all"]}, "which stream (all)"),
                 Query("from_end", FLAG, "start at what is written next"))),
    Route("POST", "/v1/vms/{ref}/stdin", vm_stdin,
          "Stream the body to the guest's standard input (a VM created with stdin: true); the end of the body "
          "closes it", request="binary", response=contract.StdinResult),
]


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)


REF = "#/components/schemas/{name}"
MEDIA = {"binary": ("application/octet-stream", {"type": "string", "format": "binary"}),
         "text": ("text/plain", {"type": "string"}),
         "json": ("application/json", {"type": "object", "description": "an OpenAPI 3.1 document",
                                       "properties": {"openapi": {"type": "string"}, "info": {"type": "object"},
                                                      "paths": {"type": "object"},
                                                      "components": {"type": "object"}}})}


def _content(body: Body, schemas: dict[type, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(body, str):
        media, schema = MEDIA[body]
        return {media: {"schema": schema}}
    assert body is not None
    schema = schemas[body]
    return {"application/json": {"schema": schema}, "application/msgpack": {"schema": schema}}


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    """OpenAPI 3.1, its schemas generated from the contract types the routes name."""
    types = list(dict.fromkeys([contract.ErrorBody] + [t for r in routes for t in (r.request, r.response)
                                                        if isinstance(t, type)]))
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    schemas = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    error = {"$ref": "#/components/responses/Error"}
    seen: set[str] = set()
    for r in routes:
        op_id = r.handler.__name__
        if op_id in seen:  # one handler serving several routes
            op_id = f"{op_id}_{r.method.lower()}_" + "_".join(p.strip("{}") for p in r.path.split("/")[2:])
        seen.add(op_id)
        ok: dict[str, Any] = {"description": "OK" if r.status < 300 else "Not implemented"}
        if r.response is not None and r.status < 300:
            ok["content"] = _content(r.response, schemas)
        responses: dict[str, Any] = {str(r.status): ok, "4XX": error, "5XX": error}
        if r.status >= 300:
            responses = {str(r.status): error}
        op: dict[str, Any] = {"summary": r.summary, "operationId": op_id, "tags": [r.tag], "responses": responses}
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in r.path.split("/") if p.startswith("{")]
        params += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                    "description": q.description} for q in r.query]
        if params:
            op["parameters"] = params
        if r.request is not None:
            op["requestBody"] = {"required": r.request == "binary", "content": _content(r.request, schemas)}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "microvmd", "version": __version__,
                 "description": "Local API of the microvmd WebAssembly micro-VM hypervisor. The schemas are "
                                "generated from microvmd/contract.py."},
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": {"Error": {"description": "Error", "content": {
                "application/json": {"schema": schemas[contract.ErrorBody]},
                "application/msgpack": {"schema": schemas[contract.ErrorBody]}}}},
        },
    }


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except MicrovmError as exc:
        status = exc.status
        if exc.status >= 500 and not isinstance(exc, ShuttingDown):
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return codec.error(request, exc.code, exc.message, exc.status)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        resp = codec.error(request, code, exc.reason, exc.status)
        if "Allow" in exc.headers:  # a 405 says which methods the path has
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        # the host ran out of something: say which, with a status a client can retry on
        status = {errno.EMFILE: 503, errno.ENFILE: 503, errno.ENOMEM: 503, errno.ENOSPC: 507}.get(exc.errno or 0, 500)
        code = {503: "resource_exhausted", 507: "insufficient_storage"}.get(status, "internal_error")
        log.error("%s %s: %s", request.method, request.path, exc)
        text = f"host resource exhausted: {exc.strerror or exc}" if status != 500 else f"internal error: {exc}"
        return codec.error(request, code, text, status)
    except Exception as exc:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return codec.error(request, "internal_error", f"internal error: {exc}", 500)
    finally:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        request.app[METRICS].observe(request.method, route, status, time.perf_counter() - t0)


@web.middleware
async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    drain = request.app[DRAIN]
    conn = request.protocol
    drain.enter(conn)
    try:
        resp = await handler(request)
        if drain.draining:
            resp.force_close()  # the daemon is stopping: this connection ends with this answer
        return resp
    finally:
        drain.leave(conn)


def make_app(controller: Controller, routes: list[Route], middlewares: list[Any] | None = None) -> web.Application:
    """The application serving ``routes`` (composed by ``api.routes.api_routes``) through ``controller``."""
    h = controller.hv
    app = web.Application(middlewares=[drain_middleware, error_middleware, *(middlewares or [])],
                          client_max_size=h.cfg.upload_limit + 1)
    app[HV] = h
    app[CONTROLLER] = controller
    app[DRAIN] = Drain()
    app[METRICS] = Metrics(h, controller.functions)
    app[ROUTE_TABLE] = routes
    app[OPENAPI] = {}
    add_routes(app, routes)
    return app
