"""Snapshot, restore and migration routes (thin: decode, call the controller, encode)."""
from __future__ import annotations

import logging

from aiohttp import web

from .. import contract
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
    body = await codec.decode(request, contract.SnapshotCreate, h.cfg.json_limit)
    return codec.reply(request, contract.Snapshot, await snaps(request).create(vm, body.name, body.diff), status=201)


async def snapshot_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.SnapshotList, {"snapshots": await snaps(request).list_all()})


async def snapshot_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Snapshot, await snaps(request).get(request.match_info["name"]))


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
    return codec.reply(request, contract.Snapshot, summary, status=201)


async def snapshot_restore(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    body = await codec.decode(request, contract.Restore, h.cfg.json_limit)
    vm = await snaps(request).restore(request.match_info["name"], body.name, body.start)
    return codec.reply(request, contract.Vm, vm.to_api(), status=201)


async def snapshot_missing(request: web.Request) -> web.StreamResponse:
    body = await codec.decode(request, contract.ChunksMissing, hv(request).cfg.json_limit)
    missing = snaps(request).missing([bytes.fromhex(x) for x in body.chunks])  # the pattern made them hex
    return codec.respond(request, contract.MissingChunks([h.hex() for h in missing]))


async def vm_migrate(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    body = await codec.decode(request, contract.Migrate, h.cfg.json_limit)
    return codec.reply(request, contract.MigrateResult,
                       await migrate(h, snaps(request), vm, body.to, body.token, body.ca_file))


ROUTES: list[Route] = [
    Route("POST", "/v1/vms/{ref}/snapshots", snapshot_create,
          "Snapshot a VM (name, diff); a running Asyncify guest is taken at its next suspension point",
          request=contract.SnapshotCreate, response=contract.Snapshot, status=201, tag="snapshots"),
    Route("GET", "/v1/snapshots", snapshot_list, "List snapshots", response=contract.SnapshotList, tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}", snapshot_get, "Inspect a snapshot", response=contract.Snapshot,
          tag="snapshots"),
    Route("DELETE", "/v1/snapshots/{name}", snapshot_rm, "Remove a snapshot", status=204, tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}/export", snapshot_export,
          "Export a snapshot (and its image) as one portable stream", response="binary", tag="snapshots"),
    Route("POST", "/v1/snapshots/import", snapshot_import, "Import an exported snapshot stream",
          request="binary", response=contract.Snapshot, status=201, tag="snapshots"),
    Route("POST", "/v1/snapshots/{name}/restore", snapshot_restore, "Restore a snapshot as a new VM (name, start)",
          request=contract.Restore, response=contract.Vm, status=201, tag="snapshots"),
    Route("POST", "/v1/snapshots/chunks/missing", snapshot_missing,
          "Which of these chunk hashes this daemon lacks (used by migration)", request=contract.ChunksMissing,
          response=contract.MissingChunks, tag="snapshots"),
    Route("POST", "/v1/vms/{ref}/migrate", vm_migrate,
          "Move a VM to another daemon (to: unix:///path or https://HOST:PORT, token)", request=contract.Migrate,
          response=contract.MigrateResult, tag="snapshots"),
]
