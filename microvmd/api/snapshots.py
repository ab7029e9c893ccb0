"""Snapshot, restore and migration routes (thin: decode, call the controller, encode)."""
from __future__ import annotations

import logging

from aiohttp import web

from .. import contract
from ..control import actions as a
from . import codec
from .server import Route, _bool, apply, body, client_of, durable

log = logging.getLogger("microvmd.api")


async def snapshot_create(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.SnapshotCreate)
    act = a.CreateSnapshot(request.match_info["ref"], b.name, b.diff, durable(request))
    return codec.reply(request, contract.Snapshot, await apply(request, act), status=201)


async def snapshot_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.SnapshotList, await apply(request, a.ListSnapshots(_bool(request, "all"))))


async def snapshot_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Snapshot, await apply(request, a.GetSnapshot(request.match_info["name"])))


async def snapshot_rm(request: web.Request) -> web.StreamResponse:
    await apply(request, a.RemoveSnapshot(request.match_info["name"]))
    return web.Response(status=204)


async def snapshot_export(request: web.Request) -> web.StreamResponse:
    export: a.BlockStream = await apply(request, a.ExportSnapshot(request.match_info["name"]))
    resp = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f'attachment; filename="{export.name}.mvsnap"'})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        async for block in export.blocks:
            await resp.write(block)
        await resp.write_eof()
    except Exception as exc:
        # the status line is gone: the only honest signal left is to cut the stream (it has no end record,
        # so an importer refuses it as truncated)
        log.error("export of snapshot %s failed mid-stream: %s", export.name, exc)
        if request.transport is not None:
            request.transport.close()
    return resp


async def snapshot_import(request: web.Request) -> web.StreamResponse:
    summary = await apply(request, a.ImportSnapshot(request.content.readexactly, durable(request),
                                                    client_of(request)))
    return codec.reply(request, contract.Snapshot, summary, status=201)


async def snapshot_restore(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.Restore)
    act = a.RestoreSnapshot(request.match_info["name"], b.name, b.start,
                            None if b.allow_egress is None else tuple(b.allow_egress),
                            None if b.publish is None else tuple(b.publish), b.keep_disk_names)
    return codec.reply(request, contract.Vm, await apply(request, act), status=201)


async def snapshot_missing(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.ChunksMissing)
    act = a.FindMissingChunks(tuple(bytes.fromhex(x) for x in b.chunks))  # the pattern made them hex
    return codec.reply(request, contract.MissingChunks, await apply(request, act))


async def vm_migrate(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.Migrate)
    act = a.MigrateVm(request.match_info["ref"], b.to, b.token, b.ca_file)
    return codec.reply(request, contract.MigrateResult, await apply(request, act))


ROUTES: list[Route] = [
    Route("POST", "/v1/vms/{ref}/snapshots", snapshot_create,
          "Snapshot a VM (name, diff); a running Asyncify guest is taken at its next suspension point",
          request=contract.SnapshotCreate, response=contract.Snapshot, status=201, tag="snapshots"),
    Route("GET", "/v1/snapshots", snapshot_list, "List snapshots; query: all=true also lists the VMs' checkpoints",
          response=contract.SnapshotList, tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}", snapshot_get, "Inspect a snapshot", response=contract.Snapshot,
          tag="snapshots"),
    Route("DELETE", "/v1/snapshots/{name}", snapshot_rm, "Remove a snapshot", status=204, tag="snapshots"),
    Route("GET", "/v1/snapshots/{name}/export", snapshot_export,
          "Export a snapshot (and its image) as one portable stream", response="binary", tag="snapshots"),
    Route("POST", "/v1/snapshots/import", snapshot_import, "Import an exported snapshot stream",
          request="binary", response=contract.Snapshot, status=201, tag="snapshots"),
    Route("POST", "/v1/snapshots/{name}/restore", snapshot_restore,
          "Restore a snapshot as a new VM (name, start; allow_egress and publish grant its network: an "
          "imported snapshot gets none of its file's)",
          request=contract.Restore, response=contract.Vm, status=201, tag="snapshots"),
    Route("POST", "/v1/snapshots/chunks/missing", snapshot_missing,
          "Which of these chunk hashes this daemon lacks (used by migration)", request=contract.ChunksMissing,
          response=contract.MissingChunks, tag="snapshots"),
    Route("POST", "/v1/vms/{ref}/migrate", vm_migrate,
          "Move a VM to another daemon (to: unix:///path or https://HOST:PORT, token)", request=contract.Migrate,
          response=contract.MigrateResult, tag="snapshots"),
]
