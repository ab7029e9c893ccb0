"""Snapshot, restore and migration routes (thin: decode, call the controller, encode)."""
from __future__ import annotations

import logging

from aiohttp import web

from ..errors import BadRequest
from ..snapshot.controller import Snapshots, drain
from ..snapshot.migrate import migrate
from . import codec
from .server import Route, hv

SNAPSHOTS = web.AppKey("snapshots", Snapshots)
log = logging.getLogger("microvmd.api")


def snaps(request: web.Request) -> Snapshots:
    return request.app[SNAPSHOTS]


async def snapshot_create(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    body = await codec.decode(request, h.cfg.json_limit)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("field 'name' must be a string", code="invalid_field")
    return codec.respond(request, await snaps(request).create(vm, name, bool(body.get("diff"))), status=201)


async def snapshot_list(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, {"snapshots": await snaps(request).list_all()})


async def snapshot_get(request: web.Request) -> web.StreamResponse:
    return codec.respond(request, await snaps(request).get(request.match_info["name"]))


async def snapshot_rm(request: web.Request) -> web.StreamResponse:
    await snaps(request).remove(request.match_info["name"])
    return web.Response(status=204)


async def snapshot_export(request: web.Request) -> web.StreamResponse:
    s = snaps(request)
    m, gen = await s.export_blocks(request.match_info["name"])
    resp = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{m["name"]}.mvsnap"'})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        await drain(gen, hv(request).sched.on_io, resp.write)
        await resp.write_eof()
    except Exception as exc:
        # the status line is gone: the only honest signal left is to cut the stream (it has no end record,
        # so an importer refuses it as truncated)
        log.error("export of snapshot %s failed mid-stream: %s", m["name"], exc)
        if request.transport is not None:
            request.transport.close()
    return resp


async def snapshot_import(request: web.Request) -> web.StreamResponse:
    summary = await snaps(request).import_stream(request.content.readexactly)
    return codec.respond(request, summary, status=201)


async def snapshot_restore(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    body = await codec.decode(request, h.cfg.json_limit)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("field 'name' must be a string", code="invalid_field")
    vm = await snaps(request).restore(request.match_info["name"], name, bool(body.get("start")))
    return codec.respond(request, vm.to_api(), status=201)


async def snapshot_missing(request: web.Request) -> web.StreamResponse:
    body = await codec.decode(request, hv(request).cfg.json_limit)
    hashes = body.get("chunks")
    if not isinstance(hashes, list) or len(hashes) > 1 << 20 or not all(
            isinstance(x, str) and len(x) == 64 for x in hashes):
        raise BadRequest("field 'chunks' must be a list of hex SHA-256 chunk hashes", code="invalid_field")
    try:
        raw = [bytes.fromhex(x) for x in hashes]
    except ValueError:
        raise BadRequest("field 'chunks' must be a list of hex SHA-256 chunk hashes", code="invalid_field") from None
    missing = snaps(request).missing(raw)
    return codec.respond(request, {"missing": [h.hex() for h in missing]})


async def vm_migrate(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    body = await codec.decode(request, h.cfg.json_limit)
    to = body.get("to")
    token = body.get("token")
    if not isinstance(to, str) or not to:
        raise BadRequest("field 'to' is required: unix:///path/to.sock or https://HOST:PORT", code="invalid_field")
    if token is not None and not isinstance(token, str):
        raise BadRequest("field 'token' must be a string", code="invalid_field")
    ca_file = body.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.startswith("/")):
        raise BadRequest("field 'ca_file' must be an absolute path on the daemon's host", code="invalid_field")
    return codec.respond(request, await migrate(h, snaps(request), vm, to, token, ca_file))


ROUTES: list[Route] = [
    Route("POST", "/v1/vms/{ref}/snapshots", snapshot_create,
          "Snapshot a VM (name, diff); a running Asyncify guest is taken at its next suspension point",
          body="json", tag="snapshots"),
    Route("GET", "/v1/snapshots", snapshot_list, "List snapshots", tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}", snapshot_get, "Inspect a snapshot", tag="snapshots"),
    Route("DELETE", "/v1/snapshots/{name}", snapshot_rm, "Remove a snapshot", tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}/export", snapshot_export,
          "Export a snapshot (and its image) as one portable stream", tag="snapshots"),
    Route("POST", "/v1/snapshots/import", snapshot_import, "Import an exported snapshot stream",
          body="binary", tag="snapshots"),
    Route("POST", "/v1/snapshots/{name}/restore", snapshot_restore, "Restore a snapshot as a new VM (name, start)",
          body="json", tag="snapshots"),
    Route("POST", "/v1/snapshots/chunks/missing", snapshot_missing,
          "Which of these chunk hashes this daemon lacks (used by migration)", body="json", tag="snapshots"),
    Route("POST", "/v1/vms/{ref}/migrate", vm_migrate,
          "Move a VM to another daemon (to: unix:///path or https://HOST:PORT, token)", body="json",
          tag="snapshots"),
]
