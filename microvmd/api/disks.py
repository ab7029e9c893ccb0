"""HTTP routes of the virtual disks: the disk store, uploads, and a running VM's disk rate limits.

``api.routes`` adds ``ROUTES`` to the table only when the block device is installed.
"""
from __future__ import annotations

from aiohttp import web

from .. import contract
from ..control import actions as a
from ..devices.disks import MAX_DISK_SIZE
from ..errors import BadRequest, PayloadTooLarge
from . import codec
from .server import DURABLE, Route, apply, body, durable


async def disk_create(request: web.Request) -> web.StreamResponse:
    b = await body(request, contract.DiskCreate)
    act = a.CreateDisk(b.name, b.size, durable(request))
    return codec.reply(request, contract.Disk, await apply(request, act), status=201)


async def disk_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.DiskList, await apply(request, a.ListDisks()))


async def disk_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Disk, await apply(request, a.GetDisk(request.match_info["name"])))


async def disk_rm(request: web.Request) -> web.StreamResponse:
    await apply(request, a.RemoveDisk(request.match_info["name"]))
    return web.Response(status=204)


async def disk_content(request: web.Request) -> web.StreamResponse:
    if request.content_length is not None and request.content_length > MAX_DISK_SIZE:
        raise PayloadTooLarge(f"content of {request.content_length} bytes is larger than the maximum disk size")
    act = a.ReplaceDiskContent(request.match_info["name"], request.content.iter_chunked(1 << 20), MAX_DISK_SIZE,
                                 durable(request))
    return codec.reply(request, contract.Disk, await apply(request, act))


async def vm_disk_patch(request: web.Request) -> web.StreamResponse:
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise BadRequest("the disk index must be an integer", code="invalid_field") from None
    b = await body(request, contract.DiskPatch)
    act = a.SetDiskRateLimiter(request.match_info["ref"], index, b.rate_limiter)
    return codec.reply(request, contract.BlkDisk, await apply(request, act))


ROUTES = [
    Route("POST", "/v1/disks", disk_create, "Create a sparse raw disk: {name, size, from: null}",
          request=contract.DiskCreate, response=contract.Disk, status=201, tag="disks", query=(DURABLE,)),
    Route("GET", "/v1/disks", disk_list, "List disks (with the VMs using them)", response=contract.DiskList,
          tag="disks"),
    Route("GET", "/v1/disks/{name}", disk_get, "Inspect a disk", response=contract.Disk, tag="disks"),
    Route("DELETE", "/v1/disks/{name}", disk_rm, "Remove a disk (409 disk_in_use while a live VM has it)",
          status=204, tag="disks"),
    Route("PUT", "/v1/disks/{name}/content", disk_content,
          "Replace a disk's content with the raw body; size becomes max(size, body length)", request="binary",
          response=contract.Disk, tag="disks", query=(DURABLE,)),
    Route("PATCH", "/v1/vms/{ref}/disks/{index}", vm_disk_patch,
          "Change a running VM's disk rate limiter: {rate_limiter: {bandwidth, ops} | null}",
          request=contract.DiskPatch, response=contract.BlkDisk),
]
