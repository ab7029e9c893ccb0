"""The HTTP API: parse a request into a typed call on the controller, encode the answer. Nothing else.

Every route is declared once in ``ROUTES``; the aiohttp router and the OpenAPI document are both built
from that table, so they cannot drift apart.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from .. import __version__
from ..engine import wt
from ..errors import BadRequest, MicrovmError, NotImplementedYet
from ..snapshot import dirty
from ..vmm import spec as schemas
from ..vmm.manager import Hypervisor
from ..vmm.state import VmState
from . import codec
from .metrics import Metrics

log = logging.getLogger("microvmd.api")

HV = web.AppKey("hypervisor", Hypervisor)
METRICS = web.AppKey("metrics", Metrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: str | None = None  # "json", "binary"
    tag: str = "vms"


ROUTE_TABLE = web.AppKey("routes", list[Route])


def hv(request: web.Request) -> Hypervisor:
    return request.app[HV]


def _bool(request: web.Request, name: str) -> bool:
    return request.query.get(name, "").lower() in ("1", "true", "yes")


# ------------------------------------------------------------------ system
async def info(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    return codec.respond(request, {
        "version": __version__, "wasmtime_version": wt.WASMTIME_VERSION, "api_version": "v1",
        "state_dir": str(h.cfg.state_dir), "socket": str(h.cfg.socket), "vms": h.counts(),
        "images": len(h.images.images), "uptime_s": round(time.time() - h.started, 3),
        "engine": {"fingerprint": h.opts.fingerprint(), "workers": h.sched.workers,
                   "epoch_interval_s": h.cfg.engine.epoch_interval},
        "event_loop": h.loop_lag.to_api(),
        "limits": {"memory": h.cfg.limits.memory, "max_memory": h.cfg.limits.max_memory,
                   "fuel": h.cfg.limits.fuel, "timeout": h.cfg.limits.timeout,
                   "upload": h.cfg.upload_limit},
        "snapshots": {"dirty_tracking": dirty.describe(h.cfg.engine.dirty_tracking)},
        "console": {"mode": h.cfg.engine.console, "file_descriptors": h.console_fds()},
    })


async def version(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, {"version": __version__, "wasmtime_version": wt.WASMTIME_VERSION,
                                   "api_version": "v1"})


async def openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(openapi_document(request.app[ROUTE_TABLE]))


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(text=request.app[METRICS].render(hv(request)), content_type="text/plain",
                        charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})


# ------------------------------------------------------------------ images
async def image_import(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    data = await codec.read_limited(request, h.cfg.upload_limit)
    if not data:
        raise BadRequest("empty body: send the module's bytes", code="empty_body")
    img = await h.import_image(data, request.query.get("name") or None, request.query.get("entry") or None,
                               asyncify=not _bool(request, "no_asyncify"))
    return codec.respond(request, img.to_api(), status=201)


async def image_list(request: web.Request) -> web.StreamResponse:
    images = hv(request).images
    return codec.respond(request, {"images": [i.to_api() for i in images.list()],
                                   "importing": list(images.importing.values())})


async def image_get(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, hv(request).images.resolve(request.match_info["ref"]).to_api())


async def image_update(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    body = await codec.decode(request, h.cfg.json_limit)
    img = await h.sched.on_io(h.images.update_manifest, request.match_info["ref"], body)
    return codec.respond(request, img.to_api())


async def image_rm(request: web.Request) -> web.StreamResponse:
    await hv(request).remove_image(request.match_info["ref"])
    return web.Response(status=204)


# ------------------------------------------------------------------ VMs
async def vm_create(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    spec, start = schemas.vm_spec(await codec.decode(request, h.cfg.json_limit))
    wait = _bool(request, "wait")
    if wait and not start:
        raise BadRequest("wait=true needs start=true", code="invalid_query")
    vm = await h.create(spec, start=start)
    if wait:  # one round trip for a whole run: the answer carries the exit record
        await h.wait(vm)
    return codec.respond(request, vm.to_api(), status=201)


async def vm_list(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, {"vms": [v.to_api() for v in hv(request).list(_bool(request, "all"))]})


async def vm_get(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, hv(request).get(request.match_info["ref"]).to_api())


async def vm_rm(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    await h.remove(h.get(request.match_info["ref"]), _bool(request, "force"))
    return web.Response(status=204)


def _action(name: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        h = hv(request)
        vm = await getattr(h, name)(h.get(request.match_info["ref"]))
        return codec.respond(request, vm.to_api())
    handler.__name__ = f"vm_{name}"
    return handler


async def vm_start(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = await h.start(h.get(request.match_info["ref"]))
    if _bool(request, "wait"):  # start and wait in one request: the answer is the exit record, as wait's
        return codec.respond(request, await h.wait(vm))
    return codec.respond(request, vm.to_api())


async def vm_wait(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    t = request.query.get("timeout")
    try:
        timeout = float(t) if t else None
    except ValueError:
        raise BadRequest(f"timeout must be a number of seconds, got {t!r}", code="invalid_query") from None
    return codec.respond(request, await h.wait(vm, timeout))


async def vm_fuel(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    body = await codec.decode(request, h.cfg.json_limit)
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise BadRequest("field 'amount' must be a positive integer", code="invalid_field")
    return codec.respond(request, (await h.add_fuel(vm, amount)).to_api())


async def vm_logs(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    stream = request.query.get("stream", "all")
    if stream not in ("stdout", "stderr", "all"):
        raise BadRequest("stream must be stdout, stderr or all", code="invalid_query")
    streams = ["stdout", "stderr"] if stream == "all" else [stream]
    follow = _bool(request, "follow")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8",
                                       "X-Content-Type-Options": "nosniff"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    offsets = {s: 0 for s in streams}
    try:
        while True:
            # a parked out_of_fuel VM writes nothing until fuel is added: the stream ends, like at exit
            ended = vm.state.terminal or vm.state == VmState.OUT_OF_FUEL or vm.id not in h.vms
            wrote = False
            for s in streams:
                while True:
                    data, offsets[s] = await h.sched.on_io(vm.console.read, s, offsets[s])
                    if not data:
                        break
                    wrote = True
                    await resp.write(data)
            if not follow or ended:
                break
            if not wrote:
                ev = vm.changed
                try:
                    await asyncio.wait_for(ev.wait(), 0.05)
                except TimeoutError:
                    pass
        await resp.write_eof()
    except (ConnectionResetError, ClientConnectionResetError):
        pass  # the follower went away
    return resp


# ------------------------------------------------------------------ functions (not built yet)
async def functions_unavailable(request: web.Request) -> web.StreamResponse:
    raise NotImplementedYet("serverless functions and their HTTP gateway are not part of this microvmd yet; "
                            "run the guest as a VM with --publish instead", code="not_implemented")


# ------------------------------------------------------------------ table
ROUTES: list[Route] = [
    Route("GET", "/v1/info", info, "Daemon version, state and VM counts", tag="system"),
    Route("GET", "/v1/version", version, "Daemon and wasmtime versions", tag="system"),
    Route("GET", "/v1/openapi.json", openapi, "This document", tag="system"),
    Route("GET", "/metrics", metrics, "Prometheus text metrics", tag="system"),
    Route("POST", "/v1/images", image_import, "Import a module (.wasm bytes or WAT text); query: name, entry, "
          "no_asyncify (keep a plain WASI module as it is instead of rewriting it for snapshots)",
          body="binary", tag="images"),
    Route("GET", "/v1/images", image_list, "List images", tag="images"),
    Route("GET", "/v1/images/{ref}", image_get, "Inspect an image (name, sha256:digest or digest prefix)",
          tag="images"),
    Route("PATCH", "/v1/images/{ref}", image_update,
          "Set the image's defaults: entry, args, env, limits {fuel, memory, timeout}", body="json", tag="images"),
    Route("DELETE", "/v1/images/{ref}", image_rm, "Remove an image (409 while VMs use it)", tag="images"),
    Route("POST", "/v1/vms", vm_create,
          "Create a VM (start=true starts it; query wait=true answers once it has exited or run out of fuel)",
          body="json"),
    Route("GET", "/v1/vms", vm_list, "List VMs (all=true includes exited ones)"),
    Route("GET", "/v1/vms/{ref}", vm_get, "Inspect a VM (id, id prefix or name)"),
    Route("DELETE", "/v1/vms/{ref}", vm_rm, "Remove a VM (force=true kills a live one first)"),
    Route("POST", "/v1/vms/{ref}/start", vm_start,
          "Start a created VM (query wait=true answers, like wait, once it has exited or run out of fuel)"),
    Route("POST", "/v1/vms/{ref}/stop", _action("stop"), "Stop a VM at its next yield point"),
    Route("POST", "/v1/vms/{ref}/kill", _action("kill"), "Kill a VM"),
    Route("POST", "/v1/vms/{ref}/pause", _action("pause"), "Pause a running VM (it holds no thread)"),
    Route("POST", "/v1/vms/{ref}/resume", _action("resume"), "Resume a paused VM"),
    Route("POST", "/v1/vms/{ref}/wait", vm_wait, "Wait until the VM exits or runs out of fuel; query: timeout"),
    Route("POST", "/v1/vms/{ref}/fuel", vm_fuel, "Add fuel; an out_of_fuel VM continues", body="json"),
    Route("GET", "/v1/vms/{ref}/logs", vm_logs, "Console output; query: follow, stream=stdout|stderr|all"),
] + [
    Route(m, p, functions_unavailable, "Functions: not built yet (501 not_implemented)", tag="functions")
    for m, p in (("POST", "/v1/functions"), ("GET", "/v1/functions"), ("GET", "/v1/functions/{name}"),
                 ("DELETE", "/v1/functions/{name}"), ("POST", "/v1/functions/{name}/invoke"),
                 ("GET", "/v1/functions/{name}/logs"))
]


def add_routes(app: web.Application, routes: list[Route]) -> None:
    for r in routes:
        app.router.add_route(r.method, r.path, r.handler)


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    error = {"$ref": "#/components/responses/Error"}
    for r in routes:
        op: dict[str, Any] = {
            "summary": r.summary, "operationId": r.handler.__name__, "tags": [r.tag],
            "responses": {"200": {"description": "OK"}, "4XX": error, "5XX": error},
        }
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in r.path.split("/") if p.startswith("{")]
        if params:
            op["parameters"] = params
        if r.body == "json":
            op["requestBody"] = {"content": {"application/json": {"schema": {"type": "object"}},
                                             "application/msgpack": {"schema": {"type": "object"}}}}
        elif r.body == "binary":
            op["requestBody"] = {"content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "microvmd", "version": __version__,
                 "description": "Local API of the microvmd WebAssembly micro-VM hypervisor."},
        "paths": paths,
        "components": {"responses": {"Error": {"description": "Error", "content": {"application/json": {
            "schema": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "code": {"type": "string"}, "message": {"type": "string"}}}}}}}}}},
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
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.path, exc.message)
        return codec.respond(request, exc.to_dict(), status=exc.status)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        return codec.respond(request, {"error": {"code": code, "message": exc.reason}}, status=exc.status)
    except asyncio.CancelledError:
        raise
    except OSError as exc:
        # the host ran out of something: say which, with a status a client can retry on
        status = {errno.EMFILE: 503, errno.ENFILE: 503, errno.ENOMEM: 503, errno.ENOSPC: 507}.get(exc.errno or 0, 500)
        code = {503: "resource_exhausted", 507: "insufficient_storage"}.get(status, "internal_error")
        log.error("%s %s: %s", request.method, request.path, exc)
        text = f"host resource exhausted: {exc.strerror or exc}" if status != 500 else f"internal error: {exc}"
        return codec.respond(request, {"error": {"code": code, "message": text}}, status=status)
    except Exception as exc:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return codec.respond(request, {"error": {"code": "internal_error", "message": f"internal error: {exc}"}},
                             status=500)
    finally:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        request.app[METRICS].observe(request.method, route, status, time.perf_counter() - t0)


def make_app(h: Hypervisor, routes: list[Route], middlewares: list[Any] | None = None) -> web.Application:
    """The application serving ``routes`` (composed by ``api.routes.api_routes``)."""
    app = web.Application(middlewares=[error_middleware, *(middlewares or [])],
                          client_max_size=h.cfg.upload_limit + 1)
    app[HV] = h
    app[METRICS] = Metrics()
    app[ROUTE_TABLE] = routes
    add_routes(app, routes)
    return app
