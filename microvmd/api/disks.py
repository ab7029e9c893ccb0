"""HTTP routes of the virtual disks: the disk store, uploads, and a running VM's disk rate limits.

``api.routes`` adds ``ROUTES`` to the table only when the block device is installed.
"""
from __future__ import annotations

from aiohttp import web

from .. import contract
from ..devices.blk import BlockDevice
from ..devices.disks import MAX_DISK_SIZE, Disk
from ..errors import BadRequest, MicrovmError, PayloadTooLarge
from . import codec
from .server import Route, hv


def _blk(request: web.Request) -> BlockDevice:
    dev = hv(request).devices.get(BlockDevice)
    if dev is not None:
        return dev
    raise MicrovmError("this daemon has no block device", code="no_block_device")


def _disk(disk: Disk) -> dict[str, object]:
    return disk.to_api()


async def disk_create(request: web.Request) -> web.StreamResponse:
    body = await codec.decode(request, contract.DiskCreate, hv(request).cfg.json_limit)
    disk = await _blk(request).create_disk(body.name, body.size)
    return codec.reply(request, contract.Disk, _disk(disk), status=201)


async def disk_list(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.DiskList, {"disks": [_disk(d) for d in _blk(request).list_disks()]})


async def disk_get(request: web.Request) -> web.StreamResponse:
    return codec.reply(request, contract.Disk, _disk(_blk(request).get_disk(request.match_info["name"])))


async def disk_rm(request: web.Request) -> web.StreamResponse:
    await _blk(request).remove_disk(request.match_info["name"])
    return web.Response(status=204)


async def disk_content(request: web.Request) -> web.StreamResponse:
    if request.content_length is not None and request.content_length > MAX_DISK_SIZE:
        raise PayloadTooLarge(f"content of {request.content_length} bytes is larger than the maximum disk size")
    disk = await _blk(request).upload(request.match_info["name"], request.content.iter_chunked(1 << 20),
                                      MAX_DISK_SIZE)
    return codec.reply(request, contract.Disk, _disk(disk))


async def vm_disk_patch(request: web.Request) -> web.StreamResponse:
    h = hv(request)
    vm = h.get(request.match_info["ref"])
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise BadRequest("the disk index must be an integer", code="invalid_field") from None
    body = await codec.decode(request, contract.DiskPatch, h.cfg.json_limit)
    patch = {"rate_limiter": None if body.rate_limiter is None else contract.to_builtins(body.rate_limiter)}
    return codec.reply(request, contract.BlkDisk, _blk(request).set_rate_limiter(vm, index, patch))


ROUTES = [
    Route("POST", "/v1/disks", disk_create, "Create a sparse raw disk: {name, size, from: null}",
          request=contract.DiskCreate, response=contract.Disk, status=201, tag="disks"),
    Route("GET", "/v1/disks", disk_list, "List disks (with the VMs using them)", response=contract.DiskList,
          tag="disks"),
    Route("GET", "/v1/disks/{name}", disk_get, "Inspect a disk", response=contract.Disk, tag="disks"),
    Route("DELETE", "/v1/disks/{name}", disk_rm, "Remove a disk (409 disk_in_use while a live VM has it)",
          status=204, tag="disks"),
    Route("PUT", "/v1/disks/{name}/content", disk_content,
          "Replace a disk's content with the raw body; size becomes max(size, body length)", request="binary",
          response=contract.Disk, tag="disks"),
    Route("PATCH", "/v1/vms/{ref}/disks/{index}", vm_disk_patch,
          "Change a running VM's disk rate limiter: {rate_limiter: {bandwidth, ops} | null}",
          request=contract.DiskPatch, response=contract.BlkDisk),
]
